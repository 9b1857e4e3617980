"""Quest decode in three launches: fused page scoring, top-k + sparse attention in one kernel, the split merge.

The unfused path takes four: scoring (:func:`~attnkit.kernels.triton_select.quest_scores_masked`), a top-k
(:func:`~attnkit.kernels.triton_select.topk_bisect`, one program per KV head: 8 programs on an H200's 132 SMs),
the sparse split kernel and the merge. Here every split program of the sparse kernel finds the row's top-k
itself: the row's scores (P fp32, read from L2) are bisected in registers, so the selection runs on all
``B * Hkv * splits`` programs at once instead of ``B * Hkv`` and no selection is written and read back.

Selection rule (identical to ``topk_bisect``, so the two paths read the same pages): bisect the value range of
the finite scores for the largest t with count(x >= t) >= K (stopping early once the count is exactly K), take
the pages with x >= t in index order, drop those past K (near-ties within 2^-ITERS of the range go to the lower
page ids); -inf pages are never taken, +inf (the forced last page) always. Split ``s`` of a row reads the
selected pages of ranks ``[s * E, (s + 1) * E)`` in place, ``E = ceil(K / splits)``; it also writes their ids
(``-1`` where fewer than K pages are selectable), so callers and tests see the selection.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from attnkit.kernels.triton_decode import _LOG2E, _SMS, _attend_block, _check, _finish, _pdl_enter, _store_partial, pdl
from attnkit.kernels.triton_select import quest_scores_masked

#: pages the fused kernel serves (a page is read as PAGE // TILE tiles of TILE tokens)
PAGES = (16, 32, 64, 128)
#: rows of up to this many pages keep their scores in registers
MAX_PAGES = 16384


@triton.jit
def _row_threshold(x, valid, K, ITERS: tl.constexpr):
    """The bisection threshold of ``topk_bisect``: largest t (to 2^-ITERS of the range) with count(x >= t) >= K,
    -inf when at most K scores are valid. Stops as soon as the count is exactly K."""
    n_valid = tl.sum(valid.to(tl.int32), 0)
    finite = valid & (x < float("inf"))
    lo = tl.min(tl.where(finite, x, float("inf")), 0)
    hi = tl.max(tl.where(finite, x, float("-inf")), 0)
    it = 0
    exact = n_valid <= K  # nothing to bisect: every valid page is taken
    while (it < ITERS) & (exact == 0):
        mid = lo + (hi - lo) * 0.5
        count = tl.sum((x >= mid).to(tl.int32), 0)
        enough = count >= K
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid)
        exact = count == K
        it += 1
    return tl.where(n_valid > K, lo, float("-inf"))


@triton.jit
def _quest_attend_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, s_ptr, idx_ptr, op_ptr, lse_ptr,
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_pb, stride_ph,
    Hkv, G, cap, P, K, n_splits, qk_scale,
    ITERS: tl.constexpr, PAGE: tl.constexpr, TILE: tl.constexpr, ENTRIES: tl.constexpr,
    D: tl.constexpr, G_PAD: tl.constexpr, BLOCK_P: tl.constexpr, PDL: tl.constexpr,
):
    _pdl_enter(PDL)
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (bh // Hkv).to(tl.int64)
    h = (bh % Hkv).to(tl.int64)

    # the row's selection, recomputed by every split program (same data, same ops: the same pages)
    offs_p = tl.arange(0, BLOCK_P)
    x = tl.load(s_ptr + bh.to(tl.int64) * P + offs_p, mask=offs_p < P, other=float("-inf"))
    valid = x > float("-inf")
    t = _row_threshold(x, valid, K, ITERS)
    sel = valid & (x >= t)
    rank = tl.cumsum(sel.to(tl.int32), 0) - 1

    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D)
    offs_t = tl.arange(0, TILE)
    q = tl.load(q_ptr + b * stride_qb + (h * G + offs_g[:, None]) * stride_qh + offs_d[None, :],
                mask=offs_g[:, None] < G, other=0.0)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    p_base = pos_ptr + b * stride_pb + h * stride_ph

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    for e in tl.static_range(ENTRIES):
        entry = split * ENTRIES + e
        hit = sel & (rank == entry) & (entry < K)
        has = tl.sum(hit.to(tl.int32), 0) > 0
        page = tl.sum(tl.where(hit, offs_p, 0), 0).to(tl.int64)
        tl.store(idx_ptr + bh.to(tl.int64) * K + entry, tl.where(has, page, -1), mask=entry < K)
        for sub in tl.static_range(PAGE // TILE):
            slots = page * PAGE + sub * TILE + offs_t
            in_range = has & (slots < cap)
            slots = tl.where(in_range, slots, 0)
            p = tl.load(p_base + slots, mask=in_range, other=-1)
            ok = in_range & (p >= 0)
            k_ptrs = k_base + slots[:, None] * stride_kn + offs_d[None, :]
            v_ptrs = v_base + slots[:, None] * stride_vn + offs_d[None, :]
            m_i, l_i, acc = _attend_block(q, k_ptrs, v_ptrs, ok, m_i, l_i, acc, qk_scale)
    _store_partial(op_ptr, lse_ptr, bh * G, split, n_splits, m_i, l_i, acc, offs_g, offs_d, G, D)


def quest_splits(k: int, rows: int) -> tuple[int, int]:
    """(splits, entries per split) for K selected pages over ``rows`` = B * Hkv: about 4 programs per SM."""
    want = max(1, math.ceil(4 * _SMS / max(rows, 1)))
    splits = max(1, min(k, want))
    entries = math.ceil(k / splits)
    return math.ceil(k / entries), entries


def quest_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos: torch.Tensor,
    summary: torch.Tensor,
    k_pages: int,
    n_valid_pages: int | torch.Tensor,
    page_size: int,
    scale: float | None = None,
    force_last: bool = True,
    out: torch.Tensor | None = None,
    idx_out: torch.Tensor | None = None,
    iters: int = 32,
) -> torch.Tensor:
    """Quest decode attention: the top ``k_pages`` pages by bound, then attention over their valid slots.

    Same result as ``sparse_decode_attention(q, k, v, pos, topk_bisect(quest_scores_masked(q, summary,
    n_valid_pages, force_last), k_pages), page_size)``, in three launches.

    Parameters
    ----------
    q : (B, H, 1, D); k, v : (B, Hkv, cap, D); pos : (B, Hkv, cap) (slot valid iff pos >= 0)
    summary : (B, Hkv, P, 2, D) contiguous page bounds; page p covers slots [p * page_size, (p + 1) * page_size)
    k_pages : pages read per KV head; n_valid_pages : int or device tensor (pages >= it are never read)
    page_size : one of :data:`PAGES`; force_last : always read page n_valid_pages - 1
    iters : bisection steps (resolution 2^-iters of the score range)
    out : optional (B, H, 1, D) output buffer; idx_out : optional (B, Hkv, k_pages) int64 buffer for the ids

    Returns
    -------
    out : (B, H, 1, D) in q's dtype (zero for rows with nothing to read)
    """
    batch, heads, kv_heads, cap, dim = _check(q, k, v, pos)
    pages = summary.shape[2]
    if page_size not in PAGES or pages > MAX_PAGES or k_pages < 1:
        raise ValueError(f"quest_attention serves pages {PAGES} up to {MAX_PAGES} per row and k_pages >= 1; got "
                         f"page_size={page_size}, {pages} pages, k_pages={k_pages}")
    scores = quest_scores_masked(q, summary, n_valid_pages, force_last)  # (B, Hkv, P) fp32
    if idx_out is None:
        idx_out = torch.empty(batch, kv_heads, k_pages, dtype=torch.int64, device=q.device)
    group = heads // kv_heads
    scale = dim**-0.5 if scale is None else scale
    splits, entries = quest_splits(k_pages, batch * kv_heads)
    op = torch.empty(batch, heads, splits, dim, device=q.device, dtype=torch.float32)
    lse = torch.empty(batch, heads, splits, device=q.device, dtype=torch.float32)
    block_p = max(16, triton.next_power_of_2(pages))
    tile = min(page_size, 64)
    _quest_attend_kernel[(batch * kv_heads, splits)](
        q, k, v, pos, scores, idx_out, op, lse,
        q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        pos.stride(0), pos.stride(1),
        kv_heads, group, cap, pages, k_pages, splits, scale * _LOG2E,
        ITERS=iters, PAGE=page_size, TILE=tile,
        ENTRIES=entries, D=dim, G_PAD=max(16, triton.next_power_of_2(group)), BLOCK_P=block_p,
        num_warps=8 if block_p >= 4096 else 4, num_stages=2, PDL=pdl(q), launch_pdl=pdl(q),
    )
    return _finish(op, lse, q, splits, out)
