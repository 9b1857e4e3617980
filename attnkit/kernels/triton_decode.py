"""Split-KV decode attention kernels in Triton (GPU; also run by the Triton interpreter on CPU in tests).

Both kernels share one structure. Program ``(bh, s)`` takes the G = H / Hkv query heads of KV head ``bh`` (the
GQA group, padded to 16 rows so ``tl.dot`` applies) over split ``s`` of its key range, runs an fp32 online
softmax (base 2), and writes a normalised partial ``out_s = softmax_s @ V_s`` with its ``lse_s``. A second
kernel merges the splits with log-sum-exp weights. The number of splits depends only on the buffer
shape, never on ``n`` or the selection, so a decode step launches identical grids every time (CUDA-graph
capturable); ``n`` is read on the device and splits past it run zero loop iterations (lse = -inf, out = 0).

Shapes as in :mod:`attnkit.kernels.torch_ref`. Configs are fixed per head dim (no autotune); at these configs
ptxas reports 80-128 registers for the dense kernel and 113-176 for the sparse one on sm_90, no spills.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

_SMS = 132  # H200; splits are sized to launch ~4 programs per SM.
_MAX_SPLITS = 64  # the combine kernel holds (splits, D) fp32 in registers
_LOG2E = 1.4426950408889634


#: Programmatic dependent launch (Hopper and newer) for every attnkit decode kernel: a kernel may be scheduled
#: while the one before it drains, and waits (``griddepcontrol.wait``) before its first read, so the launch gap
#: between the small kernels of a CUDA-graph decode step overlaps work. None: the ``ATTNKIT_PDL`` environment
#: variable decides ("1" on). Off by default: on an H100 it changed no per-layer time measurably
#: (benchmarks/decode_kernels.py's ``_pdl`` rows, notes/gpu.md 2026-12-06).
PDL: bool | None = None


@functools.cache
def _hopper(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl(t: torch.Tensor) -> bool:
    """Whether kernels launched for ``t``'s device use programmatic dependent launch (see :data:`PDL`)."""
    on = PDL if PDL is not None else os.environ.get("ATTNKIT_PDL", "0") == "1"
    return bool(on) and t.is_cuda and _hopper(t.device.index or 0)


@triton.jit
def _pdl_enter(PDL: tl.constexpr):
    """Under programmatic dependent launch: wait until the previous kernel's writes are visible, then let the
    next kernel be scheduled (it waits the same way, so every kernel of a chain still sees all earlier writes)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


def _block_n(head_dim: int) -> int:
    """Keys per loop iteration: a (BLOCK_N, D) bf16 tile of 8-16 KiB."""
    return {64: 64, 128: 64, 256: 32}[head_dim]


def num_splits(length: int, rows: int, block: int) -> tuple[int, int]:
    """(splits, split_len) for ``length`` keys and ``rows`` = B * Hkv programs per split.

    split_len is a multiple of ``block``; the result depends on shapes only (fixed launch per capacity).
    """
    want = max(1, math.ceil(4 * _SMS / max(rows, 1)))
    blocks = max(1, math.ceil(length / block))
    splits = min(_MAX_SPLITS, want, blocks)
    split_len = math.ceil(blocks / splits) * block
    return math.ceil(length / split_len), split_len


@triton.jit
def _load_group(q_ptr, b, h, stride_qb, stride_qh, G, G_PAD: tl.constexpr, D: tl.constexpr):
    """The G query heads h * G + g of batch row b as one (G_PAD, D) tile (padding rows 0): a KV head's group."""
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D)
    return tl.load(q_ptr + b * stride_qb + (h * G + offs_g[:, None]) * stride_qh + offs_d[None, :],
                   mask=offs_g[:, None] < G, other=0.0)


@triton.jit
def _attend_block(
    q, k_ptrs, v_ptrs, valid, m_i, l_i, acc, qk_scale,
):
    """One online-softmax step over a (BLOCK_N, D) tile; invalid keys are masked (never loaded)."""
    k = tl.load(k_ptrs, mask=valid[:, None], other=0.0)
    v = tl.load(v_ptrs, mask=valid[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k)) * qk_scale  # (G_PAD, BLOCK_N) fp32, log2 domain
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # While a row has seen no valid key m_new is -inf; shift by 0 then so exp2 gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _store_partial(op_ptr, lse_ptr, row0, split, n_splits, m_i, l_i, acc, offs_g, offs_d, G, D: tl.constexpr):
    """Write split ``split`` of rows ``row0 + g``: out = acc / l (0 if nothing attended), lse (natural log)."""
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    rows = (row0 + offs_g).to(tl.int64)
    g_mask = offs_g < G
    tl.store(lse_ptr + rows * n_splits + split, lse, mask=g_mask)
    o_ptrs = op_ptr + (rows[:, None] * n_splits + split) * D + offs_d[None, :]
    tl.store(o_ptrs, out, mask=g_mask[:, None])


