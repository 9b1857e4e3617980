"""The generic method tests on SmolLM2-135M-Instruct (real weights, embedded GGUF), float32 on CPU."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit.reference import recorded_reference
from attnkit.data import essay_tokens
from attnkit.registry import method_class
from cases import METHODS, REAL
from conftest import DEVICE, DTYPE
from test_methods import ATTN_TOL, assert_close, stream

pytestmark = pytest.mark.slow
PROMPT = 320


@pytest.fixture(scope="module")
def smollm():
    return attnkit.load_model("smollm2-135m", device=DEVICE, dtype=DTYPE)


@pytest.fixture(scope="module")
def text_ids(smollm):
    return essay_tokens(smollm[1], PROMPT).to(DEVICE)


@pytest.fixture(scope="module")
def dense_logits(smollm, text_ids):
    with torch.no_grad():
        return smollm[0](text_ids).logits


@pytest.fixture(scope="module")
def rounding_noise(smollm, text_ids, dense_logits):
    """Max logit difference between two dense runs that only round differently (chunked vs one forward)."""
    with torch.no_grad():
        chunked = stream(smollm[0], text_ids, chunk=128, decode=4)  # outside apply: transformers' DynamicCache
    return (chunked.float() - dense_logits.float()).abs().max().item()


@pytest.mark.parametrize("method", METHODS)
def test_roomy_budget_equals_unmodified_model(smollm, text_ids, dense_logits, rounding_noise, method):
    model = smollm[0]
    with torch.no_grad(), attnkit.apply(model, method, **REAL[method][0]):
        got = stream(model, text_ids, chunk=128, decode=4)
    # float32: a fixed bound. bf16: differences over 30 layers are rounding, so the bound is twice what the
    # dense model itself shows between two ways of computing the same thing.
    tol = (2e-3, 0.0) if DTYPE == torch.float32 else (max(0.05, 2 * rounding_noise), 0.0)
    assert_close(got, dense_logits, f"SmolLM2 {method} (dense rounding noise {rounding_noise:.3g})", tol)


@pytest.mark.parametrize("method", METHODS)
def test_tight_budget_equals_reference_under_kept_mask(smollm, text_ids, method):
    model = smollm[0]
    records = []
    keep = {0, 15, 29}  # a few layers are enough and keep memory low

    def record(r):
        if r["layer"] in keep:
            records.append({k: v.clone() if torch.is_tensor(v) else v for k, v in r.items()})

    with torch.no_grad(), attnkit.apply(model, method, **REAL[method][1]) as run:
        run.recorder = record
        stream(model, text_ids, chunk=128, decode=4)
    for r in records:
        out = recorded_reference(r)
        tol = (1e-4, 0.0) if DTYPE == torch.float32 else ATTN_TOL[DTYPE]
        assert_close(r["out"], out, f"SmolLM2 {method} layer {r['layer']}", tol)
    if method_class(method).kind == "read":  # nothing evicted; some recorded call must have skipped a past token
        past = lambda r: r["key"].shape[2] - r["query"].shape[2]  # noqa: E731
        assert any(r["mask"] is not None and not r["mask"][..., : past(r)].all() for r in records), "nothing selected"
    elif method_class(method).kind == "weigh":
        assert any(r.get("bias") is not None and r["bias"].abs().max() > 0 for r in records), "nothing reweighted"
    elif method != "full" and not method_class(method).driver:  # a driver's cache is full's
        assert max(k.max().item() for k in run.kept_tokens()) < PROMPT


def test_streaming_llm_answers_a_chat_question(smollm):
    model, tok = smollm
    with attnkit.apply(model, "streaming_llm", sinks=4, window=60) as run:
        gen = attnkit.generate(model, tok, "What is the capital of France?", max_new_tokens=12, chat=True)
    assert "Paris" in gen.text, gen.text
    assert gen.kv_bytes == run.kv_bytes() > 0
