"""The README's ZeroTuning / ACT tables are what the committed result files hold (benchmarks/sinks_table.py), and
the table's cells and family means are computed as stated."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ("sinks_smollm2.json", "sinks_gemma3.json")


def sinks_table():
    spec = importlib.util.spec_from_file_location("sinks_table", ROOT / "benchmarks" / "sinks_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", RESULTS)
def test_readme_tables_match_the_result_files(name):
    data = json.loads((ROOT / "docs" / "results" / name).read_text())
    table = sinks_table().table(data)
    assert table.count("\n") >= 3  # header, rule, at least one task and a mean
    assert table in (ROOT / "README.md").read_text()


def test_cells_and_family_means():
    mod = sinks_table()
    runs = {
        "sst2": {"full": {"accuracy": 50.0, "n": 4}, "act": {"accuracy": 75.0, "vs_full": [25.0, 0.0, 50.0]}},
        "trec": {"full": {"accuracy": 50.0, "n": 4}, "act": {"accuracy": 25.0, "vs_full": [-25.0, -50.0, 0.0]},
                 "zerotuning": {"accuracy": 100.0, "vs_full": [50.0, 25.0, 75.0]}},
        "piqa": {"full": {"accuracy": 40.0, "n": 5}, "act": {"accuracy": 60.0, "vs_full": [20.0, 0.0, 40.0]}},
    }
    assert mod.cell(None) == "not run"
    assert mod.cell(runs["sst2"]["act"]) == "75.0 (+25.0 [+0.0, +50.0])"
    means = mod.family_means(runs, mod.CLASSIFICATION)
    assert means == {"act": (0.0, 1, 2), "zerotuning": (50.0, 1, 1)}
    table = mod.table({"runs": runs})
    assert "| mean change, multiple choice | | | - | - | +20.0 (gains on 1 of 1) |" in table
    assert table.index("| TREC |") < table.index("| PIQA |")  # the README's task order, not the file's


def test_merge_from_takes_each_task_whole_from_the_file_with_more_methods(tmp_path):
    spec = importlib.util.spec_from_file_location("sinks_fidelity", ROOT / "benchmarks" / "sinks_fidelity.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    settings = {"model": "m", "dtype": "float32", "calib": 64, "eval": 500, "mode": "head"}
    run = lambda dev: {"accuracy": 50.0, "device": dev}  # noqa: E731
    ours = {**settings, "runs": {"mr": {"full": run("cpu"), "zerotuning": run("cpu")}, "cb": {"full": run("cpu")}}}
    theirs = {**settings, "runs": {"mr": {"full": run("gpu")}, "cb": {"full": run("gpu"), "act": run("gpu")},
                                   "piqa": {"full": run("gpu")}}}
    (tmp_path / "ours.json").write_text(json.dumps(ours))
    (tmp_path / "theirs.json").write_text(json.dumps(theirs))
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "cb_act.json").write_text("{}")
    (tmp_path / "theirs" / "mr_act.json").write_text("{}")
    assert mod.main(["--out", str(tmp_path / "ours.json"), "--merge-from", str(tmp_path / "theirs.json")]) == 0
    runs = json.loads((tmp_path / "ours.json").read_text())["runs"]
    assert {t: sorted(r) for t, r in runs.items()} == {"mr": ["full", "zerotuning"], "cb": ["act", "full"],
                                                       "piqa": ["full"]}
    assert runs["mr"]["full"]["device"] == "cpu" and runs["cb"]["full"]["device"] == "gpu"  # never mixed in a task
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["cb_act.json"]
    theirs["eval"] = 100
    (tmp_path / "theirs.json").write_text(json.dumps(theirs))
    with pytest.raises(SystemExit, match=r"settings .* differ"):
        mod.main(["--out", str(tmp_path / "ours.json"), "--merge-from", str(tmp_path / "theirs.json")])
