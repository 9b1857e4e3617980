"""Fixed-shape decode steps (the steps CUDA graphs capture) against the dynamic path, for every method.

For each method in ``tests/cases.py`` (tight settings: eviction and selection active), single prompts and a
ragged left-padded batch: teacher-forced decode logits through :class:`attnkit.graphs.StaticDecoder` equal the
dynamic path's; after the decoder closes, the cache holds the same positions and takes a further multi-token
chunk with the same logits. On CUDA the same runs compare graphs on and off: the tokens must be identical.
"""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit.graphs import StaticDecoder, static_unavailable
from attnkit.registry import method_class
from attnkit.session import cache_argument
from cases import METHODS, TINY
from conftest import DEVICE, DTYPE
from test_methods import LOGITS_TOL, MODELS, assert_close
from test_padded_batch import IdTok, prompts

DECODE = 20  # longer than every tight window: the rings wrap and evictions run in the fixed-shape steps


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    return MODELS[request.param](dtype=DTYPE).to(DEVICE)


def left_pad(rows):
    ids, mask = attnkit.inference.left_pad([torch.tensor([r]) for r in rows], 0)
    return ids.to(DEVICE), (torch.ones_like(ids) if mask is None else mask).to(DEVICE)


def run_stream(model, rows, decode_ids, more_ids, static: bool, graphs: bool = False):
    """Prefill, T teacher-forced decode steps, then one more multi-token chunk. Returns (decode logits (B, T, V),
    chunk logits (B, q, V), kept positions per layer after the decode)."""
    ids, mask = left_pad(rows)
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    cache = attnkit.inference.new_cache(model)
    arg = cache_argument(model)
    model(input_ids=ids, attention_mask=mask, position_ids=pos, **{arg: cache})
    reason = static_unavailable(cache.run, cache) if static else None
    if reason is not None:
        pytest.skip(f"no fixed-shape steps: {reason}")
    nxt = pos[:, -1:] + 1
    logits = []
    decoder = StaticDecoder(model, cache, decode_ids.shape[1], graphs) if static else None
    for t in range(decode_ids.shape[1]):
        if decoder is not None:
            logits.append(decoder.step(decode_ids[:, t], nxt).clone())
        else:
            step = model(input_ids=decode_ids[:, t : t + 1], position_ids=nxt, use_cache=True, **{arg: cache})
            logits.append(step.logits[:, -1])
        nxt = nxt + 1
    if decoder is not None:
        decoder.close()
    kept = [kept_set(layer) for layer in cache.layers]
    q = more_ids.shape[1]
    more_pos = nxt + torch.arange(q, device=DEVICE)
    chunk = model(input_ids=more_ids, position_ids=more_pos, use_cache=True, **{arg: cache}).logits
    return torch.stack(logits, 1), chunk, kept


def kept_set(layer) -> list[list[list[int]]]:
    pos = layer.stored_pos()
    return [[sorted(p for p in head.tolist() if p >= 0) for head in row] for row in pos]


CASES = {"single": [0], "ragged": [0, 1, 2]}


def both_ways(model, method: str, rows: str, seed: int, first: dict, second: dict, settings: dict | None = None) -> tuple:
    """run_stream on the same prompts and token streams (tight settings, or ``settings``), once with each set of
    options."""
    chosen = [prompts()[i] for i in CASES[rows]]
    g = torch.Generator().manual_seed(seed)
    decode_ids = torch.randint(3, 256, (len(chosen), DECODE), generator=g).to(DEVICE)
    more_ids = torch.randint(3, 256, (len(chosen), 5), generator=g).to(DEVICE)
    with torch.no_grad(), attnkit.apply(model, method, **(TINY[method][1] if settings is None else settings)):
        return tuple(run_stream(model, chosen, decode_ids, more_ids, **opts) for opts in (first, second))


@pytest.mark.parametrize("rows", list(CASES))
@pytest.mark.parametrize("method", METHODS)
def test_static_steps_equal_the_dynamic_path(model, method, rows):
    (want, want_more, want_kept), (got, got_more, got_kept) = both_ways(
        model, method, rows, 5, dict(static=False), dict(static=True)
    )
    check_same_decode((want, want_more, want_kept), (got, got_more, got_kept),
                      f"{method} ({rows}) static vs dynamic decode", method_class(method).kind == "read")


