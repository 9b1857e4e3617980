"""Fused cache bookkeeping of a fixed-shape decode step, in Triton (GPU; the Triton interpreter in tests).

A decode step of a CUDA graph is a chain of small kernels; on an H200 each costs ~2 us whatever it does, so the
few-element writes of a cache layer (the new key, value and position, a StreamingLLM sink original, the ring
advance and the sink turn) cost more than their bytes. Here each is one launch per layer. The torch code in
:mod:`attnkit.hf.cache` does the same with plain ops and stays the reference (CPU, CI, and the tests here).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnkit.kernels.triton_decode import _pdl_enter, pdl


@triton.jit
def _append_kernel(
    k_ptr, v_ptr, pos_ptr, kn_ptr, vn_ptr, wslot_ptr, qpos_ptr, sink_ptr, sum_ptr,
    stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, stride_pb, stride_ph,
    stride_knb, stride_knh, stride_vnb, stride_vnh, stride_sb, stride_sh, stride_sn,
    Hkv, SINKS, PAGES, PAGE,
    D: tl.constexpr, DV: tl.constexpr, STORE_SINKS: tl.constexpr, FOLD: tl.constexpr, PDL: tl.constexpr,
):
    """Program (b * Hkv + h): write the new key / value at slot wslot[b, h] with position qpos[b]; with
    STORE_SINKS, also its float32 original when qpos[b] < SINKS (StreamingLLM); with FOLD, fold the key into the
    channel-wise max / min of page qpos[b] // PAGE of the contiguous (B, Hkv, PAGES, 2, D) summary (Quest)."""
    _pdl_enter(PDL)
    bh = tl.program_id(0)
    b = (bh // Hkv).to(tl.int64)
    h = (bh % Hkv).to(tl.int64)
    slot = tl.load(wslot_ptr + bh).to(tl.int64)
    p = tl.load(qpos_ptr + b)
    offs = tl.arange(0, D)
    offs_v = tl.arange(0, DV)
    key = tl.load(kn_ptr + b * stride_knb + h * stride_knh + offs)
    tl.store(k_ptr + b * stride_kb + h * stride_kh + slot * stride_kn + offs, key)
    val = tl.load(vn_ptr + b * stride_vnb + h * stride_vnh + offs_v)
    tl.store(v_ptr + b * stride_vb + h * stride_vh + slot * stride_vn + offs_v, val)
    tl.store(pos_ptr + b * stride_pb + h * stride_ph + slot, p)
    if STORE_SINKS:
        is_sink = (p >= 0) & (p < SINKS)
        row = tl.where(is_sink, p, 0).to(tl.int64)
        tl.store(sink_ptr + b * stride_sb + h * stride_sh + row * stride_sn + offs, key.to(tl.float32),
                 mask=is_sink & (offs < D))
    if FOLD:
        page = (p // PAGE).to(tl.int64)
        bounds = sum_ptr + (bh.to(tl.int64) * PAGES + page) * (2 * D)
        hi = tl.load(bounds + offs)
        lo = tl.load(bounds + D + offs)
        tl.store(bounds + offs, tl.maximum(hi, key))
        tl.store(bounds + D + offs, tl.minimum(lo, key))


def append(
    keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
    wslot: torch.Tensor, qpos: torch.Tensor, sink_keys: torch.Tensor | None = None, sinks: int = 0,
    summary: torch.Tensor | None = None, page: int = 0,
) -> None:
    """In place: keys/values (B, Hkv, cap, D) and pos (B, Hkv, cap) get k_new/v_new (B, Hkv, 1, D) and qpos (B, 1)
    at wslot (B, Hkv, 1); sink_keys (B, Hkv, sinks, D) float32, if given, gets the key of a position < sinks; a
    contiguous summary (B, Hkv, P, 2, D) in the keys' dtype, if given, folds the key into page qpos // page."""
    b, h, _, d = keys.shape
    store = sink_keys is not None and sinks > 0
    sk = sink_keys if store else keys
    fold = summary is not None
    if fold and (not summary.is_contiguous() or summary.dtype != keys.dtype or summary.shape[-1] != d):
        raise ValueError(f"summary {tuple(summary.shape)} {summary.dtype} must be contiguous (B, Hkv, P, 2, {d}) "
                         f"in {keys.dtype}")
    _append_kernel[(b * h,)](
        keys, values, pos, k_new, v_new, wslot, qpos, sk, summary if fold else keys,
        keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0), values.stride(1), values.stride(2),
        pos.stride(0), pos.stride(1),
        k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1), sk.stride(0), sk.stride(1), sk.stride(2),
        h, sinks, summary.shape[2] if fold else 0, max(page, 1),
        D=d, DV=values.shape[-1], STORE_SINKS=store, FOLD=fold, num_warps=1, PDL=pdl(keys), launch_pdl=pdl(keys),
    )


