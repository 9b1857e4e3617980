"""The README's ranking table from a ranking sweep's database (plain or gzipped SQLite): per method, the mean score
over the RULER tasks at each budget, and the retrieval tasks' mean as a share of dense at two budgets. Cells with
fewer rows than the others are marked with their count, so a partial sweep never reads as a finished one.

    python benchmarks/rank_table.py docs/results/rank_gemma3_16k.db.gz
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from collections import defaultdict
from pathlib import Path

from attnkit.eval.store import read_only
from attnkit.eval.tasks import RULER, SUITES

BUDGETS = (128, 256, 512, 1024, 2048)


def table(con: sqlite3.Connection, shares_at: tuple[int, int] = (256, 1024)) -> str:
    """The Markdown table (methods by their mean at the largest budget, best first)."""
    rows = con.execute("SELECT method, budget, task, AVG(score), COUNT(*) FROM results GROUP BY method, budget, task")
    cells: dict[tuple[str, int | None], dict[str, tuple[float, int]]] = defaultdict(dict)
    for method, budget, task, score, n in rows:
        cells[(method, None if budget in (None, "") else int(budget))][task] = (100 * score, n)
    if ("full", None) not in cells:
        raise SystemExit("no dense (`full`) rows: the shares of dense need them")
    full_n = sum(n for _, n in cells[("full", None)].values())
    retrieval = SUITES["retrieval"]

    def mean(key, tasks) -> float | None:
        got = [cells[key][t][0] for t in tasks if t in cells.get(key, {})]
        return sum(got) / len(got) if got else None

    dense_retrieval = mean(("full", None), retrieval)

    def cell(key) -> str:
        if key not in cells:
            return ""
        n = sum(c[1] for c in cells[key].values())
        value = f"{mean(key, RULER):.1f}"
        return value if n == full_n else f"{value} (n={n})"

    def share(key) -> str:
        s = mean(key, retrieval)
        if s is None or not dense_retrieval:
            return ""
        whole = all(cells[key].get(t, (0, 0))[1] == cells[("full", None)][t][1] for t in retrieval)
        return f"{s / dense_retrieval:.2f}" + ("" if whole else " (partial)")

    methods = sorted({m for m, _ in cells if m != "full"},
                     key=lambda m: -(mean((m, BUDGETS[-1]), RULER) or -1.0))
    out = [f"| method | {' | '.join(map(str, BUDGETS))} | retrieval vs dense at {shares_at[0]} / {shares_at[1]} |",
           "| --- |" + " ---: |" * (len(BUDGETS) + 1),
           f"| full (dense) | {cell(('full', None))} |" + " |" * (len(BUDGETS) - 1) + " 1.00 |"]
    for m in methods:
        text = " / ".join(share((m, b)) for b in shares_at)
        out.append(f"| {m} | " + " | ".join(cell((m, b)) for b in BUDGETS) + f" | {text} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("db", type=Path)
    args = ap.parse_args(argv)
    if not args.db.is_file():
        raise SystemExit(f"{args.db}: no such database")
    sys.stdout.write(table(read_only(args.db)))


if __name__ == "__main__":
    main()