def check_same_decode(want: tuple, got: tuple, what: str, selects: bool) -> None:
    """run_stream's results of two paths agree: exactly (within the dtype's tolerance) in float32, and in half
    precision where they kept the same positions (eviction methods). Otherwise (half precision, a selecting
    method, or an eviction that differed) the static step reads through other kernels (summation order), so a
    near-tie in a top-k selection (or, for SpAtten's scores accumulated over layers and steps, in an eviction:
    seen on Gemma-3 in bf16, one position of 16 swapped for its neighbour) may flip: most steps and at least 98%
    of the kept positions must agree."""
    (want, want_more, want_kept), (got, got_more, got_kept) = want, got
    if DTYPE == torch.float32 or (not selects and got_kept == want_kept):
        assert_close(got, want, what)
        assert_close(got_more, want_more, f"{what}, chunk after the decode")
        assert got_kept == want_kept, f"{what}: kept positions differ"
        return
    pairs = [(set(a), set(b)) for la, lb in zip(got_kept, want_kept) for ra, rb in zip(la, lb) for a, b in zip(ra, rb)]
    swapped = sum(len(a ^ b) for a, b in pairs) / 2
    held = sum(len(b) for _, b in pairs)
    assert swapped <= 0.02 * held, f"{what}: {swapped:.0f} of {held} kept positions differ"
    atol, rtol = LOGITS_TOL[DTYPE]
    ok = ((got.float() - want.float()).abs() <= atol + rtol * want.float().abs()).all(-1)
    assert ok.float().mean() >= 0.75, f"{what}: {int((~ok).sum())} of {ok.numel()} steps differ"

@pytest.mark.parametrize("rows", list(CASES))
def test_spatten_value_pruning_static_equals_dynamic(model, rows):
    """SpAtten's default value pruning (probabilities zeroed without renormalising) in the fixed-shape steps, with
    sinks and a recent window protected, against the dynamic path; head pruning keeps the dynamic path."""
    settings = dict(budget=16, value_threshold=0.05, sinks=2, recent=3)
    want, got = both_ways(model, "spatten", rows, 7, dict(static=False), dict(static=True), settings)
    check_same_decode(want, got, "spatten value pruning: static vs dynamic decode", selects=False)
    with torch.no_grad(), attnkit.apply(model, "spatten", budget=16, head_keep=0.5) as run:
        ids, mask = left_pad([prompts()[0]])
        cache = attnkit.inference.new_cache(model)
        model(input_ids=ids, attention_mask=mask, **{cache_argument(model): cache})
        assert "head pruning" in static_unavailable(run, cache)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a CUDA device (CI has none; run on the H200)")
@pytest.mark.parametrize("rows", list(CASES))
@pytest.mark.parametrize("method", METHODS)
def test_cuda_graph_steps_equal_eager_static_steps(model, method, rows):
    (eager, eager_more, eager_kept), (graph, graph_more, graph_kept) = both_ways(
        model, method, rows, 6, dict(static=True, graphs=False), dict(static=True, graphs=True)
    )
    assert torch.equal(graph, eager), f"{method} ({rows}): graph replay differs from the eager static step"
    assert torch.equal(graph_more, eager_more)
    assert graph_kept == eager_kept


@pytest.mark.parametrize("method", METHODS)
def test_generate_tokens_identical_with_and_without_graphs(model, method):
    tok = IdTok()
    rows = prompts()
    with attnkit.apply(model, method, **TINY[method][1]):
        a = attnkit.generate(model, tok, rows, max_new_tokens=24, static_decode=True, cuda_graphs=True)
        b = attnkit.generate(model, tok, rows, max_new_tokens=24, static_decode=True, cuda_graphs=False)
    assert [x.tokens for x in a] == [x.tokens for x in b], method
    want = "cuda_graph" if DEVICE.type == "cuda" else "static"
    if a[0].stats["decode"].startswith("dynamic ("):  # a method without fixed-shape steps says why, and runs
        assert "decodes dynamically" in a[0].stats["decode"]
        return
    assert a[0].stats["decode"].startswith(want), a[0].stats["decode"]


@pytest.mark.parametrize("method", ["full", "quest"])
def test_generate_allocates_the_cache_once(method):
    from attnkit.hf.cache import _round_up
    from tiny import tiny_llama

    model = tiny_llama(dtype=DTYPE).to(DEVICE)
    prompt = prompts()[0]
    with attnkit.apply(model, method, **TINY[method][0]) as run:
        attnkit.generate(model, IdTok(), prompt, max_new_tokens=20, prefill_chunk=8, static_decode=True)
        caps = {layer.capacity for layer in run.cache.layers}
    # prompt + new tokens, rounded to the allocation granule: no growth step during prefill or decode
    assert caps == {_round_up(len(prompt) + 20)}, caps