@triton.jit(do_not_specialize=["n_int"])
def _dense_split_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, n_ptr, n_int, op_ptr, lse_ptr,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_pb, stride_ph,
    Hkv, G, cap, split_len, n_splits, qk_scale,
    N_FROM_PTR: tl.constexpr, D: tl.constexpr, G_PAD: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr,
):
    _pdl_enter(PDL)
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (bh // Hkv).to(tl.int64)
    h = (bh % Hkv).to(tl.int64)
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)

    q = _load_group(q_ptr, b, h, stride_qb, stride_qh, G, G_PAD, D)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    p_base = pos_ptr + b * stride_pb + h * stride_ph

    if N_FROM_PTR:
        n = tl.load(n_ptr).to(tl.int32)
    else:
        n = n_int
    end = tl.minimum(tl.minimum(n, cap), (split + 1) * split_len)
    start = split * split_len

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    # Splits at or past n run no iteration: lse = -inf, out = 0, and nothing is read.
    for block in range(start, end, BLOCK_N):
        slots = block + offs_n
        in_range = slots < end
        p = tl.load(p_base + slots, mask=in_range, other=-1)
        valid = in_range & (p >= 0)
        rows = slots.to(tl.int64)  # int64 row offsets: cap * stride can pass 2**31 for strided layouts
        k_ptrs = k_base + rows[:, None] * stride_kn + offs_d[None, :]
        v_ptrs = v_base + rows[:, None] * stride_vn + offs_d[None, :]
        m_i, l_i, acc = _attend_block(q, k_ptrs, v_ptrs, valid, m_i, l_i, acc, qk_scale)
    _store_partial(op_ptr, lse_ptr, bh * G, split, n_splits, m_i, l_i, acc, offs_g, offs_d, G, D)


@triton.jit
def _sparse_split_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, idx_ptr, op_ptr, lse_ptr,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_pb, stride_ph,
    stride_ib, stride_ih,
    Hsel, kv_div, G, cap, n_entries, split_len, n_splits, qk_scale,
    PAGE: tl.constexpr, D: tl.constexpr, G_PAD: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr,
):
    _pdl_enter(PDL)
    # The selection is a virtual list of n_entries * PAGE slots: element t is slot idx[t // PAGE] * PAGE + t % PAGE.
    # Splits cover ranges of t, so any page size works with any BLOCK_N and K/V rows are read in place.
    # Program bh takes selection row h of Hsel: its G query heads h * G + g read KV head h // kv_div (a KV head's
    # selection: Hsel = Hkv, kv_div = 1, G = H / Hkv; a query head's own: Hsel = H, kv_div = H / Hkv, G = 1).
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (bh // Hsel).to(tl.int64)
    h = (bh % Hsel).to(tl.int64)
    hk = h // kv_div
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)

    q = _load_group(q_ptr, b, h, stride_qb, stride_qh, G, G_PAD, D)
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    p_base = pos_ptr + b * stride_pb + hk * stride_ph
    i_base = idx_ptr + b * stride_ib + h * stride_ih

    total = n_entries * PAGE
    start = split * split_len
    end = tl.minimum(total, start + split_len)

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    for block in range(start, end, BLOCK_N):
        t = block + offs_n
        in_list = t < end
        page = tl.load(i_base + t // PAGE, mask=in_list, other=-1).to(tl.int64)
        slots = page * PAGE + t % PAGE
        in_range = in_list & (page >= 0) & (slots < cap)
        slots = tl.where(in_range, slots, 0)
        p = tl.load(p_base + slots, mask=in_range, other=-1)
        valid = in_range & (p >= 0)
        k_ptrs = k_base + slots[:, None] * stride_kn + offs_d[None, :]
        v_ptrs = v_base + slots[:, None] * stride_vn + offs_d[None, :]
        m_i, l_i, acc = _attend_block(q, k_ptrs, v_ptrs, valid, m_i, l_i, acc, qk_scale)
    _store_partial(op_ptr, lse_ptr, bh * G, split, n_splits, m_i, l_i, acc, offs_g, offs_d, G, D)


@triton.jit
def _combine_kernel(op_ptr, lse_ptr, out_ptr, n_splits, stride_ob, stride_oh, H,
                    D: tl.constexpr, S_PAD: tl.constexpr, PDL: tl.constexpr, LSE_OUT: tl.constexpr = False,
                    row_lse_ptr=None):
    """out[row] = sum_s exp(lse_s - lse) * out_s, lse = logsumexp_s lse_s; rows with all -inf give 0. With
    LSE_OUT, the row's lse (natural log, -inf for an empty row) goes to ``row_lse_ptr``."""
    _pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, S_PAD)
    offs_d = tl.arange(0, D)
    s_mask = offs_s < n_splits
    lse = tl.load(lse_ptr + row * n_splits + offs_s, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m_safe)  # 0 for empty splits and padding
    parts = tl.load(op_ptr + (row * n_splits + offs_s[:, None]) * D + offs_d[None, :], mask=s_mask[:, None], other=0.0)
    total = tl.sum(w, axis=0)
    out = tl.sum(parts * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    b = row // H
    h = row % H
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty))
    if LSE_OUT:
        tl.store(row_lse_ptr + row, tl.where(total > 0, m_safe + tl.log(tl.where(total > 0, total, 1.0)),
                                             float("-inf")))


