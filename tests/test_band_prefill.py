"""The band prefill (attnkit.hf.band): a left-padded or sliding-window prefill chunk in one varlen flash call.

On CPU the flash kernel is replaced by ``band.reference_kernel`` (the same varlen problem in float32), so the layout
arithmetic (each row's first real slot, the in-place view of one-KV-head buffers, windows, pad queries) is checked
against the masked path on every machine; on CUDA the real kernel is checked against that reference.
"""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit.hf import band
from attnkit.inference import forward_chunks, left_pad
from attnkit.session import cache_argument
from cases import TINY
from conftest import DEVICE
from tiny import tiny_gemma3, tiny_llama

LENGTHS = (45, 20, 61)  # ragged: 16 and 41 pads; chunks of 16 put whole-pad and part-pad chunks in the batch


def padded_logits(model, rows, chunk: int, steps: int = 4) -> torch.Tensor:
    """Chunked prefill of the left-padded rows, then ``steps`` greedy decode steps: (B, 1 + steps, V) logits."""
    ids, mask = left_pad([torch.tensor([r]) for r in rows], 0)
    mask = torch.ones_like(ids) if mask is None else mask  # rows of equal length: no padding
    pos = (mask.cumsum(1) - 1).clamp_min(0)
    cache = attnkit.inference.new_cache(model)
    out = [forward_chunks(model, ids, cache, chunk, attention_mask=mask, position_ids=pos)]
    nxt, full_mask = pos[:, -1:] + 1, mask
    for _ in range(steps):
        full_mask = torch.cat([full_mask, torch.ones_like(nxt)], 1)
        step = model(input_ids=out[-1][:, -1].argmax(-1, keepdim=True), attention_mask=full_mask, position_ids=nxt,
                     use_cache=True, **{cache_argument(model): cache})
        out.append(step.logits)
        nxt = nxt + 1
    return torch.cat([o[:, -1:] for o in out], 1)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3], ids=["llama-gqa", "gemma3-sliding"])
@pytest.mark.parametrize("method", ["full", "window", "snapkv", "quest"])
def test_band_prefill_equals_the_masked_path(monkeypatch, make, method):
    model = make()
    g = torch.Generator().manual_seed(5)
    rows = [torch.randint(3, 256, (n,), generator=g).tolist() for n in LENGTHS]
    settings = TINY[method][1]
    with torch.no_grad(), attnkit.apply(model, method, **settings):
        masked = padded_logits(model, rows, chunk=16)
        calls = []

        def counted(*args):
            calls.append(args[-1])  # the window
            return band.reference_kernel(*args)

        monkeypatch.setattr(band, "usable", lambda query: True)
        monkeypatch.setattr(band, "flash_kernel", counted)
        fused = padded_logits(model, rows, chunk=16)
    assert calls, f"{method}: no prefill chunk took the band path"
    if make is tiny_gemma3:
        assert 7 in calls, "the sliding layers (window 8 -> 7 before each query) did not take the band path"
    torch.testing.assert_close(fused, masked, atol=2e-5, rtol=1e-4)


def test_an_unpadded_batch_takes_the_band_on_sliding_layers_only(monkeypatch):
    """Without padding the dense layers keep the plain causal kernel; the sliding ones take the band."""
    model = tiny_gemma3()
    g = torch.Generator().manual_seed(6)
    rows = [torch.randint(3, 256, (40,), generator=g).tolist() for _ in range(2)]
    with torch.no_grad(), attnkit.apply(model, "full"):
        masked = padded_logits(model, rows, chunk=16)
        calls = []
        monkeypatch.setattr(band, "usable", lambda query: True)
        monkeypatch.setattr(band, "flash_kernel", lambda *a: calls.append(a[-1]) or band.reference_kernel(*a))
        fused = padded_logits(model, rows, chunk=16)
    assert calls and set(calls) == {7}
    torch.testing.assert_close(fused, masked, atol=2e-5, rtol=1e-4)


def test_streaming_sinks_keep_the_masked_path(monkeypatch):
    """Sinks break the one-run-per-row layout: such a layer must not claim a band."""
    model = tiny_llama()
    monkeypatch.setattr(band, "usable", lambda query: True)
    monkeypatch.setattr(band, "flash_kernel", lambda *a: pytest.fail("a sink layer took the band path"))
    with torch.no_grad(), attnkit.apply(model, "streaming_llm", **TINY["streaming_llm"][1]):
        padded_logits(model, [[5] * 40, [6] * 25], chunk=16, steps=1)


def test_the_switch_takes_0_or_1_and_names_a_bad_value(monkeypatch):
    monkeypatch.setenv("ATTNKIT_BAND_PREFILL", "0")
    assert not band.enabled()
    monkeypatch.setenv("ATTNKIT_BAND_PREFILL", "yes")
    with pytest.raises(ValueError, match="ATTNKIT_BAND_PREFILL='yes' is invalid; accepted: 0 or 1"):
        band.enabled()


def test_one_kv_head_is_viewed_in_place_and_more_are_copied():
    buf = torch.randn(3, 1, 50, 8)
    flat, rs = band.flat_tokens(buf[:, :, :20])
    assert rs == 50 and flat.data_ptr() == buf.data_ptr()
    assert torch.equal(flat[2 * 50 : 2 * 50 + 20, 0], buf[2, 0, :20])
    two = torch.randn(3, 2, 50, 8)
    flat, rs = band.flat_tokens(two[:, :, :20])
    assert rs == 20 and torch.equal(flat[20:40].transpose(0, 1), two[1, :, :20])


def random_problem(b, h, hkv, q, n, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = ((h, q), (hkv, n), (hkv, n))
    return tuple(torch.randn(b, x, s, d, generator=g).to(device, dtype) for x, s in shapes)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="the flash varlen kernel needs CUDA")
@pytest.mark.parametrize("d,hkv,window", [(64, 2, None), (64, 1, 5), (256, 1, None), (256, 1, 511)])
def test_flash_kernel_matches_its_reference(d, hkv, window):
    b, h, q, cap = 4, 4, 96, 700
    query, _, _ = random_problem(b, h, hkv, q, cap, d, torch.bfloat16, DEVICE)
    _, kbuf, vbuf = random_problem(b, h, hkv, q, cap, d, torch.bfloat16, DEVICE, seed=1)
    n = 600  # in-place slices of a larger buffer, as a cache layer hands them
    pads = torch.tensor([0, 37, 540, 600], device=DEVICE)  # none, some, more than n - q (pad queries), all
    args = (query, kbuf[:, :, :n], vbuf[:, :, :n], pads, d**-0.5, window)
    fast = band.band_attention(*args)
    ref = band.band_attention(*args, kernel=band.reference_kernel)
    real = (torch.arange(q, device=DEVICE).view(1, q) >= (q - (n - pads)).view(b, 1)).view(b, 1, q, 1)
    torch.testing.assert_close(torch.where(real, fast, 0).float(), torch.where(real, ref, 0).float(),
                               atol=2e-2, rtol=2e-2)
    assert torch.isfinite(fast).all()
