"""A synthetic, realistic results DB for the report tests (and for looking at the report by hand).

``python tests/report_fixture.py results.db`` writes one; ``make_db(path)`` is what the tests call. The numbers
are made up but shaped like real runs of SmolLM2-135M: accuracy falls as the KV budget shrinks (StreamingLLM
faster than SnapKV), StreamingLLM only finds needles near the end of the context, decode latency grows with the
KV held, and per-position NLL of a budgeted method flattens out once the budget is full.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import sys
from pathlib import Path

import numpy as np

from attnkit.eval.schema import SCHEMA

MODEL = "smollm2-135m"
LENGTHS = (4096, 8192)
BUDGETS = ("256", "512", "1024")
METHODS = ("streaming_llm", "snapkv")
TASKS = {  # name -> (family, accuracy of the full model at 4k, at 8k)
    "niah_single_1": ("retrieval", 0.98, 0.92),
    "niah_multikey_1": ("retrieval", 0.85, 0.70),
    "vt": ("multihop", 0.60, 0.45),
    "qa_1": ("qa", 0.45, 0.38),
}
DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
KV_BYTES_PER_TOKEN = 2 * 30 * 3 * 64 * 2  # k+v, 30 layers, 3 KV heads, head dim 64, bf16
CHUNK = 128  # a budgeted layer holds its budget plus one chunk
COLUMNS = (
    "cell_key sample_index model model_hash method settings_json budget budget_tokens task family length depth seed "
    "prompt_tokens score prediction references_json kv_bytes_peak prefill_s decode_s_per_token peak_mem_bytes "
    "device dtype extra_json attnkit_version git_commit config_json created_at"
).split()


def _keep(method: str, budget: int | None, length: int) -> float:
    """Fraction of the full model's accuracy a method keeps (1 for full)."""
    if budget is None:
        return 1.0
    ratio = budget / length
    if method == "streaming_llm":
        return min(1.0, 0.15 + 1.6 * ratio)
    return min(1.0, 0.55 + 2.2 * ratio)


def _needle_found(method: str, budget: int | None, length: int, depth: float) -> float:
    """Probability of finding a needle at ``depth``: StreamingLLM only sees the sink and the recent window."""
    if budget is None:
        return 0.97 - 0.10 * (length / 8192) * math.sin(math.pi * depth)
    tail = 1.0 - budget / length
    if method == "streaming_llm":
        return 0.95 if depth >= tail - 0.02 or depth == 0.0 else 0.04
    return min(0.95, 0.45 + 2.5 * budget / length - 0.25 * math.sin(math.pi * depth))


def _nll_curve(rng: np.random.Generator, method: str, budget: int | None, length: int) -> np.ndarray:
    """Per-position NLL of one essay: falls with context, flattens once a budgeted method starts evicting."""
    pos = np.arange(1, length, dtype=float)
    if budget is None:
        seen = pos
    elif method == "streaming_llm":
        seen = np.minimum(pos, budget)
    else:
        seen = np.minimum(pos, budget + 0.5 * np.maximum(pos - budget, 0) ** 0.8)
    nll = 4.6 - 0.32 * np.log1p(seen) + 0.06 * np.log1p(pos)
    return np.clip(nll + rng.gamma(2.0, 0.55, size=pos.size) - 1.1, 0.01, None)


def _rows(rng: np.random.Generator):
    cfgs = [("full", "", None)] + [(m, b, int(b)) for m in METHODS for b in BUDGETS]
    created = "2026-11-30T12:00:00Z"
    for method, budget, tokens in cfgs:
        settings = {} if tokens is None else {"budget": tokens, **({"sink": 4} if method == "streaming_llm" else
                                                                    {"window": 32, "pool": 7})}
        for length in LENGTHS:
            held = length if tokens is None else min(length, tokens + CHUNK)
            speed = 1.0 if method != "snapkv" else 1.08
            cells = [(t, fam, None, 30) for t, (fam, *_) in TASKS.items()]
            cells += [("niah_grid", "niah", d, 4) for d in DEPTHS] + [("passkey", "passkey", "random", 20)]
            cells += [("ppl", "ppl", None, 2)]
            for task, family, depth, n in cells:
                config = {"model": MODEL, "method": method, "settings": settings, "task": task, "length": length,
                          "grid_depth": depth, "seed": 0, "chat": True, "dtype": "bfloat16", "device": "cuda"}
                cell_key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
                for i in range(n):
                    extra: dict = {}
                    depth = round(float(rng.random()), 4) if task == "passkey" else depth
                    if family == "ppl":
                        nll = _nll_curve(rng, method, tokens, length)
                        extra = {"nll": [round(float(x), 3) for x in nll]}
                        score, decode, prediction = float(np.exp(nll.mean())), None, ""
                    else:
                        if family == "niah":
                            p = _needle_found(method, tokens, length, depth)
                        elif family == "passkey":  # a passkey is easier to find than a NIAH needle
                            p = min(1.0, 0.05 + _needle_found(method, tokens, length, depth))
                        else:
                            base = TASKS[task][1] if length == LENGTHS[0] else TASKS[task][2]
                            p = base * _keep(method, tokens, length)
                        score = float(rng.random() < p)
                        decode = (0.011 + 1.1e-6 * held) * speed * rng.lognormal(0, 0.04)
                        prediction = "the answer" if score else "I don't know"
                    kv = held * KV_BYTES_PER_TOKEN
                    yield dict(
                        cell_key=cell_key, sample_index=i, model=MODEL, model_hash="ab" * 32, method=method,
                        settings_json=json.dumps(settings, sort_keys=True), budget=budget, budget_tokens=tokens,
                        task=task, family=family, length=length, depth=depth, seed=0,
                        prompt_tokens=length - 32, score=score, prediction=prediction,
                        references_json=json.dumps(["the answer"]), kv_bytes_peak=kv,
                        prefill_s=(0.05 + 6e-5 * length) * speed * rng.lognormal(0, 0.05),
                        decode_s_per_token=decode, peak_mem_bytes=int(2.9e8 + kv + 9e4 * min(length, 512)),
                        device="NVIDIA H200", dtype="bfloat16", extra_json=json.dumps(extra),
                        attnkit_version="0.1.0", git_commit="3f2c1e9", config_json=json.dumps(config),
                        created_at=created,
                    )


def make_db(path: str | Path, seed: int = 0) -> Path:
    """Create (or overwrite) a results DB at ``path`` filled with synthetic rows; returns the path."""
    path = Path(path)
    path.unlink(missing_ok=True)
    con = sqlite3.connect(path)
    with con:
        con.executescript(SCHEMA)
        con.executemany(
            f"INSERT INTO results ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
            [tuple(r[c] for c in COLUMNS) for r in _rows(np.random.default_rng(seed))],
        )
    con.close()
    return path


if __name__ == "__main__":
    print(make_db(sys.argv[1] if len(sys.argv) > 1 else "results.db"))
