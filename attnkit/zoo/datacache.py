"""MQAR sets drawn once: in memory for the runs of one process, on disk for the processes and calls after it.

Every run of a sweep trains and tests on the same sets (they depend only on the seed and the shapes), and drawing
them is CPU work: Zoology's V 8192 mixture takes ~50 s on one core (Gumbel top-k over 4,096 keys for 180,000
examples), so a 36-run sweep drew the same data 36 times on the GPU machine's clock. A cached set is keyed by every
argument of :func:`attnkit.zoo.mqar.mqar` and by the sha256 of ``mqar.py`` itself, so a changed generator never
serves old data. Files are safetensors (int16 tokens where the vocabulary fits, int32 otherwise); one that is
unreadable or does not match its key is drawn again and rewritten, with a warning.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import threading
import warnings
from collections import OrderedDict
from pathlib import Path

import torch

_mqar = importlib.import_module("attnkit.zoo.mqar")  # the module: attnkit.zoo's ``mqar`` is the function

_MEMORY_BYTES = 2 << 30  # the in-process cache keeps the most recently used sets up to this size
_memo: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
_lock = threading.Lock()  # one draw at a time: runs started side by side wait for the first one's sets
_source: str | None = None


def mqar_set(num_examples: int, vocab_size: int, seq_len: int, num_kv_pairs: int, power_a: float, seed: int,
             cache_dir: str | Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attnkit.zoo.mqar.mqar` with the same arguments, drawn once (see the module docstring).

    Returns
    -------
    inputs, labels : (B, T) int64, shared with other callers in this process: read them, never write to them.
    """
    key = _key(num_examples, vocab_size, seq_len, num_kv_pairs, power_a, seed)
    with _lock:
        if key in _memo:
            _memo.move_to_end(key)
            return _memo[key]
        path = Path(cache_dir) / f"mqar-{hashlib.sha256(key.encode()).hexdigest()[:24]}.safetensors" \
            if cache_dir is not None else None
        got = _read(path, key, num_examples, seq_len) if path is not None and path.exists() else None
        if got is None:
            got = _mqar.mqar(num_examples, vocab_size, seq_len, num_kv_pairs, power_a, seed=seed)
            if path is not None:
                _write(path, key, *got, vocab_size)
        _memo[key] = got
        while len(_memo) > 1 and sum(x.nbytes + y.nbytes for x, y in _memo.values()) > _MEMORY_BYTES:
            _memo.popitem(last=False)
        return got


def clear_memory() -> None:
    """Forget the in-process sets (files on disk stay)."""
    with _lock:
        _memo.clear()


def _key(*args) -> str:
    global _source
    if _source is None:
        _source = hashlib.sha256(Path(_mqar.__file__).read_bytes()).hexdigest()
    names = ("num_examples", "vocab_size", "seq_len", "num_kv_pairs", "power_a", "seed")
    return json.dumps({**dict(zip(names, args)), "random_non_queries": True, "generator": _source}, sort_keys=True)


def _read(path: Path, key: str, rows: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") != key:
                raise ValueError("its key differs (a hash collision or another generator)")
            inputs, labels = f.get_tensor("inputs"), f.get_tensor("labels")
        if inputs.shape != (rows, seq_len) or labels.shape != (rows, seq_len):
            raise ValueError(f"shapes {tuple(inputs.shape)} / {tuple(labels.shape)}, expected {(rows, seq_len)}")
    except Exception as exc:
        warnings.warn(f"zoo: cached MQAR set {path} is unusable ({type(exc).__name__}: {exc}); drawing it again",
                      stacklevel=3)
        return None
    return inputs.long(), labels.long()


def _write(path: Path, key: str, inputs: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> None:
    from safetensors.torch import save_file

    small = torch.int16 if vocab_size <= torch.iinfo(torch.int16).max else torch.int32
    path.parent.mkdir(parents=True, exist_ok=True)
    # a temp name per process and thread (several may share the folder), then an atomic rename
    tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
    save_file({"inputs": inputs.to(small), "labels": labels.to(small)}, str(tmp), metadata={"key": key})
    tmp.replace(path)
