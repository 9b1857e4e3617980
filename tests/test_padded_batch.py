"""Padded and ragged batches: every row of a left-padded batch behaves exactly as that prompt alone.

Sinks, windows, budgets and positions count from each row's first real token, so for every method in
``tests/cases.py`` (tight settings: eviction and selection active) a row's logits and greedy tokens equal the
single-prompt run's. The prompt goes in as one prefill chunk, so chunk boundaries (which count from the batch's
first slot) cannot differ between the batch and the single run.
"""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit.registry import method_class
from attnkit.session import cache_argument
from cases import METHODS, TINY
from conftest import DEVICE, DTYPE
from test_methods import LOGITS_TOL, MODELS, assert_close
from tiny import tiny_llama

LENGTHS = (37, 20, 51)  # ragged: the longest row has no padding, the others 14 and 31 pads
DECODE = 8


class IdTok:
    eos_token_id = None
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    return MODELS[request.param](dtype=DTYPE).to(DEVICE)


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in LENGTHS]


def stream_logits(model, rows: list[list[int]], decode_ids: torch.Tensor) -> torch.Tensor:
    """Left-padded one-chunk prefill of ``rows``, then teacher-forced decode of decode_ids (B, T): (B, 1 + T, V)."""
    longest = max(map(len, rows))
    ids = torch.zeros(len(rows), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, longest - len(r):] = torch.tensor(r)
        mask[i, longest - len(r):] = 1
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    cache = attnkit.inference.new_cache(model)
    arg = cache_argument(model)
    logits = [model(input_ids=ids, attention_mask=mask, position_ids=pos, **{arg: cache}).logits[:, -1:]]
    nxt = pos[:, -1:] + 1
    for t in range(decode_ids.shape[1]):
        out = step_with_pos(model, decode_ids[:, t : t + 1], cache, nxt)
        logits.append(out.logits)
        nxt = nxt + 1
    return torch.cat(logits, dim=1)


def step_with_pos(model, ids, cache, pos):
    return model(input_ids=ids, position_ids=pos, use_cache=True, **{cache_argument(model): cache})


@pytest.mark.parametrize("method", METHODS)
def test_every_row_of_a_padded_batch_equals_that_prompt_alone(model, method):
    rows = prompts()
    g = torch.Generator().manual_seed(4)
    decode_ids = torch.randint(3, 256, (len(rows), DECODE), generator=g).to(DEVICE)
    settings = TINY[method][1]
    with torch.no_grad():
        with attnkit.apply(model, method, **settings):
            batch = stream_logits(model, rows, decode_ids)
            for i, r in enumerate(rows):
                alone = stream_logits(model, [r], decode_ids[i : i + 1])
                what = f"{method} row {i} ({len(r)} tokens) in a padded batch vs alone"
                if DTYPE == torch.float32 or method_class(method).kind != "read":
                    assert_close(batch[i], alone[0], what)
                    continue
                # Half precision: the batch and the lone prompt run different attention kernels (masked vs not),
                # so a near-tie in a top-k selection may flip; most steps must still agree.
                atol, rtol = LOGITS_TOL[DTYPE]
                ok = ((batch[i].float() - alone[0].float()).abs() <= atol + rtol * alone[0].float().abs()).all(-1)
                assert ok.float().mean() >= 0.75, f"{what}: {int((~ok).sum())} of {ok.numel()} steps differ"


@pytest.mark.parametrize("method", METHODS)
def test_generate_on_a_ragged_batch_gives_each_prompts_tokens(model, method):
    if DTYPE != torch.float32:
        pytest.skip("greedy token equality is only stable in float32")
    rows = prompts()
    tok = IdTok()
    with attnkit.apply(model, method, **TINY[method][1]):
        gens = attnkit.generate(model, tok, rows, max_new_tokens=10, prefill_chunk=64)
        assert len(gens) == len(rows)
        for r, gen in zip(rows, gens):
            alone = attnkit.generate(model, tok, r, max_new_tokens=10, prefill_chunk=64)
            assert gen.tokens == alone.tokens, f"{method}: row of {len(r)} tokens"
            assert gen.prompt_tokens == len(r)


def test_model_generate_with_a_padded_batch_inside_apply():
    if DTYPE != torch.float32:
        pytest.skip("greedy token equality is only stable in float32")
    model = tiny_llama().to(DEVICE)
    rows = prompts()[:2]
    longest = max(map(len, rows))
    ids = torch.zeros(2, longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, longest - len(r):] = torch.tensor(r)
        mask[i, longest - len(r):] = 1
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    for method in ("full", "streaming_llm"):
        with attnkit.apply(model, method, **TINY[method][1]):
            got = model.generate(ids, attention_mask=mask, **kwargs)
            for i, r in enumerate(rows):
                one = torch.tensor([r], device=DEVICE)
                alone = model.generate(one, attention_mask=torch.ones_like(one), **kwargs)
                assert got[i, longest:].tolist() == alone[0, len(r):].tolist(), f"{method} row {i}"


def test_a_row_whose_padding_outlasts_the_first_prefill_chunk():
    model = tiny_llama()
    short, long = [5, 6, 7, 8], list(range(3, 42))
    with torch.no_grad(), attnkit.apply(model, "full"):
        both = attnkit.generate(model, IdTok(), [short, long], max_new_tokens=4, prefill_chunk=8, stop_at_eos=False)
        alone = attnkit.generate(model, IdTok(), short, max_new_tokens=4, prefill_chunk=8, stop_at_eos=False)
    assert both[0].tokens == alone.tokens


def test_a_masked_prefill_builds_its_mask_per_query_chunk(monkeypatch):
    """A long masked chunk (padding + a window) is attended query chunk by query chunk, each building only its
    rows of the layer's mask: never the whole (q, n) mask. Logits equal the one-call path's."""
    from attnkit.hf import attention
    from attnkit.hf.cache import KVLayer

    monkeypatch.setenv("ATTNKIT_BAND_PREFILL", "0")  # on CUDA this layout would take the flash band path instead
    model = tiny_llama(dtype=DTYPE).to(DEVICE)
    rows, decode_ids = prompts(), torch.randint(3, 256, (3, 2), generator=torch.Generator().manual_seed(4))
    with attnkit.apply(model, "window", window=16):
        whole = stream_logits(model, rows, decode_ids.to(DEVICE))
    built = []
    real = KVLayer.mask
    monkeypatch.setattr(KVLayer, "mask", lambda self, rows=None: built.append((self.qpos.shape[1], rows))
                        or real(self, rows))
    monkeypatch.setattr(attention, "MASKED_SCORE_BYTES", 3 * 4 * 51 * 4 * 8)  # B x H x n x 4 bytes x 8 query rows
    with attnkit.apply(model, "window", window=16):
        chunked = stream_logits(model, rows, decode_ids.to(DEVICE))
    prefill = [r for q, r in built if q > 1]
    assert prefill and all(r is not None and r.stop - r.start <= 8 for r in prefill)
    assert_close(chunked, whole, "chunked mask vs whole mask")