@triton.jit
def _ring_after_kernel(
    k_ptr, v_ptr, pos_ptr, wslot_ptr, count_ptr, sink_ptr, freq_ptr,
    stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn, stride_pb, stride_ph,
    stride_sb, stride_sh, stride_sn,
    Hkv, SINKS, WINDOW,
    D: tl.constexpr, DV: tl.constexpr, HALF: tl.constexpr, HAS_SINKS: tl.constexpr, TURN: tl.constexpr,
    PDL: tl.constexpr,
):
    """Program (b * Hkv + h): advance the ring of slots [SINKS, SINKS + WINDOW + 1); the slot written next
    leaves (a sink of a short row moves to its sink slot first); with TURN, sink j's key becomes its float32
    original turned by the row's eviction count (angles in float64, HF rotate-half layout, 2 * HALF rotary dims).
    """
    _pdl_enter(PDL)
    bh = tl.program_id(0)
    b = (bh // Hkv).to(tl.int64)
    h = (bh % Hkv).to(tl.int64)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    p_base = pos_ptr + b * stride_pb + h * stride_ph
    nxt = tl.load(wslot_ptr + bh).to(tl.int64) + 1
    nxt = tl.where(nxt >= SINKS + WINDOW + 1, SINKS, nxt)
    offs = tl.arange(0, D)
    offs_v = tl.arange(0, DV)
    if HAS_SINKS:
        old = tl.load(p_base + nxt)
        rescue = (old >= 0) & (old < SINKS)
        dest = tl.where(rescue, old, 0).to(tl.int64)
        key = tl.load(k_base + nxt * stride_kn + offs)
        val = tl.load(v_base + nxt * stride_vn + offs_v)
        tl.store(k_base + dest * stride_kn + offs, key, mask=rescue & (offs < D))
        tl.store(v_base + dest * stride_vn + offs_v, val, mask=rescue & (offs_v < DV))
        tl.store(p_base + dest, old, mask=rescue)
    tl.store(p_base + nxt, -1)
    tl.store(wslot_ptr + bh, nxt)
    if TURN:
        tl.debug_barrier()  # the rescue above may have written a sink slot that the turn rewrites
        shift = tl.maximum(tl.load(count_ptr + b) - SINKS - WINDOW, 0).to(tl.float64)
        offs_h = tl.arange(0, HALF)
        angle = shift * tl.load(freq_ptr + offs_h).to(tl.float64)
        cos = tl.cos(angle).to(tl.float32)
        sin = tl.sin(angle).to(tl.float32)
        s_base = sink_ptr + b * stride_sb + h * stride_sh
        for j in range(SINKS):
            lo = tl.load(s_base + j * stride_sn + offs_h)
            hi = tl.load(s_base + j * stride_sn + HALF + offs_h)
            tl.store(k_base + j * stride_kn + offs_h, (lo * cos - hi * sin).to(k_ptr.dtype.element_ty))
            tl.store(k_base + j * stride_kn + HALF + offs_h, (hi * cos + lo * sin).to(k_ptr.dtype.element_ty))
            if 2 * HALF < D:  # partial rotary: the other dims keep the original
                rest = tl.load(s_base + j * stride_sn + offs, mask=offs >= 2 * HALF, other=0.0)
                tl.store(k_base + j * stride_kn + offs, rest.to(k_ptr.dtype.element_ty), mask=offs >= 2 * HALF)


def ring_after(
    keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor, wslot: torch.Tensor, count: torch.Tensor,
    sinks: int, window: int, sink_keys: torch.Tensor | None = None, inv_freq: torch.Tensor | None = None,
) -> None:
    """In place, the end of a ring step (see :meth:`attnkit.hf.cache.WindowLayer.static_after`). count (B, 1) is
    the rows' tokens after the step; sink_keys (B, Hkv, sinks, D) float32 and inv_freq (D_rot / 2,) float32
    turn the sinks (StreamingLLM), else the sink keys stay as they are."""
    b, h, _, d = keys.shape
    turn = sink_keys is not None and inv_freq is not None and sinks > 0
    sk = sink_keys if turn else keys
    freq = inv_freq if turn else count
    half = inv_freq.shape[0] if turn else 1
    _ring_after_kernel[(b * h,)](
        keys, values, pos, wslot, count, sk, freq,
        keys.stride(0), keys.stride(1), keys.stride(2), values.stride(0), values.stride(1), values.stride(2),
        pos.stride(0), pos.stride(1), sk.stride(0), sk.stride(1), sk.stride(2),
        h, sinks, window, D=d, DV=values.shape[-1], HALF=half, HAS_SINKS=sinks > 0, TURN=turn, num_warps=1,
        PDL=pdl(keys), launch_pdl=pdl(keys),
    )
