"""The report's figures: matplotlib (no pyplot, no GUI backend) rendered to inline SVG strings.

Text stays text in the SVG (``svg.fonttype = none``): it is crisp at any zoom and searchable in the page. Element
ids are prefixed per figure so that several SVGs can live in one HTML document.
"""

from __future__ import annotations

import functools
import io
import math
import re

import matplotlib
import numpy as np
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.patheffects import withStroke
from matplotlib.ticker import FixedLocator, FuncFormatter, MultipleLocator, NullLocator, PercentFormatter

from attnkit.eval.report_data import (Row, config_label, configs, curve, group, is_full, macro_score, mean,
                                      nll_mean_curve, uniq)

RC = {
    "svg.fonttype": "none",
    "svg.hashsalt": "attnkit-report",
    "text.parse_math": False,  # "$" in a model or task name is text, not mathtext
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans", "Liberation Sans", "Arial", "Helvetica"],
    "font.size": 11,
    "axes.titlesize": 12,
    "axes.titleweight": "bold",
    "axes.labelsize": 11,
    "axes.grid": True,
    "grid.alpha": 0.35,
    "grid.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.fontsize": 10,
    "legend.frameon": False,
    "lines.linewidth": 2.0,
    "lines.markersize": 7,
    "figure.constrained_layout.use": True,
}
FULL_COLOR = "#222222"
PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#bcbd22"]
MARKERS = "osD^vP<>X"


def palette(series: list[str]) -> dict[str, tuple[str, str]]:
    """series -> (color, marker), stable for one report; full is near-black."""
    out = {"full": (FULL_COLOR, "*")}
    for i, s in enumerate(x for x in series if x != "full"):
        out[s] = (PALETTE[i % len(PALETTE)], MARKERS[i % len(MARKERS)])
    return out


def fmt_tokens(n: float) -> str:
    n = float(n)
    if n >= 1024 and n % 1024 == 0:
        return f"{int(n) // 1024}k"
    return f"{n:g}" if n < 1 else f"{int(round(n))}"


def _shade(color: str, t: float) -> tuple[float, float, float]:
    """Blend ``color`` towards white: t=0 the color itself, t=1 white."""
    return tuple(c + (1 - c) * t for c in to_rgb(color))


def new_figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height))


