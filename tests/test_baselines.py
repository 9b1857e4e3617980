"""docs/baselines.md: the committed databases are complete, and the doc's tables are what they hold."""

from __future__ import annotations

import importlib.util
import sqlite3
from pathlib import Path

import pytest

from attnkit.eval.tasks import RULER

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "baselines.md"
RUNS = {  # database -> the lengths the issue asks for
    "smollm2-135m_full.db": [2048, 4096, 8192],
    "gemma3-270m_full.db": [2048, 4096, 8192, 16384],
}


def baselines_table():
    spec = importlib.util.spec_from_file_location("baselines_table", ROOT / "benchmarks" / "baselines_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", RUNS)
def test_every_ruler_cell_has_20_samples(name):
    con = sqlite3.connect(f"file:{ROOT / 'docs' / 'baselines' / name}?mode=ro", uri=True)
    counts = dict(((t, n), c) for t, n, c in con.execute(
        "SELECT task, length, COUNT(DISTINCT sample_index) FROM results WHERE method = 'full' GROUP BY task, length"))
    assert counts == {(task, n): 20 for task in RULER for n in RUNS[name]}


@pytest.mark.parametrize("name", RUNS)
def test_doc_tables_match_the_databases(name, capsys):
    baselines_table().main([str(ROOT / "docs" / "baselines" / name)])
    table = capsys.readouterr().out.strip()
    assert table.count("(n=20)") == 13 * len(RUNS[name])
    assert table in DOC.read_text()
