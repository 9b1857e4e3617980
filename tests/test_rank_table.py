"""The README's ranking tables hold what the committed sweep databases hold (benchmarks/rank_table.py), and a
partial sweep's cells are marked as partial."""

from __future__ import annotations

import importlib.util
import re
import sqlite3
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def rank_table():
    spec = importlib.util.spec_from_file_location("rank_table", ROOT / "benchmarks" / "rank_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def numbers(row: str) -> list[str]:
    """The cells of a Markdown table row without labels' bold marks: '| fasa (calibrated) | **36.1** |' -> ['36.1']."""
    return [c.strip().replace("*", "") for c in row.strip().strip("|").split("|")[1:]]


@pytest.mark.parametrize("db, first_row, methods", [
    ("rank_smollm2_4k.db.gz", "| full (dense) | 35.4 |", 12),
    ("rank_gemma3_16k.db.gz", "| full (dense) | 15.2 |", 12),
])
def test_readme_table_matches_the_database(db, first_row, methods):
    mod = rank_table()
    generated = mod.table(mod.read_only(ROOT / "docs" / "results" / db)).splitlines()[2:]
    readme = (ROOT / "README.md").read_text().splitlines()
    start = readme.index(next(line for line in readme if line.startswith(first_row)))
    shown = {re.match(r"\| ([a-z_0-9]+)", r).group(1): r for r in readme[start:start + len(generated)]}
    assert len(shown) == len(generated) == (methods or len(generated))
    for row in generated:
        method = re.match(r"\| ([a-z_0-9]+)", row).group(1)
        assert numbers(shown[method]) == numbers(row), method


def test_partial_cells_carry_their_counts(tmp_path):
    con = sqlite3.connect(tmp_path / "r.db")
    con.execute("CREATE TABLE results (method TEXT, budget TEXT, task TEXT, score REAL)")
    mod = rank_table()
    rows = [("full", None, t, 1.0) for t in mod.RULER for _ in range(2)]
    rows += [("quest", "128", t, 0.5) for t in mod.RULER for _ in range(2)]
    rows += [("quest", "256", "niah_single_1", 1.0)]  # one row of 26
    con.executemany("INSERT INTO results VALUES (?, ?, ?, ?)", rows)
    table = mod.table(con)
    assert "| full (dense) | 100.0 | | | | | 1.00 |" in table
    assert "| quest | 50.0 | 100.0 (n=1) |  |  |  | 1.00 (partial) /  |" in table
