"""Turn a results database of `full`-attention RULER runs into the Markdown tables of docs/baselines.md.

    python benchmarks/baselines_table.py results/baselines.db > docs/baselines_table.md
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from collections import defaultdict

from attnkit.eval.tasks import RULER


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("db")
    ap.add_argument("--method", default="full")
    args = ap.parse_args(argv)
    con = sqlite3.connect(args.db)
    rows = con.execute(
        "SELECT model, task, length, AVG(score), COUNT(*), MIN(device), MIN(dtype) FROM results "
        "WHERE method = ? GROUP BY model, task, length",
        (args.method,),
    ).fetchall()
    table: dict[str, dict[tuple[str, int], tuple[float, int]]] = defaultdict(dict)
    info: dict[str, tuple[str, str]] = {}
    for model, task, length, score, n, device, dtype in rows:
        table[model][(task, length)] = (score, n)
        info[model] = (device, dtype)
    out = sys.stdout
    for model, cells in table.items():
        lengths = sorted({length for _, length in cells})
        out.write(f"### {model} ({args.method}; {info[model][0]}, {info[model][1]})\n\n")
        out.write("| task | " + " | ".join(f"{n // 1024}K" for n in lengths) + " |\n")
        out.write("| --- |" + " ---: |" * len(lengths) + "\n")
        means = defaultdict(list)
        for task in [t for t in RULER if any((t, n) in cells for n in lengths)]:
            vals = []
            for n in lengths:
                if (task, n) in cells:
                    score, count = cells[(task, n)]
                    means[n].append(score)
                    vals.append(f"{100 * score:.1f} (n={count})")
                else:
                    vals.append("-")
            out.write(f"| {task} | " + " | ".join(vals) + " |\n")
        avg = [f"**{100 * sum(means[n]) / len(means[n]):.1f}**" if means[n] else "-" for n in lengths]
        out.write("| **mean** | " + " | ".join(avg) + " |\n\n")


if __name__ == "__main__":
    main()