@triton.jit
def _mass_kernel(q_ptr, k_ptr, pos_ptr, lse_ptr, mass_ptr,
                 stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_pb, stride_ph,
                 Hkv, G, n, qk_scale,
                 D: tl.constexpr, G_PAD: tl.constexpr, BLOCK_N: tl.constexpr):
    """Program (bh, block): mass[bh, j] = sum over the group's heads g of exp(q_g . k_j * scale - lse_g) over a
    block of slots (0 for invalid slots), from the rows' final lse: the probabilities, never written."""
    bh = tl.program_id(0)
    b, h = (bh // Hkv).to(tl.int64), (bh % Hkv).to(tl.int64)
    q = _load_group(q_ptr, b, h, stride_qb, stride_qh, G, G_PAD, D)
    g_mask = tl.arange(0, G_PAD) < G
    lse2 = tl.load(lse_ptr + bh * G + tl.arange(0, G_PAD), mask=g_mask, other=float("-inf")) * 1.4426950408889634
    slots = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    in_range = slots < n
    p = tl.load(pos_ptr + b * stride_pb + h * stride_ph + slots, mask=in_range, other=-1)
    valid = in_range & (p >= 0)
    k = tl.load(k_ptr + b * stride_kb + h * stride_kh + slots.to(tl.int64)[:, None] * stride_kn + offs_d[None, :],
                mask=valid[:, None], other=0.0)
    s = tl.dot(q, tl.trans(k)) * qk_scale  # (G_PAD, BLOCK_N), log2 domain
    keep = g_mask[:, None] & valid[None, :] & (lse2[:, None] > float("-inf"))
    prob = tl.where(keep, tl.exp2(s - tl.where(keep, lse2[:, None], 0.0)), 0.0)
    tl.store(mass_ptr + bh.to(tl.int64) * n + slots, tl.sum(prob, axis=0), mask=in_range)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> tuple[int, int, int, int, int]:
    batch, heads, one, dim = q.shape
    kv_heads, cap = k.shape[1], k.shape[2]
    if one != 1 or heads % kv_heads or dim not in (64, 128, 256):
        raise ValueError(f"unsupported decode shapes q {tuple(q.shape)}, k {tuple(k.shape)} (D must be 64/128/256)")
    if v.shape != k.shape or tuple(pos.shape) != (batch, kv_heads, cap):
        raise ValueError(f"k {tuple(k.shape)}, v {tuple(v.shape)} and pos {tuple(pos.shape)} disagree")
    for name, t in (("q", q), ("k", k), ("v", v), ("pos", pos)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dimension")
    return batch, heads, kv_heads, cap, dim


def _finish(
    op: torch.Tensor, lse: torch.Tensor, q: torch.Tensor, splits: int, out: torch.Tensor | None,
    row_lse: torch.Tensor | None = None,
) -> torch.Tensor:
    batch, heads, _, dim = q.shape
    if out is None:
        out = torch.empty_like(q)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be like q {tuple(q.shape)} {q.dtype}, got {tuple(out.shape)} {out.dtype}")
    _combine_kernel[(batch * heads,)](
        op, lse, out, splits, out.stride(0), out.stride(1), heads,
        D=dim, S_PAD=max(2, triton.next_power_of_2(splits)), num_warps=4 if dim <= 128 else 8,
        PDL=pdl(op), launch_pdl=pdl(op), LSE_OUT=row_lse is not None, row_lse_ptr=row_lse,
    )
    return out


def decode_attention_mass(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, n: int, scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attnkit.kernels.torch_ref.decode_attention_mass` in three launches: the split decode kernel, the
    merge (also writing each row's lse) and one pass over the keys for the probability mass per slot."""
    batch, heads, kv_heads, _, dim = _check(q, k, v, pos)
    group = heads // kv_heads
    scale = dim**-0.5 if scale is None else scale
    row_lse = torch.empty(batch, heads, device=q.device, dtype=torch.float32)
    out = _dense(q, k, v, pos, int(n), scale, None, row_lse)
    mass = torch.empty(batch, kv_heads, n, device=q.device, dtype=torch.float32)
    block = _block_n(dim)
    _mass_kernel[(batch * kv_heads, triton.cdiv(n, block))](
        q, k, pos, row_lse, mass,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), pos.stride(0), pos.stride(1),
        kv_heads, group, n, scale * _LOG2E,
        D=dim, G_PAD=max(16, triton.next_power_of_2(group)), BLOCK_N=block, num_warps=4,
    )
    return out, mass


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos: torch.Tensor,
    n: int | torch.Tensor,
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense split-KV decode attention; see :func:`attnkit.kernels.torch_ref.decode_attention`.

    ``n`` as a device tensor is read by the kernel (no sync); as an int it is a kernel argument. ``out``, if
    given, is written in place (a static output buffer for CUDA graphs).
    """
    return _dense(q, k, v, pos, n, q.shape[-1] ** -0.5 if scale is None else scale, out)


def _dense(q, k, v, pos, n, scale: float, out, row_lse=None) -> torch.Tensor:
    """The split decode kernel and the merge (``row_lse`` (B, H) fp32, if given, gets each row's lse)."""
    batch, heads, kv_heads, cap, dim = _check(q, k, v, pos)
    group = heads // kv_heads
    block = _block_n(dim)
    splits, split_len = num_splits(cap, batch * kv_heads, block)
    op = torch.empty(batch, heads, splits, dim, device=q.device, dtype=torch.float32)
    lse = torch.empty(batch, heads, splits, device=q.device, dtype=torch.float32)
    from_ptr = isinstance(n, torch.Tensor)
    _dense_split_kernel[(batch * kv_heads, splits)](
        q, k, v, pos, n if from_ptr else pos, 0 if from_ptr else int(n), op, lse,
        q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        pos.stride(0), pos.stride(1),
        kv_heads, group, cap, split_len, splits, scale * _LOG2E,
        N_FROM_PTR=from_ptr, D=dim, G_PAD=max(16, triton.next_power_of_2(group)), BLOCK_N=block,
        num_warps=4, num_stages=2, PDL=pdl(q), launch_pdl=pdl(q),
    )
    return _finish(op, lse, q, splits, out, row_lse)


def sparse_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos: torch.Tensor,
    idx: torch.Tensor,
    page_size: int,
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Split decode attention over selected pages; see :func:`attnkit.kernels.torch_ref.sparse_decode_attention`.

    K/V rows are read in place at the selected slots (no gathered copy); ``out`` as in :func:`decode_attention`.
    ``idx`` (B, H, K) gives each query head its own selection (one program per query head, reading its KV head).
    """
    batch, heads, kv_heads, cap, dim = _check(q, k, v, pos)
    if idx.shape[0] != batch or idx.shape[1] not in (kv_heads, heads) or idx.stride(-1) != 1:
        raise ValueError(f"idx {tuple(idx.shape)} must be (B, Hkv, K) or (B, H, K), contiguous in its last dimension")
    rows = idx.shape[1]  # selection rows: one program row each
    group = heads // rows
    scale = dim**-0.5 if scale is None else scale
    block = _block_n(dim)
    entries = idx.shape[2]
    splits, split_len = num_splits(max(1, entries * page_size), batch * rows, block)
    op = torch.empty(batch, heads, splits, dim, device=q.device, dtype=torch.float32)
    lse = torch.empty(batch, heads, splits, device=q.device, dtype=torch.float32)
    _sparse_split_kernel[(batch * rows, splits)](
        q, k, v, pos, idx, op, lse,
        q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        pos.stride(0), pos.stride(1),
        idx.stride(0), idx.stride(1),
        rows, rows // kv_heads, group, cap, entries, split_len, splits, scale * _LOG2E,
        PAGE=page_size, D=dim, G_PAD=max(16, triton.next_power_of_2(group)), BLOCK_N=block,
        num_warps=4, num_stages=2, PDL=pdl(q), launch_pdl=pdl(q),
    )
    return _finish(op, lse, q, splits, out)
