"""DHSA's attention-mass boundary scores without the (q, n) probabilities, in Triton (GPU; also run by the Triton
interpreter on CPU in tests).

``mass_ratios`` (attnkit/methods/read/dhsa.py) needs, from the head-averaged attention M of a forward's queries,
each key column's mass from the rows at least ``far`` slots below it, plus a narrow band near the diagonal. In
torch that is a float32 pass over every (head, query, key) probability: about 13 s at 128K on an H100 (512 row
blocks of 4 GiB scores), more than DHSA saves. Here two kernels read q and k only:

- ``row_lse``: each query's log-sum-exp over its visible keys (an online softmax, no output);
- ``far_mass``: program (key block, b * H + h) loops over the query blocks below the key block and sums
  ``exp(q.k * scale - lse)`` over rows whose slot is >= the key's slot + ``far``, into (B, H, n) float32.

Visibility is ``causal_visibility``'s: key j is seen by query i when 0 <= pos_j <= pos_i. Both kernels skip key
or query blocks on the wrong side of the diagonal by slot, which needs positions that increase with the slot
among real tokens (a prefill cache holding every token in order, left padding included); both check it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _batch_head(H):
    """Grid axis 1 is b * H + h: (that index, b, h)."""
    bh = tl.program_id(1)
    return bh, (bh // H).to(tl.int64), (bh % H).to(tl.int64)


@triton.jit
def _tile(x_ptr, pos_ptr, base, offs, stride_row, pos_base, n, D: tl.constexpr):
    """Rows ``offs`` (< n) of one (batch, head) matrix as an (len, D) tile, their positions (-1 past n) and mask."""
    ok = offs < n
    x = tl.load(x_ptr + base + offs[:, None] * stride_row + tl.arange(0, D)[None, :], mask=ok[:, None], other=0.0)
    return x, tl.load(pos_ptr + pos_base + offs, mask=ok, other=-1), ok


@triton.jit
def _scores(q, k, scale_log2, IEEE: tl.constexpr):
    """q.k^T in log2 units, (M, N) float32; float32 inputs keep full precision (no TF32)."""
    if IEEE:
        return tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2
    return tl.dot(q, tl.trans(k)) * scale_log2


@triton.jit
def _row_lse_kernel(
    q_ptr, k_ptr, qpos_ptr, kpos_ptr, lse_ptr,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    H, G, Q, N, scale_log2,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh, b, h = _batch_head(H)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    q, qp, row_ok = _tile(q_ptr, qpos_ptr, b * stride_qb + h * stride_qh, offs_m, stride_qm, b * Q, Q, D)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    hi = (pid_m + 1) * BLOCK_M + N - Q  # keys past the block's last slot are never visible (masked past N)
    for start in range(0, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k, kp, _ = _tile(k_ptr, kpos_ptr, b * stride_kb + (h // G) * stride_kh, offs_n, stride_kn, b * N, N, D)
        s = _scores(q, k, scale_log2, IEEE)
        s = tl.where((kp[None, :] >= 0) & (kp[None, :] <= qp[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), 1)
        m_i = m_new
    lse = (m_i + tl.log2(l_i)) / 1.4426950408889634  # natural log; -inf for a row that sees nothing
    tl.store(lse_ptr + bh.to(tl.int64) * Q + offs_m, lse, mask=row_ok)


@triton.jit
def _far_mass_kernel(
    q_ptr, k_ptr, qpos_ptr, kpos_ptr, lse_ptr, out_ptr,
    stride_qb, stride_qh, stride_qm, stride_kb, stride_kh, stride_kn,
    H, G, Q, N, FAR, scale_log2,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh, b, h = _batch_head(H)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k, kp, col_ok = _tile(k_ptr, kpos_ptr, b * stride_kb + (h // G) * stride_kh, offs_n, stride_kn, b * N, N, D)
    acc = tl.zeros([BLOCK_N], tl.float32)
    # query i sits at slot i + N - Q; it counts for key j when that slot is >= j + FAR
    lo = pid_n * BLOCK_N + FAR - (N - Q)
    if lo < 0:
        lo = 0
    lo = (lo // BLOCK_M) * BLOCK_M
    for start in range(lo, Q, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        q, qp, row_ok = _tile(q_ptr, qpos_ptr, b * stride_qb + h * stride_qh, offs_m, stride_qm, b * Q, Q, D)
        lse = tl.load(lse_ptr + bh.to(tl.int64) * Q + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
        s = _scores(q, k, scale_log2, IEEE)
        ok = (kp[None, :] >= 0) & (kp[None, :] <= qp[:, None]) & row_ok[:, None]
        ok = ok & ((offs_m[:, None] + (N - Q)) >= (offs_n[None, :] + FAR))
        acc += tl.sum(tl.where(ok, tl.exp2(s - lse[:, None]), 0.0), 0)
    tl.store(out_ptr + bh.to(tl.int64) * N + offs_n, acc, mask=col_ok)


def _blocks(head_dim: int) -> tuple[int, int]:
    return (64, 64) if head_dim > 128 else (128, 64)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as the kernels read it: any batch / head / row strides, unit stride along D (a copy only otherwise)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def check_order(kpos: torch.Tensor) -> None:
    """The kernels' slot-order shortcut holds: kpos (B, n) increases along the real slots, padding only on the
    left (one host sync)."""
    real = kpos >= 0
    later = (kpos[:, 1:] > kpos[:, :-1]) | ~real[:, :-1]
    if not bool((later & real[:, 1:] | ~real[:, 1:] & ~real[:, :-1]).all()):
        raise ValueError("the mass kernels need positions that increase with the slot, padding on the left only")


def row_lse(query: torch.Tensor, key: torch.Tensor, qpos: torch.Tensor, kpos: torch.Tensor,
            scaling: float) -> torch.Tensor:
    """query (B, H, q, D), the last q slots; key (B, Hkv, n, D); qpos (B, q), kpos (B, n) positions -> (B, H, q)
    float32 natural log-sum-exp of ``q.k * scaling`` over the visible keys (-inf where none is)."""
    b, h, q, d = query.shape
    n = key.shape[2]
    check_order(kpos)
    query, key = _rows(query), _rows(key)
    qpos, kpos = qpos.to(torch.int64).contiguous(), kpos.to(torch.int64).contiguous()
    out = torch.empty(b, h, q, device=query.device, dtype=torch.float32)
    bm, bn = _blocks(d)
    _row_lse_kernel[(triton.cdiv(q, bm), b * h)](
        query, key, qpos, kpos, out, query.stride(0), query.stride(1), query.stride(2),
        key.stride(0), key.stride(1), key.stride(2), h, h // key.shape[1], q, n, scaling * LOG2E,
        D=d, BLOCK_M=bm, BLOCK_N=bn, IEEE=query.dtype == torch.float32)
    return out


def far_mass(query: torch.Tensor, key: torch.Tensor, qpos: torch.Tensor, kpos: torch.Tensor, scaling: float,
             far: int, lse: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, n) float32: per head, key column j's attention mass from the visible queries whose slot is at least
    j + ``far`` (query i at slot i + n - q). Shapes as ``row_lse``; ``lse`` (B, H, q) from it if at hand."""
    b, h, q, d = query.shape
    n = key.shape[2]
    check_order(kpos)
    if lse is None:
        lse = row_lse(query, key, qpos, kpos, scaling)
    query, key = _rows(query), _rows(key)
    qpos, kpos = qpos.to(torch.int64).contiguous(), kpos.to(torch.int64).contiguous()
    out = torch.empty(b, h, n, device=query.device, dtype=torch.float32)
    bm, bn = _blocks(d)
    _far_mass_kernel[(triton.cdiv(n, bn), b * h)](
        query, key, qpos, kpos, lse.contiguous(), out, query.stride(0), query.stride(1), query.stride(2),
        key.stride(0), key.stride(1), key.stride(2), h, h // key.shape[1], q, n, far, scaling * LOG2E,
        D=d, BLOCK_M=bm, BLOCK_N=bn, IEEE=query.dtype == torch.float32)
    return out
