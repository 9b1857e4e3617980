"""Sweeps on a tiny random Llama with a byte tokenizer and two fake tasks: the grid, budgets, shards, resuming after
Ctrl-C and kill -9, concurrent sweeps on one database, the Ray executor and the ``eval`` / ``report`` commands.

This module doubles as the sweep plugin of its subprocesses and Ray workers: ``--plugin test_runner:install``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import signal
import sqlite3
import string
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

import attnkit
from attnkit.eval import runner
from attnkit.eval import tasks as tasks_mod
from attnkit.eval.sample import Sample
from attnkit.eval.store import Store, source_hash
from tiny import tiny_llama  # tests/ is on sys.path (conftest.py)

TESTS = Path(__file__).parent
PLUGIN = "test_runner:install"


# -- the plugin: a byte tokenizer, a tiny model, two fake tasks ---------------------------------------------------
class StubTokenizer:
    """Bytes as token ids (vocab 256). ``FAKE_DELAY`` (seconds per call) slows sweeps down for the kill tests."""

    eos_token_id = None
    chat_template = None

    def __init__(self) -> None:
        self.delay = float(os.environ.get("FAKE_DELAY", "0"))

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        if self.delay:
            time.sleep(self.delay)
        ids = list(text.encode("utf-8"))
        return types.SimpleNamespace(input_ids=torch.tensor([ids]) if return_tensors == "pt" else ids)

    def decode(self, tokens, skip_special_tokens=True):
        return bytes(t % 256 for t in tokens).decode("utf-8", errors="replace")


class FakeTask:
    """Random letters sized to ``length`` bytes; sample i depends only on (seed, length, i), as tasks must."""

    def __init__(self, name: str, kind: str) -> None:
        self.name, self.kind = name, kind
        self.family = "ppl" if kind == "ppl" else "retrieval"

    def samples(self, tokenizer, length, n, seed, chat=True):
        out = []
        for i in range(n):
            rng = random.Random(f"{self.name}-{seed}-{length}-{i}")
            body = "".join(rng.choice(string.ascii_lowercase + " ") for _ in range(length - 12))
            out.append(Sample(self.name, i, length, body, "" if self.kind == "ppl" else "A:", (rng.choice("aeiou"),),
                              4, "string_match_all", {"depth": i / max(1, n - 1)} if self.kind != "ppl" else {}))
        return out


def install() -> None:
    tasks_mod.register_task("fake_gen", FakeTask("fake_gen", "generate"))
    tasks_mod.register_task("fake_ppl", FakeTask("fake_ppl", "ppl"))
    def load(device, dtype):
        return tiny_llama(dtype=getattr(torch, dtype or "float32")).to(device), StubTokenizer()

    runner.register_model("tiny", load, "tiny-llama-0")


def uninstall() -> None:
    for name in ("fake_gen", "fake_ppl"):
        tasks_mod._TASKS.pop(name, None)
    runner._MODELS.pop("tiny", None)
    runner._LOADED.clear()


@pytest.fixture(scope="module", autouse=True)
def fake():
    install()
    yield
    uninstall()


# -- helpers ------------------------------------------------------------------------------------------------------
GRID = dict(models=["tiny"], methods=["full", "streaming_llm", "snapkv"], budgets=["48"],
            tasks=["fake_gen", "fake_ppl"], lengths=[96, 160], samples=3, seed=7, plugins=[PLUGIN])  # fmt: skip
N_ROWS = 12 * 3  # full: 2 tasks x 2 lengths; streaming_llm and snapkv: the same at one budget
ARGV = ["--model", "tiny", "--methods", "full,streaming_llm,snapkv", "--budgets", "48", "--tasks", "fake_gen,fake_ppl",
        "--lengths", "96,160", "--samples", "3", "--seed", "7", "--device", "cpu", "--plugin", PLUGIN]  # fmt: skip


def config(**over) -> runner.SweepConfig:
    return runner.SweepConfig(**{**GRID, **over})


def results(db, digits: int | None = None) -> set[tuple]:
    """What must not depend on interruptions: (cell_key, sample_index, score, prediction); asserts no duplicates."""
    with Store(db) as store:
        rows = store.rows()
    keys = [(r["cell_key"], r["sample_index"]) for r in rows]
    assert len(keys) == len(set(keys)), "duplicated rows"
    return {(r["cell_key"], r["sample_index"], r["score"] if digits is None else round(r["score"], digits),
             r["prediction"]) for r in rows}  # fmt: skip


def count(db: Path) -> int:
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return conn.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


def sweep_process(db: Path, *extra: str, delay: float = 0.0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "FAKE_DELAY": str(delay)}  # fmt: skip
    cmd = [sys.executable, "-m", "attnkit", "eval", *ARGV, "--db", str(db), "--no-progress", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> set[tuple]:
    """The rows of one uninterrupted in-process sweep."""
    db = tmp_path_factory.mktemp("ref") / "ref.db"
    result = runner.run_sweep(config(), str(db), progress=False)
    assert result.written == N_ROWS and result.stored == result.total == N_ROWS
    return results(db)


# -- parsing and the grid -------------------------------------------------------------------------------------------
def test_budget_parsing():
    assert runner.parse_budget("512") == ("tokens", 512)
    assert runner.parse_budget(" 1 ") == ("tokens", 1)
    assert runner.parse_budget("0.25") == ("ratio", 0.25)
    assert runner.parse_budget("1.0") == ("ratio", 1.0)
    assert runner.parse_budget("25%") == ("ratio", 0.25)
    assert runner.resolve_budget("0.25", 2048) == 512
    assert runner.resolve_budget("0.001", 100) == 1  # a ratio never resolves to 0 tokens
    assert runner.resolve_budget("300", 100) == 300  # a budget past the length just evicts nothing
    for bad in ["0", "-5", "1.5", "0.0", "abc", "", "nan", "150%", "12k"]:
        with pytest.raises(ValueError, match="accepted: a token count >= 1"):
            runner.parse_budget(bad)


def test_lengths_and_shard_parsing():
    assert runner.parse_lengths("2048,4k,8K,2048") == [2048, 4096, 8192]
    for bad in ["abc", "8", "0", ""]:
        with pytest.raises(ValueError):
            runner.parse_lengths(bad)
    assert runner.parse_shard("1/4") == (1, 4) and runner.parse_shard("0/1") == (0, 1)
    for bad in ["4/4", "-1/2", "1", "a/b", "0/0"]:
        with pytest.raises(ValueError, match="accepted: i/n"):
            runner.parse_shard(bad)


def grid(**over) -> list[runner.Cell]:
    cfg = config(**over)
    return runner.build_grid(cfg, {m: f"hash-{m}" for m in cfg.models})


def test_grid_collapses_full_dedupes_budgets_and_resolves_ratios():
    cells = grid(models=["a", "b"], budgets=["64", "0.5"], lengths=[128, 256])
    assert [c.key for c in cells] == [c.key for c in grid(models=["a", "b"], budgets=["64", "0.5"], lengths=[128, 256])]
    assert len({c.key for c in cells}) == len(cells)
    per_model = [c for c in cells if c.model == "a"]
    full = [c for c in per_model if c.method == "full"]
    assert len(full) == 4 and all(c.budget == "" and c.budget_tokens is None for c in full)
    snap = [(c.task, c.length, c.budget, c.budget_tokens) for c in per_model if c.method == "snapkv"]
    # 0.5 of 128 is 64 tokens: the same cell as budget 64, kept once (under the budget listed first)
    assert snap == [("fake_gen", 128, "64", 64), ("fake_gen", 256, "64", 64), ("fake_ppl", 128, "64", 64),
                    ("fake_ppl", 256, "64", 64), ("fake_gen", 256, "0.5", 128),
                    ("fake_ppl", 256, "0.5", 128)]  # fmt: skip
    assert len(cells) == 2 * (4 + 6 + 6)
    c = next(c for c in cells if c.method == "streaming_llm" and c.budget == "0.5" and c.length == 256)
    assert c.settings == {"sinks": 4, "window": 124} and c.dtype == "float32" and c.label() == "streaming_llm/0.5"


def test_cell_keys_ignore_sample_count_and_track_the_config():
    base = {c.key for c in grid()}
    assert {c.key for c in grid(samples=50)} == base  # more samples later reuse the finished ones
    assert {c.key for c in grid(shard=(1, 2))} == base  # the grid is the same; shards pick from it
    for over in [dict(seed=8), dict(chat=False), dict(prefill_chunk=64), dict(dtype="bfloat16"), dict(budgets=["40"])]:
        changed = {c.key for c in grid(**over)}
        assert changed != base and (over.get("budgets") or not changed & base), over
    cfg = config()
    other = runner.build_grid(cfg, {"tiny": "another-file"})
    assert not {c.key for c in other} & base
    on_gpu1 = {c.key for c in grid(device="cuda:1", dtype="float32")}
    assert on_gpu1 == {c.key for c in grid(device="cuda", dtype="float32")}  # the GPU index is not part of the key


@pytest.mark.parametrize("n", [1, 2, 3, 5, 40])
def test_shards_partition_the_grid(n):
    cells = grid(budgets=["32", "48", "0.5"], lengths=[96, 160, 224])
    parts = [runner.shard(cells, i, n) for i in range(n)]
    keys = [c.key for part in parts for c in part]
    assert len(keys) == len(set(keys)) == len(cells)  # disjoint, and together the whole grid
    assert set(keys) == {c.key for c in cells}
    assert max(map(len, parts)) - min(map(len, parts)) <= 1  # balanced


def test_invalid_sweeps_fail_with_one_line():
    with pytest.raises(ValueError, match="budget 3 .* for snapkv: snapkv: window=0 is invalid"):
        grid(budgets=["3"])
    with pytest.raises(ValueError, match="unknown method 'snapkw'.*did you mean 'snapkv'"):
        grid(methods=["snapkw"])
    with pytest.raises(ValueError, match="unknown task 'fake_genn'"):
        grid(tasks=["fake_genn"])
    with pytest.raises(ValueError, match="give --budgets for snapkv"):
        grid(methods=["full", "snapkv"], budgets=[])
    assert len(grid(methods=["full"], budgets=[])) == 4  # full needs none
    with pytest.raises(ValueError, match="samples=0"):
        grid(samples=0)


# -- running --------------------------------------------------------------------------------------------------------
def test_rows_record_scores_costs_and_provenance(tmp_path):
    db = tmp_path / "r.db"
    # chunks of 32: eviction methods then hold at most budget + 32 tokens, below the full 150-token prompt
    cfg = config(lengths=[160], methods=["full", "streaming_llm"], samples=2, prefill_chunk=32)
    runner.run_sweep(cfg, str(db), progress=False)
    with Store(db) as store:
        rows = store.rows()
    assert len(rows) == 2 * 2 * 2
    for r in rows:
        assert r["model"] == "tiny" and r["model_hash"] == "tiny-llama-0" and r["device"] == "cpu"
        assert r["dtype"] == "float32" and r["attnkit_version"] == attnkit.__version__ and r["git_commit"]
        assert json.loads(r["config_json"])["attnkit_source"] == source_hash()
        assert r["prefill_s"] > 0 and r["peak_mem_bytes"] > 2**20 and r["length"] == 160 and r["seed"] == 7
        cfg = json.loads(r["config_json"])
        assert cfg["model"] == "tiny" and cfg["task"] == r["task"] and cfg["settings"] == json.loads(r["settings_json"])
        key_fields = ("model_hash", "method", "settings", "task", "length", "seed", "chat", "dtype", "device",
                      "prefill_chunk")  # fmt: skip
        assert runner.cell_key({k: cfg[k] for k in key_fields}) == r["cell_key"]
        extra = json.loads(r["extra_json"])
        if r["task"] == "fake_ppl":
            assert r["family"] == "ppl" and r["prediction"] == "" and r["decode_s_per_token"] is None
            assert len(extra["nll"]) == r["prompt_tokens"] - 1 == 160 - 12 - 1
            assert r["score"] == pytest.approx(math.exp(sum(extra["nll"]) / len(extra["nll"])), rel=1e-3)
        else:
            assert r["family"] == "retrieval" and r["depth"] == r["sample_index"]  # i / (n - 1) with n = 2
            assert r["decode_s_per_token"] > 0 and extra["new_tokens"] == 4 and 0 <= r["score"] <= 1
            assert r["prompt_tokens"] == 160 - 12 + 2 and json.loads(r["references_json"])[0] in "aeiou"
    kv = {(r["method"], r["task"]): r["kv_bytes_peak"] for r in rows}
    assert kv[("streaming_llm", "fake_gen")] < kv[("full", "fake_gen")]
    streaming = next(r for r in rows if r["method"] == "streaming_llm")
    assert streaming["budget"] == "48" and streaming["budget_tokens"] == 48
    assert json.loads(streaming["settings_json"]) == {"sinks": 4, "window": 44}


def test_sparse_prefill_rows_record_the_share_read(tmp_path):
    db = tmp_path / "s.db"
    cfg = config(lengths=[160], methods=["dhsa"], tasks=["fake_gen"], samples=1, prefill_chunk=160)
    runner.run_sweep(cfg, str(db), progress=False)
    with Store(db) as store:
        rows = store.rows()
    shares = [json.loads(r["extra_json"])["prefill_read_share"] for r in rows]
    assert shares and all(0 < s < 1 for s in shares)


def test_more_samples_later_reuse_the_stored_ones(tmp_path, reference):
    db = tmp_path / "r.db"
    assert runner.run_sweep(config(samples=2), str(db), progress=False).written == 12 * 2
    with Store(db) as store:
        before = {(r["cell_key"], r["sample_index"]): r["id"] for r in store.rows()}
    again = runner.run_sweep(config(samples=3), str(db), progress=False)
    assert again.written == 12 and again.stored == N_ROWS
    with Store(db) as store:
        assert all(before[(r["cell_key"], r["sample_index"])] == r["id"] for r in store.rows() if r["sample_index"] < 2)
    assert results(db) == reference
    assert runner.run_sweep(config(), str(db), progress=False).written == 0  # complete: nothing loaded or run


def test_batched_sweep_gives_the_unbatched_rows(tmp_path, reference):
    db = tmp_path / "r.db"
    result = runner.run_sweep(config(batch=2), str(db), progress=False)  # 3 samples: a batch of 2, then 1
    assert result.written == N_ROWS
    digits = lambda rows: {(k, i, round(s, 4), p) for k, i, s, p in rows}  # noqa: E731
    assert digits(results(db)) == digits(reference)
    with Store(db) as store:
        rows = store.rows()
    sizes = {(r["task"], r["sample_index"]): json.loads(r["extra_json"])["batch"] for r in rows}
    assert sizes[("fake_gen", 0)] == sizes[("fake_gen", 1)] == 2 and sizes[("fake_gen", 2)] == 1
    assert sizes[("fake_ppl", 0)] == 1  # perplexity samples run one at a time
    with pytest.raises(ValueError, match="batch=0"):
        runner.run_cell(runner.build_grid(config(), {"tiny": "tiny-llama-0"})[0], Store(tmp_path / "x.db"), 1, batch=0)


def test_a_cell_out_of_gpu_memory_retries_one_sample_at_a_time_then_is_named(tmp_path, monkeypatch, reference):
    """GPU out of memory in a batched cell: the cell runs again one sample at a time; a cell that runs out even so
    is skipped (the sweep goes on) and named in one error at the end, every other row stored."""
    from attnkit.eval import executors

    real = executors.run_cell
    sizes = []

    def run_cell(cell, store, n, done=None, on_sample=None, device=None, batch=1):
        sizes.append(batch)
        if batch > 1 or (cell.method == "snapkv" and cell.length == 160 and cell.task == "fake_gen"):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 39.31 GiB.")
        return real(cell, store, n, done, on_sample=on_sample, device=device, batch=batch)

    monkeypatch.setattr(executors, "run_cell", run_cell)
    db = tmp_path / "r.db"
    with pytest.raises(MemoryError, match=r"1 cell\(s\) ran out of GPU memory .*snapkv 48 fake_gen @ 160"):
        runner.run_sweep(config(batch=2), str(db), progress=False)
    assert sizes.count(2) == 12 and sizes.count(1) == 12  # every cell tried batched, then one at a time
    digits = lambda rows: {(k, i, round(s, 4), p) for k, i, s, p in rows}  # noqa: E731
    assert digits(results(db)) < digits(reference) and count(db) == N_ROWS - 3


def test_set_overrides_a_setting_on_top_of_the_budget_mapping():
    cells = runner.build_grid(config(overrides={"snapkv": {"window": 8}}), {"tiny": "tiny-llama-0"})
    snap = [c for c in cells if c.method == "snapkv"]
    plain = [c for c in runner.build_grid(config(), {"tiny": "tiny-llama-0"}) if c.method == "snapkv"]
    assert snap and all(c.settings["window"] == 8 for c in snap)
    assert {c.settings["budget"] for c in snap} == {c.settings["budget"] for c in plain}  # the budget mapping kept
    assert {c.key for c in snap}.isdisjoint(c.key for c in plain)


def test_ctrl_c_then_rerun_gives_the_uninterrupted_rows(tmp_path, monkeypatch, reference):
    db = tmp_path / "r.db"
    runner.get_model("tiny", "cpu", "float32")  # loaded (and warmed up) before generate is patched
    calls = []
    real_generate, real_ppl = attnkit.generate, attnkit.perplexity

    def interrupt_after(real, k):
        def fn(*args, **kwargs):
            calls.append(1)
            if len(calls) > k:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        return fn

    monkeypatch.setattr(attnkit, "generate", interrupt_after(real_generate, 7))
    monkeypatch.setattr(attnkit, "perplexity", interrupt_after(real_ppl, 7))
    with pytest.raises(KeyboardInterrupt):
        runner.run_sweep(config(), str(db), progress=False)
    assert count(db) == 7  # every sample scored before the interrupt is stored
    monkeypatch.setattr(attnkit, "generate", real_generate)
    monkeypatch.setattr(attnkit, "perplexity", real_ppl)
    result = runner.run_sweep(config(), str(db), progress=False)
    assert result.written == N_ROWS - 7
    assert results(db) == reference


def test_sigkill_mid_sweep_then_rerun_gives_the_uninterrupted_rows(tmp_path, reference):
    db = tmp_path / "r.db"
    proc = sweep_process(db, delay=0.1)
    deadline = time.time() + 120
    while count(db) < 5 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert 5 <= count(db) < N_ROWS
    proc = sweep_process(db)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    assert results(db) == reference
    assert f"{N_ROWS} in {db}" in err


def test_concurrent_sweeps_on_one_database(tmp_path, reference):
    db = tmp_path / "r.db"
    procs = [sweep_process(db, delay=0.01), sweep_process(db, delay=0.01),
             sweep_process(db, "--shard", "1/2", delay=0.01)]  # the same grid twice, and an overlapping shard
    outs = [p.communicate(timeout=240) for p in procs]
    for proc, (out, err) in zip(procs, outs):
        assert proc.returncode == 0, err
        assert "locked" not in err and "Traceback" not in err
    assert results(db) == reference


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed (pip install 'ray>=2.9')")
def test_ray_executor_on_a_local_cpu_instance(tmp_path, reference):
    db = tmp_path / "r.db"
    runner.run_sweep(config(methods=["full"], samples=1), str(db), progress=False)  # partly done: Ray skips it
    result = runner.run_sweep(config(), str(db), executor="ray", progress=False)
    assert result.written == N_ROWS - 4 and result.stored == N_ROWS
    # Ray workers run torch on one thread: float sums may round differently, so perplexities match to 4 digits
    assert results(db, digits=4) == {(k, i, round(s, 4), p) for k, i, s, p in reference}


# -- the command line -----------------------------------------------------------------------------------------------
@pytest.fixture
def loads(monkeypatch):
    calls = []
    real = runner.load
    monkeypatch.setattr(runner, "load", lambda *a: calls.append(a) or real(*a))
    runner._LOADED.clear()
    return calls


def cli_run(capsys, *argv):
    from attnkit import cli

    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


@pytest.mark.parametrize("change, words", [
    (["--methods", "full,snapkw"], "unknown method 'snapkw' (did you mean 'snapkv'?)"),
    (["--tasks", "fake_gen,fake_genn"], "unknown task 'fake_genn'"),
    (["--budgets", "48,1.5"], "budget '1.5' is invalid"),
    (["--budgets", "3"], "budget 3 (3 tokens at length 96) for snapkv"),
    (["--lengths", "96,abc"], "length 'abc' is invalid"),
    (["--shard", "2/2"], "shard '2/2' is invalid"),
    (["--model", "tiny,smolm2-135m"], "unknown model 'smolm2-135m'"),
    (["--plugin", "no_such_module"], "--plugin no_such_module: cannot import"),
    (["--set", "snapkv.windoww=8"], "snapkv has no setting 'windoww'"),
    (["--methods", "full", "--set", "full.x=1"], "full has no setting 'x'; accepted: none (full has no settings)"),
    (["--set", "quest.page_size=8"], "'quest' is not among the swept methods"),
    (["--set", "snapkv.window=0"], "for snapkv: snapkv: window=0"),
    (["--device", "tpu"], "device 'tpu' is invalid; accepted: cpu, cuda, cuda:N"),
])  # fmt: skip
def test_eval_validates_everything_before_loading(capsys, loads, tmp_path, change, words):
    argv = list(ARGV)
    for i in range(0, len(change), 2):
        flag = change[i]
        if flag in argv and flag != "--plugin":
            argv[argv.index(flag) + 1] = change[i + 1]
        else:
            argv += change[i : i + 2]
    code, _, err = cli_run(capsys, "eval", *argv, "--db", str(tmp_path / "r.db"))
    assert code == 2 and err.startswith("attnkit: error: ") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r.db").exists()  # a typo creates no database
    assert words in err, err
    assert loads == []


def test_eval_command_prints_a_summary_and_resumes(capsys, loads, tmp_path, reference):
    db = tmp_path / "r.db"
    code, out, err = cli_run(capsys, "eval", *ARGV, "--db", str(db), "--shard", "0/2", "--no-progress")
    assert code == 0 and "shard 0/2: 6 of 12 cells" in err and f"18 new rows, 18 in {db}" in err
    code, out, err = cli_run(capsys, "eval", *ARGV, "--db", str(db), "--no-progress")
    assert code == 0 and f"18 new rows, {N_ROWS} in {db}" in err
    assert results(db) == reference
    lines = out.strip().splitlines()
    assert lines[0] == "| method | budget | fake_gen | fake_ppl (ppl) | avg | ms/token | peak KV MiB |"
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["full", "streaming_llm", "snapkv"]
    assert all("-" not in line.replace("---", "").split("|")[3] for line in lines[2:])
    assert len(loads) == 1  # one model load per process
    code, out, err = cli_run(capsys, "eval", *ARGV, "--db", str(db), "--no-progress")
    assert code == 0 and f"0 new rows, {N_ROWS} in {db}" in err and len(loads) == 1  # nothing to do: nothing loaded


def test_eval_without_bars_logs_one_line_per_finished_cell(capsys, loads, tmp_path):
    db = str(tmp_path / "r.db")
    code, _, err = cli_run(capsys, "eval", *ARGV, "--db", db, "--shard", "0/2", "--no-progress")
    lines = [line.split(" eval: ", 1)[1] for line in err.splitlines() if " eval: cell " in line]
    assert code == 0 and [line.split(" ", 2)[1] for line in lines] == [f"{i}/6" for i in range(1, 7)]
    assert all(" 3 new samples, " in line and line.endswith(" s") for line in lines), lines
    assert sum(", score " in line for line in lines) == sum(" fake_gen @ " in line for line in lines) == 3
    assert sum(", ppl " in line for line in lines) == 3
    code, _, err = cli_run(capsys, "eval", *ARGV, "--db", db, "--shard", "0/2", "--no-progress")
    assert code == 0 and " eval: cell " not in err  # complete cells are skipped without a line


def test_cells_past_the_trained_context_are_noted_once_per_length(capsys, monkeypatch, tmp_path):
    real = runner.load

    def short_trained(*args):  # the tiny model, said to be trained on 128 positions (the sweep runs 96 and 160)
        model, tok = real(*args)
        model.config.max_position_embeddings = 128
        return model, tok

    monkeypatch.setattr(runner, "load", short_trained)
    monkeypatch.setattr(runner, "_NOTED", set())
    runner._LOADED.clear()
    code, _, err = cli_run(capsys, "eval", *ARGV, "--db", str(tmp_path / "r.db"), "--no-progress")
    notes = [line for line in err.splitlines() if "eval: note:" in line]
    assert code == 0 and notes == ["attnkit eval: note: tiny was trained on 128 positions; its cells at 160 tokens "
                                   "run past them"]
    runner._LOADED.clear()


def test_eval_stall_dump_is_rearmed_by_every_sample(capsys, loads, dump_timer, tmp_path):
    code, _, err = cli_run(capsys, "eval", *ARGV, "--db", str(tmp_path / "r.db"), "--shard", "0/2",
                           "--stall-dump", "30")
    assert code == 0, err
    assert dump_timer[-1] == "cancel" and set(dump_timer[:-1]) == {(30.0, True)}
    assert len(dump_timer) - 1 >= 1 + 18  # armed, then at least once a stored sample (6 cells x 3)
    from attnkit import cli

    for bad, words in (("0", "accepted: > 0.0"), ("nan", "accepted: a finite number")):
        with pytest.raises(SystemExit):  # argparse's usage error
            cli.main(["eval", *ARGV, "--db", str(tmp_path / "r.db"), "--stall-dump", bad])
        assert f"--stall-dump: {bad} is out of range; {words}" in capsys.readouterr().err


def test_a_stalled_eval_prints_its_stacks_and_ends_with_its_rows_kept(tmp_path):
    """Each tokenizer call sleeps 3 s, past a 1 s stall dump: status 1, and the sleeping frame is on stderr."""
    proc = sweep_process(tmp_path / "r.db", "--stall-dump", "1", delay=3)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert "Timeout (0:00:01)!" in err and "in __call__" in err


def test_eval_ctrl_c_says_how_to_resume(capsys, monkeypatch, tmp_path):
    runner.get_model("tiny", "cpu", "float32")  # loaded (and warmed up) before generate is patched
    calls = []
    real = attnkit.generate

    def interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(attnkit, "generate", interrupt)
    code, out, err = cli_run(capsys, "eval", *ARGV, "--db", str(tmp_path / "r.db"), "--no-progress")
    assert code == 130 and out == ""
    assert err.splitlines()[-1] == (f"attnkit: interrupted: 2/{N_ROWS} samples are stored in {tmp_path / 'r.db'}; "
                                    "run the same command again to resume")  # fmt: skip


def test_eval_creates_a_missing_db_folder(capsys, loads, tmp_path):
    db = tmp_path / "new" / "r.db"
    code, _, err = cli_run(capsys, "eval", *ARGV, "--db", str(db), "--no-progress")
    assert code == 0, err
    assert db.is_file()


def test_report_command(capsys, tmp_path, reference):
    code, _, err = cli_run(capsys, "report", str(tmp_path / "missing.db"))
    assert code == 2 and "No such file or directory" in err
    if importlib.util.find_spec("attnkit.eval.report") is None:
        pytest.skip("attnkit.eval.report not written yet")
    db = tmp_path / "r.db"
    runner.run_sweep(config(samples=1), str(db), progress=False)
    code, out, err = cli_run(capsys, "report", str(db), "-o", str(tmp_path / "rep"))
    assert code == 0, err
    html, md = (Path(line.removeprefix("wrote ")) for line in out.splitlines())
    assert html.is_file() and md.is_file()
