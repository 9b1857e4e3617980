"""``attnkit report results.db -o report/``: a self-contained HTML report and a Markdown summary of a results DB.

The HTML needs nothing from the network: plots are inline SVG (matplotlib, text kept as text), styles are
inline, and one small inline script checks on load that every plot rendered (``<body data-rendered="N/M">``)
and records page errors (``data-errors``), so a headless browser test can assert on the dumped DOM.
See docs/eval.md, section "Report".
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
from pathlib import Path
from typing import Sequence

from attnkit.eval.report_data import (FAMILIES, MiB, Row, accuracy_rows, config_label, configs, group, load_rows,
                                      mean, perplexity, uniq)
from attnkit.eval.report_html import Cell, Doc, md_esc, n_range, num, page, score_cell
from attnkit.eval.report_plots import (fmt_tokens, grid_figure, latency_figure, niah_figure, overall_figure, palette,
                                       ppl_figure)

SECTIONS = [("overall", "Overall: accuracy vs KV budget"), ("latency", "Accuracy vs latency, latency and memory"),
            ("families", "Accuracy vs KV budget per task family"), ("niah", "NIAH depth × length"),
            ("ppl", "Perplexity vs position"), ("tables", "Scores per task")]


# -- sections ---------------------------------------------------------------------------------------------------
def _header(doc: Doc, rows: list[Row], db_path: Path, generated: str) -> list[tuple[str, str]]:
    def values(col: str) -> str:
        vals = uniq(rows, col)
        return ", ".join(str(v) for v in vals) if vals else "–"

    counts = group(rows, lambda r: r["model"])
    created = uniq(rows, "created_at")
    return [
        ("models", ", ".join(f"{m} ({len(rs)} rows)" for m, rs in sorted(counts.items())) or "–"),
        ("methods", ", ".join(dict.fromkeys(c[0] for c in configs(rows))) or "–"),
        ("tasks", values("task")), ("lengths", ", ".join(fmt_tokens(n) for n in uniq(rows, "length")) or "–"),
        ("attnkit versions", values("attnkit_version")), ("git commits", values("git_commit")),
        ("devices", values("device")), ("dtypes", values("dtype")), ("rows", str(len(rows))),
        ("runs recorded", f"{created[0]} … {created[-1]}" if created else "–"),
        ("source", db_path.name), ("generated", generated),
    ]


def _overall(doc: Doc, rows: list[Row], colors) -> None:
    doc.heading(2, "Overall: accuracy vs KV budget", "overall")
    acc = accuracy_rows(rows)
    if not acc:
        return doc.para("No accuracy rows (only perplexity, or an empty database).", "empty")
    doc.para("Mean score over all accuracy tasks (each task weighted equally, lengths averaged) against the KV "
             "budget, one line per method; the dashed line is the dense model (full). Up and to the left is "
             "better: the same accuracy from a smaller cache.")
    for model, rs in sorted(group(acc, lambda r: r["model"]).items()):
        tasks = uniq(rs, "task")
        doc.figure(f"overall-{model}", overall_figure(rs, colors, f"{model} · mean over {len(tasks)} tasks"),
                   f"{model}: mean score vs KV budget, averaged over lengths "
                   f"{', '.join(fmt_tokens(n) for n in uniq(rs, 'length'))} (log₂ x-axis).")
        lengths = uniq(rs, "length")
        header = ["method @ budget", "KV tokens", "n per length"] + [fmt_tokens(n) for n in lengths] + ["all lengths"]
        body = []
        by_config = group(rs, lambda r: r["config"])
        for config in configs(rs):
            crs = by_config[config]
            tokens = mean(r["budget_tokens"] for r in crs)
            by_len = group(crs, lambda r: r["length"])
            body.append([config_label(config), "full" if tokens is None else f"{tokens:.0f}", n_range(by_len.values())]
                        + [score_cell(by_len.get(n, [])) for n in lengths] + [score_cell(crs)])
        doc.table(header, body, f"{model}: mean score (%) by context length")


def _families(doc: Doc, rows: list[Row], colors) -> None:
    doc.heading(2, "Accuracy vs KV budget per task family", "families")
    acc = accuracy_rows(rows)
    present = [f for f in FAMILIES if any(r["family"] == f for r in acc)]
    present += sorted({r["family"] for r in acc} - set(FAMILIES))
    if not present:
        return doc.para("No accuracy rows.", "empty")
    doc.para("One panel per model and context length; each point is the mean over the family's tasks.")
    for fam in present:
        rs = [r for r in acc if r["family"] == fam]
        fig = grid_figure(rs, colors, "model", "length", lambda m, n: f"{m} · {fmt_tokens(n)}",
                          f"{fam}: score vs KV budget")
        doc.figure(f"family-{fam}", fig, f"{fam} ({', '.join(uniq(rs, 'task'))})")


def _latency(doc: Doc, rows: list[Row], colors) -> None:
    doc.heading(2, "Accuracy vs latency, latency and memory", "latency")
    acc = [r for r in accuracy_rows(rows) if r["decode_s_per_token"]]
    if acc:
        doc.para("Mean score against mean decode latency per generated token, one panel per context length. "
                 "Labels are budgets; the grey dashed step is the Pareto front (nothing is both faster and better).")
        for model, rs in sorted(group(acc, lambda r: r["model"]).items()):
            doc.figure(f"latency-{model}", latency_figure(rs, colors, model),
                       f"{model}: accuracy vs decode ms/token (points on the Pareto front are the ones worth picking).")
    else:
        doc.para("No decode timings (decode_s_per_token) in the database.", "empty")
    if not rows:
        return doc.para("No rows: no latency or memory to show.", "empty")
    header = ["model", "method @ budget", "length", "n", "prefill s", "decode ms/token", "KV MiB (peak)",
              "peak memory MiB"]
    body = []
    by = group(rows, lambda r: (r["model"], r["config"], r["length"]))
    for model in uniq(rows, "model"):
        for config in configs([r for r in rows if r["model"] == model]):
            for length in uniq(rows, "length"):
                rs = by.get((model, config, length))
                if not rs:
                    continue
                ms = mean(1000 * r["decode_s_per_token"] for r in rs if r["decode_s_per_token"])
                body.append([model, config_label(config), fmt_tokens(length), len(rs),
                             num(mean(r["prefill_s"] for r in rs), 3), num(ms, 2),
                             num(mean(r["kv_bytes_peak"] / MiB for r in rs)),
                             num(mean(r["peak_mem_bytes"] / MiB for r in rs))])
    doc.table(header, body, "Latency and memory (means over samples, all tasks)")


def _niah(doc: Doc, rows: list[Row]) -> None:
    doc.heading(2, "NIAH depth × length", "niah")
    grid = [r for r in accuracy_rows(rows) if r["depth"] is not None]
    if not grid:
        return doc.para("No rows with a needle depth (run the niah suite to get this section).", "empty")
    doc.para("Mean score for each needle depth (0% = start of the context) and context length, one panel per "
             "method and budget, one figure per task that records a depth. Green is found, red is missed; "
             "eviction methods lose needles at some depths. Random depths (passkey) are binned by fifths.")
    for (model, task), rs in sorted(group(grid, lambda r: (r["model"], r["task"])).items()):
        title = f"{model} · {task}: mean score by needle depth and context length"
        doc.figure(f"niah-{model}-{task}", niah_figure(rs, title),
                   f"{model}, {task}: {len(rs)} samples, {len(uniq(rs, 'depth'))} depths")


def _ppl(doc: Doc, rows: list[Row], colors) -> None:
    doc.heading(2, "Perplexity vs position", "ppl")
    ppl = [r for r in rows if r["family"] == "ppl"]
    if not ppl:
        return doc.para("No perplexity rows (run the ppl task to get this section).", "empty")
    doc.para("Mean negative log-likelihood of each next token by its position, averaged over texts and smoothed. "
             "A budgeted method follows the dense curve until its cache fills (dotted line), then drifts up.")
    for model, rs in sorted(group(ppl, lambda r: r["model"]).items()):
        if any(r["extra"].get("nll") for r in rs):
            doc.figure(f"ppl-{model}", ppl_figure([r for r in rs if r["extra"].get("nll")], colors, model),
                       f"{model}: per-position NLL ({len(rs)} texts in all)")
        lengths = uniq(rs, "length")
        body = []
        for config in configs(rs):
            crs = [r for r in rs if r["config"] == config]
            cells = []
            for n in lengths:
                sel = [r for r in crs if r["length"] == n]
                p = perplexity(sel)
                cells.append(None if p is None else f"{p:.2f} (n={len(sel)})")
            body.append([config_label(config)] + cells)
        header = ["method @ budget"] + [fmt_tokens(n) for n in lengths]
        doc.table(header, body, f"{model}: perplexity (lower is better)")


def _tables(doc: Doc, rows: list[Row]) -> None:
    doc.heading(2, "Scores per task", "tables")
    acc = accuracy_rows(rows)
    if not acc:
        return doc.para("No accuracy rows.", "empty")
    doc.para("Mean score (%) per task and method @ budget; n is the number of samples per cell (hover a cell for "
             "its own n); the last row is the macro average over tasks.")
    for model, rs in sorted(group(acc, lambda r: r["model"]).items()):
        lengths = uniq(rs, "length")
        for length in [None] + lengths:
            sel = rs if length is None else [r for r in rs if r["length"] == length]
            cfgs = configs(sel)
            header = ["family", "task", "n"] + [config_label(c) for c in cfgs]
            by = group(sel, lambda r: (r["task"], r["config"]))
            tasks = sorted(uniq(sel, "task"), key=lambda t: (_family_rank(sel, t), t))
            body: list[list[Cell]] = []
            for t in tasks:
                fam = next(r["family"] for r in sel if r["task"] == t)
                cells = [by.get((t, c), []) for c in cfgs]
                body.append([fam, t, n_range(cells)] + [score_cell(g) for g in cells])
            totals = [[r for r in sel if r["config"] == c] for c in cfgs]
            body.append(["", "mean over tasks", n_range(totals)] + [score_cell(g) for g in totals])
            where = "all lengths" if length is None else f"{fmt_tokens(length)} context"
            doc.table(header, body, f"{model}: score per task, {where}", collapsed=length is not None)


def _family_rank(rows: list[Row], task: str) -> int:
    fam = next(r["family"] for r in rows if r["task"] == task)
    return FAMILIES.index(fam) if fam in FAMILIES else len(FAMILIES)


# -- entry points -----------------------------------------------------------------------------------------------
def write_report(db_path: str | Path, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.html`` and ``summary.md`` for the results DB at ``db_path`` into ``out_dir``."""
    db_path, out_dir = Path(db_path), Path(out_dir)
    rows = load_rows(db_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    generated = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    colors = palette(list(dict.fromkeys(c[0] for c in configs(rows))))
    doc = Doc()
    meta = _header(doc, rows, db_path, generated)
    if not rows:
        doc.para("The database has no results yet: every section below is empty.", "empty")
    _overall(doc, rows, colors)
    _latency(doc, rows, colors)
    _families(doc, rows, colors)
    _niah(doc, rows)
    _ppl(doc, rows, colors)
    _tables(doc, rows)

    footer = f"Generated by attnkit report from {db_path.name} on {generated}; {doc.n_plots} plots, viewable offline."
    html_path, md_path = out_dir / "report.html", out_dir / "summary.md"
    html_path.write_text(page(f"attnkit report · {db_path.name}", meta, SECTIONS, doc.html, footer), encoding="utf-8")
    md = ["# attnkit evaluation summary\n", "Plots and details: [report.html](report.html)\n",
          "\n".join(f"- **{k}**: {md_esc(v)}" for k, v in meta) + "\n"] + doc.md
    md_path.write_text("\n".join(md), encoding="utf-8")
    return html_path, md_path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="attnkit report", description=__doc__.split("\n")[0])
    parser.add_argument("db", type=Path, help="results database (SQLite)")
    parser.add_argument("-o", "--out", type=Path, default=Path("report"), help="output folder (default: report/)")
    args = parser.parse_args(argv)
    try:
        html_path, md_path = write_report(args.db, args.out)
    except FileNotFoundError as e:
        print(f"attnkit: error: {e}", file=sys.stderr)
        return 2
    print(html_path)
    print(md_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
