"""TokenSelect's Selection Cache: reuse of a layer's picks while the query fingerprint stays similar."""

from __future__ import annotations

import pytest
import torch

import attnkit
from cases import TINY
from conftest import DEVICE, DTYPE
from test_methods import LOGITS_TOL, assert_close
from test_padded_batch import IdTok, prompts
from test_static_decode import both_ways, model  # noqa: F401  (the fixture)

TIGHT = TINY["tokenselect"][1]


def generate(model, settings: dict, rows=None, tokens: int = 12):
    rows = rows or [prompts()[2]]
    with torch.no_grad(), attnkit.apply(model, "tokenselect", **settings) as run:
        gens = attnkit.generate(model, IdTok(), rows, max_new_tokens=tokens, prefill_chunk=64, static_decode=False)
        return gens, run.stats()


def test_theta_one_selects_every_forward_like_no_cache(model):
    """cos >= 1 holds only for an identical fingerprint: the tokens equal those of the cache switched off."""
    if DTYPE != torch.float32:
        pytest.skip("greedy token equality is only stable in float32")
    plain, _ = generate(model, TIGHT)
    cached, stats = generate(model, dict(TIGHT, selection_cache=True, theta=1.0))
    assert cached[0].tokens == plain[0].tokens
    assert stats["tokenselect"]["selection_cache_hit_rate"] < 0.05


def test_always_reusing_keeps_the_first_picks(model):
    """theta -1: after a layer's first selection every forward reuses it (the hit rate says so) and the picks
    never change."""
    settings = dict(TIGHT, selection_cache=True, theta=-1.0)
    seen: dict[int, list[torch.Tensor]] = {}
    ids = torch.tensor([prompts()[2]], device=DEVICE)
    with torch.no_grad(), attnkit.apply(model, "tokenselect", **settings) as run:
        cache = run.new_cache()
        arg = attnkit.session.cache_argument(model)
        model(input_ids=ids, **{arg: cache})
        nxt = torch.tensor([[ids.shape[1]]], device=DEVICE)
        for t in range(6):
            model(input_ids=torch.tensor([[5 + t]], device=DEVICE), position_ids=nxt + t, **{arg: cache})
            for layer in cache.layers:
                if getattr(layer, "picks", None) is not None:  # global layers (Gemma-3 also has sliding ones)
                    seen.setdefault(layer.layer_idx, []).append(layer.picks.clone())
        stats = run.stats()["tokenselect"]
    assert seen, "no layer selected"
    for picks in seen.values():
        assert all(torch.equal(p, picks[0]) for p in picks)
    checks = stats["selections"]
    assert stats["selection_cache_hit_rate"] == pytest.approx((checks - len(seen)) / checks)


@pytest.mark.parametrize("rows", ["single", "ragged"])
def test_cached_static_steps_equal_the_dynamic_path(model, rows):
    """Some rows reuse and some select anew (theta 0.3 on random models): fixed-shape steps = dynamic ones."""
    settings = dict(TIGHT, selection_cache=True, theta=0.3)
    (want, want_more, _), (got, got_more, _) = both_ways(
        model, "tokenselect", rows, 5, dict(static=False), dict(static=True), settings)
    what = f"tokenselect + selection cache ({rows}) static vs dynamic"
    if DTYPE == torch.float32:
        assert_close(got, want, what)
        assert_close(got_more, want_more, "chunk after the decode")
        return
    # Half precision (the GPU's Triton path, reused rows skipped in-kernel): a near-tie may flip a selection or a
    # cosine against theta; most steps must still agree, as in the generic static test.
    atol, rtol = LOGITS_TOL[DTYPE]
    ok = ((got.float() - want.float()).abs() <= atol + rtol * want.float().abs()).all(-1)
    assert ok.float().mean() >= 0.75, f"{what}: {int((~ok).sum())} of {ok.numel()} steps differ"


def test_a_padded_row_reuses_as_it_would_alone(model):
    if DTYPE != torch.float32:
        pytest.skip("greedy token equality is only stable in float32")
    settings = dict(TIGHT, selection_cache=True, theta=0.3)
    rows = prompts()
    batch, _ = generate(model, settings, rows)
    for r, gen in zip(rows, batch):
        alone, _ = generate(model, settings, [r])
        assert gen.tokens == alone[0].tokens


def test_bad_settings_name_the_value():
    with pytest.raises(ValueError, match="theta=1.5"):
        attnkit.registry.method_class("tokenselect")(selection_cache=True, theta=1.5)
    with pytest.raises(ValueError, match="selection_cache='yes'"):
        attnkit.registry.method_class("tokenselect")(selection_cache="yes")
