"""The analysis page's figures, drawn from ``analysis.json`` data with the evaluation report's matplotlib style.

Every builder takes a list of panels ``[(label, data), ...]`` (one analysis, or two side by side for
``--compare``); where both panels have the same shape a third panel shows their difference (right - left).
"""

from __future__ import annotations

import numpy as np
from matplotlib.colors import PowerNorm, TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from attnkit.eval.report_plots import PALETTE, new_figure, styled

Panels = list[tuple[str, dict]]
SOURCE_COLORS = {"carried": "#7f7f7f", "attention": "#1f77b4", "mlp": "#d62728"}


def _diff(arrays: list[np.ndarray]) -> np.ndarray | None:
    return arrays[1] - arrays[0] if len(arrays) == 2 and arrays[0].shape == arrays[1].shape else None


def _heat(fig: Figure, ax, grid: np.ndarray, title: str, cmap: str, vmin: float, vmax: float, xlabel: str,
          ylabel: str, label: str, norm=None) -> None:
    image = ax.imshow(grid, cmap=cmap, aspect="auto", interpolation="nearest", origin="lower",
                      **({"norm": norm} if norm is not None else {"vmin": vmin, "vmax": vmax}))
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(False)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # layers, heads and tokens are integers
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(image, ax=ax, label=label, shrink=0.9)


def _diff_norm(d: np.ndarray) -> TwoSlopeNorm:
    m = float(np.nanmax(np.abs(d))) or 1e-9
    return TwoSlopeNorm(0.0, -m, m)


def _mark_sliding(ax, sliding: list[bool], width: int) -> None:
    for layer, s in enumerate(sliding):
        if s:
            ax.add_patch(Rectangle((-0.5, layer - 0.5), width, 1, fill=False, hatch="//", lw=0, ec="#ffffff80"))


def _row_width(n_panels: int, base: float) -> float:
    return min(15.5, base * n_panels + 0.6)


@styled
def sink_heatmap(panels: Panels) -> Figure:
    """Layer x query-head alpha_0 (mean attention the first token receives), one panel per analysis."""
    grids = [np.array(d["sinks"]["alpha0_per_head"]) for _, d in panels]
    diff = _diff(grids)
    n = len(grids) + (diff is not None)
    fig = new_figure(_row_width(n, 4.6), 4.6)
    axes = np.atleast_1d(fig.subplots(1, n, squeeze=False)[0])
    for ax, (label, d), g in zip(axes, panels, grids):
        first = "BOS" if d["sinks"]["first_is_bos"] else "first token"
        _heat(fig, ax, g, f"{label}: α₀ ({first})", "viridis", 0, 1, "query head", "layer", "α₀")
    if diff is not None:
        _heat(fig, axes[-1], diff, "difference (right − left)", "RdBu_r", 0, 0, "query head", "layer", "Δα₀",
              norm=_diff_norm(diff))
    return fig


@styled
def sink_bars(panels: Panels) -> Figure:
    """Sink_k^eps per key index k (left) and Sink_0^eps per layer (right)."""
    fig = new_figure(12.5, 4.2)
    ax_k, ax_l = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 2]})
    width = 0.8 / len(panels)
    for i, (label, d) in enumerate(panels):
        s = d["sinks"]
        ks = [int(k) for k in s["sink_pct"]]
        color = PALETTE[i % len(PALETTE)]
        x = np.arange(len(ks)) + (i - (len(panels) - 1) / 2) * width
        bars = ax_k.bar(x, [s["sink_pct"][str(k)] for k in ks], width, color=color, label=label)
        ax_k.bar_label(bars, fmt="%.1f", fontsize=8.5, padding=2)
        ax_k.set_xticks(range(len(ks)), [f"k={k}" for k in ks])
        per_layer = np.array(s["per_layer_pct"])[:, 0]
        ax_l.plot(range(len(per_layer)), per_layer, color=color, marker="o", ms=4, label=label)
    ax_l.xaxis.set_major_locator(MaxNLocator(integer=True))
    eps = panels[0][1]["sinks"]["eps"]
    ax_k.set_title(f"Sink_k^ε (ε = {eps:g}), % of (sample, layer, head)")
    ax_k.set_ylim(0, 105)
    ax_k.set_ylabel("%")
    ax_l.set_title("Sink_0^ε per layer (% of samples × heads)")
    ax_l.set_xlabel("layer")
    ax_l.set_ylim(-3, 103)
    ax_l.legend(loc="best")
    return fig


@styled
def massive_figure(panels: Panels) -> Figure:
    """Max |a| and median |a| of each layer's output (log scale); flagged layers coloured by dominant source."""
    fig = new_figure(12.5, 4.4)
    ax = fig.subplots()
    for i, (label, d) in enumerate(panels):
        layers = d["massive"]["layers"]
        color = PALETTE[i % len(PALETTE)]
        x = np.arange(len(layers))
        ax.plot(x, [s["max"] for s in layers], color=color, marker="o", ms=4, label=f"{label}: max |a|")
        ax.plot(x, [max(s["median"], 1e-6) for s in layers], color=color, ls=":", lw=1.5,
                label=f"{label}: median |a|")
        for layer, s in enumerate(layers):
            if s["n_flagged"]:
                src = max(s["sources"], key=s["sources"].get)
                ax.scatter([layer], [s["max"]], s=110, facecolors="none", edgecolors=SOURCE_COLORS[src], lw=2,
                           zorder=5)
    for src, c in SOURCE_COLORS.items():
        ax.scatter([], [], s=110, facecolors="none", edgecolors=c, lw=2, label=f"massive, mostly {src}")
    ax.axhline(panels[0][1]["massive"]["threshold"], color="#999", ls="--", lw=1, label="|a| = 100")
    ax.set_yscale("log")
    # the report's style keeps text as text (no mathtext), so log ticks get plain numbers
    ax.yaxis.set_major_locator(LogLocator(base=10))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer (output of decoder layer)")
    ax.set_ylabel("|activation|")
    ax.set_title("Massive activations: |a| > 100 and ≥ 1000 × median (Sun et al.)")
    fig.legend(loc="outside right upper", fontsize=9)
    return fig


