"""Compiled fixed-shape decode steps (``attnkit.generate(..., compile=True)``) against the uncompiled ones.

Every method in ``tests/cases.py`` (tight settings): the step traces once per decode as one graph (attnkit's
writes and attention are opaque ops, so no method state or host counter becomes a guard), and its logits equal
the uncompiled static steps'. On CPU the trace
runs through Dynamo's ``eager`` backend (the same ops, so equal bit for bit; no C++ toolchain needed) and one case
through Inductor; on CUDA every method goes through Inductor and its CUDA graph (bf16: within tolerance).
"""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import attnkit
import test_static_decode as static
from cases import METHODS, TINY
from conftest import DEVICE, DTYPE
from test_methods import LOGITS_TOL, MODELS, assert_close
from test_padded_batch import IdTok, prompts

# The ragged batch covers padding on the Llama model; the Gemma-3 model (sliding layers) runs a subset.
CASES = [("llama", m, "ragged") for m in METHODS] + [
    ("gemma3", m, "single") for m in ("full", "streaming_llm", "quest", "recycled_attention", "razorattention")
]


def compiled_stream(model, method: str, rows: str, backend) -> tuple:
    """static.both_ways with the first run uncompiled and the second compiled through ``backend``."""
    plain = static.StaticDecoder

    class Compiled(plain):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, compile=backend, **kwargs)

    original = static.StaticDecoder
    seen = []

    def pick(*args, **kwargs):
        cls = Compiled if seen else plain  # both_ways builds the uncompiled decoder first
        seen.append(cls)
        return cls(*args, **kwargs)

    static.StaticDecoder = pick
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="attnkit: decoding uncompiled")  # a failed compile: fail the test
            return static.both_ways(model, method, rows, 7, dict(static=True), dict(static=True))
    finally:
        static.StaticDecoder = original


@pytest.mark.parametrize("model_name,method,rows", CASES)
def test_compiled_steps_trace_once(model_name, method, rows):
    model = MODELS[model_name](dtype=DTYPE).to(DEVICE)
    backend = CompileCounterWithBackend("eager" if DEVICE.type == "cpu" else "inductor")
    (want, want_more, want_kept), (got, got_more, got_kept) = compiled_stream(model, method, rows, backend)
    # one trace for the whole decode (Recycled Attention's two step kinds differ inside the opaque ops only)
    assert backend.frame_count == 1, f"{method}: {backend.frame_count} traces for {static.DECODE} steps"
    what = f"{method} ({model_name}, {rows}) compiled vs uncompiled static steps"
    if DEVICE.type == "cpu":
        assert torch.equal(got, want), what
    elif method_reads(method):
        atol, rtol = LOGITS_TOL[DTYPE]  # fused kernels round differently: a top-k near-tie may flip a step
        ok = ((got.float() - want.float()).abs() <= atol + rtol * want.float().abs()).all(-1)
        assert ok.float().mean() >= 0.75, f"{what}: {int((~ok).sum())} of {ok.numel()} steps differ"
        return
    else:
        assert_close(got, want, what)
    assert_close(got_more, want_more, f"{what}, chunk after the decode")
    assert got_kept == want_kept, f"{what}: kept positions differ"


def method_reads(method: str) -> bool:
    from attnkit.registry import method_class

    return method_class(method).kind == "read"


@pytest.mark.skipif(DEVICE.type == "cpu" and shutil.which("g++") is None, reason="Inductor on CPU needs g++")
@pytest.mark.parametrize("method", ["streaming_llm"] if DEVICE.type == "cpu" else ["full", "streaming_llm", "quest"])
def test_generate_with_compile_matches_uncompiled(method):
    from tiny import tiny_llama

    model = tiny_llama(dtype=DTYPE).to(DEVICE)
    tok = IdTok()
    with attnkit.apply(model, method, **TINY[method][1]):
        plain = attnkit.generate(model, tok, prompts()[:2], max_new_tokens=12, static_decode=True)
        fused = attnkit.generate(model, tok, prompts()[:2], max_new_tokens=12, static_decode=True, compile=True)
    assert "compiled" in fused[0].stats["decode"], fused[0].stats["decode"]
    if DEVICE.type == "cuda":
        assert fused[0].stats["decode"].startswith("cuda_graph"), fused[0].stats["decode"]
    same = sum(a.tokens == b.tokens for a, b in zip(plain, fused))
    assert same == len(plain) or DTYPE != torch.float32, [(a.tokens, b.tokens) for a, b in zip(plain, fused)]


def test_a_step_that_cannot_compile_decodes_uncompiled_and_says_why():
    from tiny import tiny_llama

    def refuse(gm, example_inputs):
        raise RuntimeError("this backend compiles nothing")

    model = tiny_llama(dtype=DTYPE).to(DEVICE)
    with attnkit.apply(model, "full"):
        cache = attnkit.inference.new_cache(model)
        ids = torch.tensor([prompts()[0]], device=DEVICE)
        model(input_ids=ids, **{attnkit.session.cache_argument(model): cache})
        decoder = static.StaticDecoder(model, cache, 4, graphs=False, compile=refuse)
        with pytest.warns(UserWarning, match="decoding uncompiled"):
            logits = decoder.step(ids[:, -1], torch.tensor([[ids.shape[1]]], device=DEVICE))
        decoder.close()
    assert logits.shape == (1, model.config.vocab_size)
    assert "compile failed" in decoder.mode and "compiles nothing" in decoder.mode, decoder.mode


def test_generate_refuses_a_compile_that_is_not_a_bool():
    from tiny import tiny_llama

    model = tiny_llama(dtype=DTYPE).to(DEVICE)
    with pytest.raises(ValueError, match="compile='yes' is invalid; accepted: True, False or a mode in"):
        attnkit.generate(model, IdTok(), prompts()[0], max_new_tokens=2, compile="yes")