def styled(fn):
    """Run a figure builder under the report's rcParams (they are read when artists are created)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(RC):
            return fn(*args, **kwargs)

    return wrapper


def to_svg(fig: Figure, uid: str) -> str:
    """The figure as an ``<svg>`` element (no XML prolog), its ids prefixed with ``uid``."""
    buf = io.StringIO()
    with matplotlib.rc_context(RC):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r"\s*<metadata>.*?</metadata>", "", svg, flags=re.S)  # RDF boilerplate
    svg = re.sub(r'\bid="([^"]+)"', lambda m: f'id="{uid}-{m.group(1)}"', svg)
    svg = re.sub(r"url\(#([^)]+)\)", lambda m: f"url(#{uid}-{m.group(1)})", svg)
    svg = re.sub(r'href="#([^"]+)"', lambda m: f'href="#{uid}-{m.group(1)}"', svg)
    return svg.replace("<svg ", '<svg role="img" ', 1)


def _percent_axis(ax, label: str = "score (%)") -> None:
    ax.set_ylim(-3, 103)
    ax.yaxis.set_major_formatter(PercentFormatter(100, decimals=0))
    ax.set_ylabel(label)


def _legend_right(fig: Figure, axes) -> None:
    """One legend for the whole figure, right of the plots, without duplicates."""
    handles: dict[str, object] = {}
    for ax in np.ravel(axes):
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="outside right upper")


def budget_axes(ax, rows: list[Row], colors) -> bool:
    """Accuracy vs KV budget on ``ax`` (log2 x), one line per series with a ±1 standard error band, configs
    without a budget (full) as horizontal lines."""
    label, lines, flat = curve(rows)
    if not lines and not flat:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="#888")
        return False
    xs = sorted({p[0] for pts in lines.values() for p in pts})
    for series, pts in lines.items():
        color, marker = colors.get(series, ("#555", "o"))
        x, y, se = (np.array([p[i] for p in pts]) for i in range(3))
        ax.fill_between(x, np.clip(100 * (y - se), 0, 100), np.clip(100 * (y + se), 0, 100), color=color,
                        alpha=0.12, lw=0)
        ax.plot(x, 100 * y, color=color, marker=marker, label=series)
    for config, (y, se) in flat.items():
        full = config[0] == "full"
        color = FULL_COLOR if full else colors.get(config[0], ("#555",))[0]
        ax.axhspan(max(0, 100 * (y - se)), min(100, 100 * (y + se)), color=color, alpha=0.07 if full else 0.1, lw=0)
        ax.axhline(100 * y, color=color, ls="--" if full else ":", lw=1.6,
                   label="full (dense)" if full else f"{config_label(config)} (no budget)")
    if xs:
        ax.set_xscale("log", base=2)
        lo, hi = min(xs), max(xs)
        ax.set_xlim(lo / 2**0.35, hi * 2**0.35)
        ax.xaxis.set_major_locator(FixedLocator(xs))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_tokens(v)))
    else:
        ax.set_xticks([])
    ax.set_xlabel(label)
    _percent_axis(ax)
    return True


@styled
def overall_figure(rows: list[Row], colors, title: str) -> Figure:
    fig = new_figure(9.5, 4.6)
    ax = fig.subplots()
    budget_axes(ax, rows, colors)
    ax.set_title(title)
    _legend_right(fig, [ax])
    return fig


@styled
def grid_figure(rows: list[Row], colors, row_key: str, col_key: str, title_of, suptitle: str) -> Figure:
    """Accuracy-vs-budget small multiples: one panel per (row_key value, col_key value)."""
    rvals, cvals = uniq(rows, row_key), uniq(rows, col_key)
    fig = new_figure(min(4.4 * len(cvals), 13) + 2.2, 3.6 * len(rvals) + 0.4)
    axes = np.atleast_2d(fig.subplots(len(rvals), len(cvals), sharey=True, squeeze=False))
    for i, rv in enumerate(rvals):
        for j, cv in enumerate(cvals):
            ax = axes[i, j]
            budget_axes(ax, [r for r in rows if r[row_key] == rv and r[col_key] == cv], colors)
            ax.set_title(title_of(rv, cv))
            if j:
                ax.set_ylabel("")
    fig.suptitle(suptitle, fontweight="bold")
    _legend_right(fig, axes)
    return fig


@styled
def latency_figure(rows: list[Row], colors, model: str) -> Figure:
    """Accuracy vs decode ms/token, one panel per length, with the Pareto front (faster and better is up-left)."""
    lengths = uniq(rows, "length")
    fig = new_figure(min(5.2 * len(lengths), 14) + 2.2, 4.4)
    axes = fig.subplots(1, len(lengths), sharey=True, squeeze=False)[0]
    for ax, length in zip(axes, lengths):
        points = []
        at_len = [r for r in rows if r["length"] == length]
        by_config = group(at_len, lambda r: r["config"])
        for config in configs(at_len):
            rs = by_config[config]
            ms, acc = mean(1000 * r["decode_s_per_token"] for r in rs if r["decode_s_per_token"]), macro_score(rs)
            if ms is not None and acc is not None:
                points.append((ms, 100 * acc, config))
        for k, (series, pts) in enumerate(group(points, lambda p: p[2][0]).items()):
            color, marker = colors.get(series, ("#555", "o"))
            dy, va = (6, "bottom") if k % 2 else (-7, "top")  # alternate label sides so neighbours don't collide
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color, marker=marker, lw=1.2, alpha=0.9,
                    ms=13 if series == "full" else 7, label=series if series != "full" else "full (dense)")
            for x, y, config in pts:
                ax.annotate(config[1] or "full", (x, y), xytext=(5, dy), textcoords="offset points", fontsize=9,
                            color=color, va=va, path_effects=[withStroke(linewidth=3, foreground="white")])
        front, best = [], -math.inf
        for x, y, _ in sorted(points, key=lambda p: (p[0], -p[1])):
            if y > best:
                front.append((x, y))
                best = y
        if len(front) > 1:
            ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="#999", ls="--", lw=1,
                    zorder=0, label="Pareto front")
        if not points:
            ax.text(0.5, 0.5, "no decode timings", ha="center", va="center", transform=ax.transAxes, color="#888")
        ax.set_title(f"{model} · {fmt_tokens(length)} context")
        ax.set_xlabel("decode latency (ms / token)")
        _percent_axis(ax)
        if ax is not axes[0]:
            ax.set_ylabel("")
    _legend_right(fig, axes)
    return fig


@styled
def niah_figure(rows: list[Row], title: str) -> Figure:
    """Depth x length heatmaps of mean score, one small panel per configuration.

    Depths are used as they are when there are at most 11 distinct ones (a NIAH grid), else binned by fifths
    (e.g. passkey, whose needle depth is drawn at random per sample).
    """
    cfgs = configs(rows)
    depths, lengths = uniq(rows, "depth"), uniq(rows, "length")
    binned = len(depths) > 11
    if binned:
        rows = [{**r, "depth": min(int(r["depth"] * 5), 4) / 5} for r in rows]
        depths = uniq(rows, "depth")
    depth_label = (lambda d: f"{100 * d:.0f}–{100 * d + 20:.0f}%") if binned else (lambda d: f"{100 * d:.0f}%")
    ncol = min(4, len(cfgs))
    nrow = math.ceil(len(cfgs) / ncol)
    fig = new_figure(0.6 + ncol * (1.1 + 0.75 * len(lengths)), 0.9 + nrow * (0.9 + 0.38 * len(depths)))
    axes = np.atleast_1d(fig.subplots(nrow, ncol, squeeze=False)).ravel()
    cmap = matplotlib.colormaps["RdYlGn"]
    image = None
    for ax, config in zip(axes, cfgs):
        grid = np.full((len(depths), len(lengths)), np.nan)
        cells = group([r for r in rows if r["config"] == config], lambda r: (r["depth"], r["length"]))
        for (d, n), rs in cells.items():
            grid[depths.index(d), lengths.index(n)] = 100 * mean(r["score"] for r in rs)
        image = ax.imshow(grid, cmap=cmap, vmin=0, vmax=100, aspect="auto")
        for (i, j), v in np.ndenumerate(grid):
            if not np.isnan(v):
                ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=9,
                        color="white" if v < 20 or v > 85 else "black")
        ax.set_xticks(range(len(lengths)), [fmt_tokens(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [depth_label(d) for d in depths])
        ax.grid(False)
        ax.set_title(config_label(config), fontsize=10.5)
        ax.set_xlabel("context length", fontsize=9.5)
        if ax in axes[::ncol]:
            ax.set_ylabel("needle depth", fontsize=9.5)
    for ax in axes[len(cfgs):]:
        ax.set_visible(False)
    if image is not None:
        fig.colorbar(image, ax=axes.tolist(), label="score (%)", shrink=0.8, aspect=30)
    fig.suptitle(title, fontweight="bold")
    return fig


def _smooth(values: list[float], window: int) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(values, dtype=float)
    pos = np.arange(1, len(y) + 1, dtype=float)
    ok = ~np.isnan(y)
    y, pos = y[ok], pos[ok]
    window = max(1, min(window, len(y)))
    if window > 1:
        kernel = np.ones(window) / window
        y = np.convolve(y, kernel, mode="valid")
        pos = np.convolve(pos, kernel, mode="valid")
    keep = np.unique(np.linspace(0, len(y) - 1, min(len(y), 600)).round().astype(int)) if len(y) else []
    return pos[keep], y[keep]


@styled
def ppl_figure(rows: list[Row], colors, model: str) -> Figure:
    """Smoothed mean NLL vs position: one row of panels per length, one panel per series, full as reference."""
    lengths = uniq(rows, "length")
    series = [s for s in dict.fromkeys(c[0] for c in configs(rows)) if s != "full"] or ["full"]
    fig = new_figure(min(4.8 * len(series), 14) + 0.4, 3.4 * len(lengths) + 0.5)
    axes = fig.subplots(len(lengths), len(series), sharey=True, squeeze=False)
    for i, length in enumerate(lengths):
        rows_len = [r for r in rows if r["length"] == length]
        at_len = group(rows_len, lambda r: r["config"])
        for j, s in enumerate(series):
            ax = axes[i, j]
            cfgs = [c for c in configs(rows_len) if c[0] == s]
            full = [c for c in at_len if is_full(c) and c[0] == "full" and s != "full"]
            for k, config in enumerate(full + cfgs):
                nll = nll_mean_curve(at_len[config])
                if not nll:
                    continue
                x, y = _smooth(nll, max(1, len(nll) // 32))
                if config[0] == "full":
                    style = dict(color=FULL_COLOR, ls="--", lw=1.5, label="full (dense)")
                else:
                    shade = 0.55 * (1 - (k - len(full)) / max(1, len(cfgs) - 1)) if len(cfgs) > 1 else 0
                    color = _shade(colors.get(s, ("#555",))[0], shade)
                    style = dict(color=color, lw=1.6, label=f"budget {config[1]}" if config[1] else s)
                    tokens = mean(r["budget_tokens"] for r in at_len[config])
                    if tokens:
                        ax.axvline(tokens, color=color, ls=":", lw=1)
                ax.plot(x, y, **style)
            ax.set_title(f"{s} · {fmt_tokens(length)} context", fontsize=11)
            ax.set_xlabel("token position")
            step = 1024 * 2 ** max(0, math.ceil(math.log2(max(length, 1) / 1024 / 6)))
            ax.xaxis.set_major_locator(MultipleLocator(step if length >= 2048 else max(1, length // 4)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: fmt_tokens(v) if v else "0"))
            if j == 0:
                ax.set_ylabel("NLL (nats, smoothed)")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(loc="upper right", fontsize=9, frameon=True, framealpha=0.85, edgecolor="none")
    fig.suptitle(f"{model} · per-position NLL (moving average over 1/32 of the text; dotted: budget)",
                 fontweight="bold")
    return fig


__all__ = ["budget_axes", "fmt_tokens", "grid_figure", "latency_figure", "niah_figure",
           "overall_figure", "palette", "ppl_figure", "to_svg"]