@styled
def cosine_figure(panels: Panels) -> Figure:
    """cos(h_l[0], h_l[t]) as a layer x token heatmap per analysis (+ difference)."""
    grids = [np.array(d["cosine"]["cos"]) for _, d in panels]
    diff = _diff(grids)
    n = len(grids) + (diff is not None)
    fig = new_figure(_row_width(n, 5.0), 4.4)
    axes = np.atleast_1d(fig.subplots(1, n, squeeze=False)[0])
    for ax, (label, _), g in zip(axes, panels, grids):
        _heat(fig, ax, g, f"{label}: cos(h₀, h_t)", "RdBu_r", -1, 1, "token index t", "layer (0 = embeddings)",
              "cosine")
    if diff is not None:
        _heat(fig, axes[-1], diff, "difference (right − left)", "RdBu_r", 0, 0, "token index t", "layer",
              "Δ cosine", norm=_diff_norm(diff))
    return fig


@styled
def head_score_figure(panels: Panels) -> Figure:
    """Echo and induction scores, layer x query head; sliding-window layers hatched."""
    rows = []
    for label, d in panels:
        h = d["heads"]
        rows.append((label, np.array(h["echo"]), np.array(h["induction"]),
                     [t == "sliding_attention" for t in h["layer_types"]]))
    diff = len(rows) == 2 and rows[0][1].shape == rows[1][1].shape
    n = len(rows) + diff
    fig = new_figure(10.5, 4.0 * n + 0.3)
    axes = fig.subplots(n, 2, squeeze=False)
    for r, (label, echo, ind, sliding) in enumerate(rows):
        for c, (name, g) in enumerate((("echo", echo), ("induction", ind))):
            vmax = max(float(g.max()), 1e-6)
            _heat(fig, axes[r, c], g, f"{label}: {name} score", "magma", 0, vmax, "query head", "layer", name)
            _mark_sliding(axes[r, c], sliding, g.shape[1])
    if diff:
        for c, i in enumerate((1, 2)):
            d = rows[1][i] - rows[0][i]
            _heat(fig, axes[-1, c], d, f"difference (right − left): {('echo', 'induction')[c]}", "RdBu_r", 0, 0,
                  "query head", "layer", "Δ", norm=_diff_norm(d))
    return fig


@styled
def streaming_figure(panels: Panels) -> Figure:
    """Streaming mass (first sinks + recent window) per (layer, query head)."""
    fig = new_figure(_row_width(len(panels), 5.0), 4.4)
    axes = np.atleast_1d(fig.subplots(1, len(panels), squeeze=False)[0])
    for ax, (label, d) in zip(axes, panels):
        s = d["streaming"]
        g = np.array(s["mass"])
        _heat(fig, ax, g, f"{label}: mass on {s['sinks']} sinks + {s['recent']} recent", "cividis", 0, 1,
              "query head", "layer", "attention mass")
        group = g.shape[1] // max(1, d["config"]["num_key_value_heads"])
        for layer, kv in s["candidates"]:
            ax.add_patch(Rectangle((kv * group - 0.5, layer - 0.5), group, 1, fill=False, ec="#ff3b30", lw=1.6))
    return fig


@styled
def maps_figure(label: str, maps: dict) -> Figure:
    """A grid of attention maps (rows: layers, columns: heads), colour on a power scale to show faint stripes."""
    probs = np.array(maps["probs"])
    n_l, n_h = probs.shape[:2]
    fig = new_figure(min(15.5, 2.9 * n_h + 1.2), 2.7 * n_l + 0.6)
    axes = fig.subplots(n_l, n_h, squeeze=False)
    norm = PowerNorm(0.35, vmin=0, vmax=1)
    image = None
    for i, layer in enumerate(maps["layers"]):
        for j, head in enumerate(maps["heads"]):
            ax = axes[i, j]
            image = ax.imshow(probs[i, j], cmap="Blues", norm=norm, interpolation="nearest")
            ax.set_title(f"layer {layer} · head {head}", fontsize=9.5)
            ax.grid(False)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel("query")
            if i == n_l - 1:
                ax.set_xlabel("key")
    fig.colorbar(image, ax=axes.ravel().tolist(), label="probability (power scale)", shrink=0.8)
    fig.suptitle(f"{label}: attention maps on {probs.shape[-1]} essay tokens", fontweight="bold")
    return fig


__all__ = ["cosine_figure", "head_score_figure", "maps_figure", "massive_figure", "sink_bars", "sink_heatmap",
           "streaming_figure"]
