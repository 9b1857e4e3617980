"""The recall vs state-size frontier of stored zoo runs: a Markdown table and an SVG plot per MQAR shape.

As Zoology reports it: for each model (mixers, width) and task shape (T, N), the best test accuracy over the
runs stored for it (the learning-rate sweep, seeds), plotted against the state a decode step carries at T. Runs
trained with TF32 matmuls are a separate line. A run trained on a data mixture contributes one point per test
config (its ``slices_json``), as Zoology slices its validation accuracy.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any


def frontier(rows: list[dict[str, Any]]) -> dict[tuple[int, int], dict[str, list[tuple[int, float, int]]]]:
    """{(T, N): {mixers: [(state_size, best accuracy, d_model), ...] sorted by state}} over stored runs."""
    best: dict[tuple, tuple[int, float]] = {}
    for r in rows:
        for t, n, state, acc in points(r):
            key = (t, n, mixers_label(r), r["d_model"])
            if key not in best or acc > best[key][1]:
                best[key] = (state, acc)
    out: dict[tuple[int, int], dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for (t, n, mixers, d), (state, acc) in best.items():
        out[(t, n)][mixers].append((state, acc, d))
    return {shape: {m: sorted(points) for m, points in sorted(per.items())} for shape, per in sorted(out.items())}


def points(row: dict[str, Any]) -> list[tuple[int, int, int, float]]:
    """[(T, N, state size, accuracy)]: a mixture run's test configs, else the run's one shape."""
    slices = json.loads(row.get("slices_json") or "{}")
    if not slices:
        return [(row["seq_len"], row["num_kv_pairs"], row["state_size"], row["accuracy"])]
    out = []
    for shape, (acc, state) in slices.items():
        t, n = shape.split("x")
        out.append((int(t), int(n), int(state), float(acc)))
    return out


def mixers_label(row: dict[str, Any]) -> str:
    """The row's mixers, marked " (tf32)" for runs trained with TF32 matmuls: never pooled with float32 runs."""
    precision = json.loads(row.get("config_json") or "{}").get("precision", "float32")
    return row["mixers"] + ("" if precision == "float32" else f" ({precision})")


def markdown(front: dict) -> str:
    lines = ["| T x N | mixers | d_model | state size | best accuracy |", "| --- | --- | ---: | ---: | ---: |"]
    for (t, n), per in front.items():
        for mixers, points in per.items():
            for state, acc, d in points:
                lines.append(f"| {t}x{n} | {mixers} | {d} | {state:,} | {acc:.3f} |")
    return "\n".join(lines) + "\n"


def plot(front: dict, path: Path) -> None:
    """One panel per shape: accuracy against state size (log scale), one line per mixer stack."""
    import matplotlib
    from matplotlib.figure import Figure

    from attnkit.eval.report_plots import RC

    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(4.2 * max(1, len(front)), 3.6), layout="constrained")
        axes = fig.subplots(1, max(1, len(front)), squeeze=False)[0]
        for ax, ((t, n), per) in zip(axes, front.items()):
            for mixers, points in per.items():
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=mixers)
            ax.set_xscale("log")
            ax.set_ylim(0, 1.02)
            ax.set_title(f"MQAR T={t}, N={n}")
            ax.set_xlabel("state size (floats per sequence)")
            ax.set_ylabel("accuracy")
        axes[0].legend(loc="lower right")
        fig.savefig(path, format="svg")


def write_report(db: str | Path, out: str | Path) -> dict:
    """frontier.md, frontier.svg and frontier.json under ``out`` from the database's zoo runs."""
    import sqlite3

    from attnkit.eval.store import read_only

    con = read_only(db)  # a report changes nothing in the file (also reads a .gz / .xz copy)
    try:
        con.row_factory = sqlite3.Row
        table = con.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='zoo_runs'").fetchone()
        stored = [dict(r) for r in con.execute("SELECT * FROM zoo_runs ORDER BY id")] if table else []
    finally:
        con.close()
    rows = [r for r in stored if r["task"] == "mqar"]  # passkey rows have no state-size frontier
    if not rows:
        raise ValueError(f"{db} holds no MQAR runs; run `attnkit zoo train` or `attnkit zoo sweep` first")
    front = frontier(rows)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "frontier.md").write_text(markdown(front))
    plot(front, out / "frontier.svg")
    serial = {f"{t}x{n}": per for (t, n), per in front.items()}
    (out / "frontier.json").write_text(json.dumps(serial, indent=2))
    return serial
