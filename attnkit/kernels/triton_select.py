"""Fused Quest page scoring in Triton (GPU; also run by the Triton interpreter on CPU in tests).

:func:`quest_scores_masked` does in one launch what :func:`attnkit.kernels.torch_ref.quest_scores` followed by the
masking half of :func:`attnkit.kernels.torch_ref.topk_pages` do in about ten small torch kernels: program
``(bh, blk)`` builds the group weights ``[sum_g relu(q_g), sum_g min(q_g, 0)]`` of KV head ``bh`` from q in fp32,
reads ``BLOCK_P`` pages of the summary once, and writes the fp32 bound with the selection masks applied:
-inf for empty pages and pages ``>= n_valid_pages``, +inf for page ``n_valid_pages - 1`` when ``force_last``.
The grid depends on the summary shape only and ``n_valid_pages`` may be read on the device: no host sync,
identical launches every decode step (CUDA-graph capturable). The top-k itself stays :func:`torch.topk`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from attnkit.kernels.triton_decode import _block_n, _pdl_enter, num_splits, pdl


def _block_p(head_dim: int) -> int:
    """Pages per program: a (BLOCK_P, 2, D) half-precision tile of 8 KiB."""
    return {64: 64, 128: 32, 256: 16}.get(head_dim, 32)


@triton.jit(do_not_specialize=["n_int"])
def _quest_masked_kernel(
    q_ptr, s_ptr, n_ptr, n_int, out_ptr,
    stride_qb, stride_qh,
    Hkv, G, P,
    N_FROM_PTR: tl.constexpr, FORCE_LAST: tl.constexpr,
    D: tl.constexpr, G_PAD: tl.constexpr, BLOCK_P: tl.constexpr, PDL: tl.constexpr,
):
    _pdl_enter(PDL)
    bh = tl.program_id(0)
    blk = tl.program_id(1)
    b = (bh // Hkv).to(tl.int64)
    h = (bh % Hkv).to(tl.int64)
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D)
    offs_p = blk * BLOCK_P + tl.arange(0, BLOCK_P)
    p_mask = offs_p < P

    q_ptrs = q_ptr + b * stride_qb + (h * G + offs_g[:, None]) * stride_qh + offs_d[None, :]
    qg = tl.load(q_ptrs, mask=offs_g[:, None] < G, other=0.0).to(tl.float32)  # padded rows add 0 to both sums
    w_pos = tl.sum(tl.maximum(qg, 0.0), axis=0)  # (D,)
    w_neg = tl.sum(tl.minimum(qg, 0.0), axis=0)

    # summary is contiguous (B, Hkv, P, 2, D): page p of row bh starts at (bh * P + p) * 2D.
    rows = (bh.to(tl.int64) * P + offs_p.to(tl.int64)) * (2 * D)
    ptrs = s_ptr + rows[:, None] + offs_d[None, :]
    kmax = tl.load(ptrs, mask=p_mask[:, None], other=0.0).to(tl.float32)
    kmin = tl.load(ptrs + D, mask=p_mask[:, None], other=0.0).to(tl.float32)
    score = tl.sum(kmax * w_pos[None, :] + kmin * w_neg[None, :], axis=1)  # (BLOCK_P,) fp32

    if N_FROM_PTR:
        n = tl.load(n_ptr).to(tl.int32)
    else:
        n = n_int
    # An empty page holds max = -inf (and min = +inf), so its score above is -inf or NaN: mark it explicitly.
    first_max = tl.load(s_ptr + rows, mask=p_mask, other=0.0).to(tl.float32)
    drop = (first_max == float("-inf")) | (offs_p >= n)
    score = tl.where(drop, float("-inf"), score)
    if FORCE_LAST:
        score = tl.where(offs_p == n - 1, float("inf"), score)  # after the masks, as topk_pages does
    tl.store(out_ptr + bh.to(tl.int64) * P + offs_p, score, mask=p_mask)


def quest_scores_masked(
    q: torch.Tensor,
    summary: torch.Tensor,
    n_valid_pages: int | torch.Tensor,
    force_last: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quest scores with the selection masks, fused: ``topk_pages``' masked scores of ``quest_scores``.

    Parameters
    ----------
    q : (B, H, 1, D), contiguous in its last dimension
    summary : (B, Hkv, P, 2, D) contiguous, as from :func:`attnkit.kernels.torch_ref.page_summaries`
        (bf16/fp16 on the GPU; fp32 also works, in the interpreter tests)
    n_valid_pages : int, or 0-d/1-element int tensor on q's device (read by the kernel: no sync)
    force_last : give page ``n_valid_pages - 1`` a score of +inf (overrides the -inf of an empty page)
    out : optional (B, Hkv, P) float32 contiguous buffer, written in place

    Returns
    -------
    scores : (B, Hkv, P) float32; unscaled (a positive scale does not change the ranking); accumulated in fp32
        from the exact summary values (torch_ref rounds its matvec to the summary dtype).
    """
    batch, heads, one, dim = q.shape
    if summary.dim() != 5 or summary.shape[0] != batch or summary.shape[3] != 2 or summary.shape[4] != dim:
        raise ValueError(f"summary {tuple(summary.shape)} must be (B, Hkv, P, 2, D) for q {tuple(q.shape)}")
    kv_heads, pages = summary.shape[1], summary.shape[2]
    if one != 1 or heads % kv_heads or dim & (dim - 1):
        raise ValueError(f"unsupported shapes q {tuple(q.shape)}, summary {tuple(summary.shape)}")
    if not summary.is_contiguous() or q.stride(-1) != 1:
        raise ValueError("summary must be contiguous and q contiguous in its last dimension")
    if out is None:
        out = torch.empty(batch, kv_heads, pages, device=q.device, dtype=torch.float32)
    elif tuple(out.shape) != (batch, kv_heads, pages) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous ({batch}, {kv_heads}, {pages}) float32 tensor")
    if pages == 0 or batch * kv_heads == 0:
        return out
    from_ptr = isinstance(n_valid_pages, torch.Tensor)
    n_arg = n_valid_pages.reshape(-1) if from_ptr else out  # a dummy pointer when n is an int
    if from_ptr and n_arg.device != q.device:
        n_arg = n_arg.to(q.device)
    group = heads // kv_heads
    block = _block_p(dim)
    _quest_masked_kernel[(batch * kv_heads, triton.cdiv(pages, block))](
        q, summary, n_arg, 0 if from_ptr else int(n_valid_pages), out,
        q.stride(0), q.stride(1),
        kv_heads, group, pages,
        N_FROM_PTR=from_ptr, FORCE_LAST=bool(force_last),
        D=dim, G_PAD=max(2, triton.next_power_of_2(group)), BLOCK_P=block,
        num_warps=4, PDL=pdl(q), launch_pdl=pdl(q),
    )
    return out


@triton.jit
def _topk_bisect_kernel(s_ptr, out_ptr, P, K, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, ITERS: tl.constexpr,
                        PDL: tl.constexpr):
    _pdl_enter(PDL)
    # One program per row: the row's scores stay in registers; bisect the value range for the largest t with
    # count(x >= t) >= K, then write the ids of x >= t in index order (ties past K dropped), -1 after them.
    r = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    x = tl.load(s_ptr + r * P + offs, mask=offs < P, other=float("-inf"))
    valid = x > float("-inf")
    n_valid = tl.sum(valid.to(tl.int32), 0)
    finite = valid & (x < float("inf"))
    lo = tl.min(tl.where(finite, x, float("inf")), 0)
    hi = tl.max(tl.where(finite, x, float("-inf")), 0)
    for _ in range(ITERS):
        mid = lo + (hi - lo) * 0.5
        enough = tl.sum((x >= mid).to(tl.int32), 0) >= K
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid)
    t = tl.where(n_valid > K, lo, float("-inf"))
    sel = valid & (x >= t)
    rank = tl.cumsum(sel.to(tl.int32), 0) - 1
    tl.store(out_ptr + r * K + rank, offs.to(tl.int64), mask=sel & (rank < K))
    taken = tl.minimum(tl.sum(sel.to(tl.int32), 0), K)
    offs_k = tl.arange(0, BLOCK_K)
    tl.store(out_ptr + r * K + offs_k, tl.full((BLOCK_K,), -1, tl.int64), mask=(offs_k >= taken) & (offs_k < K))


#: rows up to this many scores take the one-program bisection top-k (registers); longer rows use torch.topk
BISECT_MAX = 16384


def topk_bisect(scores: torch.Tensor, k: int, iters: int = 32) -> torch.Tensor:
    """Top-k ids of already-masked scores (..., P) float32 -> (..., k) int64, -1 for -inf picks / padding.

    One launch, one program per row (torch.topk runs a radix select per row: 20-80 us for 8 rows on an H200).
    Ids come in index order; among values within 2^-iters of the range of the k-th largest, the lower ids win.
    """
    pages = scores.shape[-1]
    rows = scores.reshape(-1, pages)
    if not rows.is_contiguous() or rows.dtype != torch.float32:
        rows = rows.float().contiguous()
    out = torch.empty(rows.shape[0], k, dtype=torch.int64, device=scores.device)
    block = max(16, triton.next_power_of_2(pages))
    _topk_bisect_kernel[(rows.shape[0],)](
        rows, out, pages, k, BLOCK=block, BLOCK_K=max(16, triton.next_power_of_2(k)), ITERS=iters,
        num_warps=8 if block >= 4096 else 4, PDL=pdl(out), launch_pdl=pdl(out),
    )
    return out.view(*scores.shape[:-1], k)


def topk_from_masked(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``topk_pages``' second half on already-masked scores: (B, Hkv, k) int64 ids, -1 for -inf picks / padding."""
    pages = scores.shape[-1]
    take = min(k, pages)
    top, idx = torch.topk(scores, take, dim=-1, sorted=False)
    idx = idx.masked_fill(top == float("-inf"), -1)
    if take < k:
        idx = torch.nn.functional.pad(idx, (0, k - take), value=-1)
    return idx


def select_pages(
    q: torch.Tensor,
    summary: torch.Tensor,
    k: int,
    n_valid_pages: int | torch.Tensor,
    force_last: bool = True,
    scores_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused scoring + :func:`torch.topk`; same output as ``topk_pages(quest_scores(q, summary), ...)``."""
    scores = quest_scores_masked(q, summary, n_valid_pages, force_last, out=scores_out)
    if scores.shape[-1] <= BISECT_MAX:
        return topk_bisect(scores, k)
    return topk_from_masked(scores, k)


# ---------------------------------------------------------------------------------------------------------------
# TokenSelect soft voting: per-head softmax of q.k over the candidate slots, summed over heads.

_LOG2E = 1.4426950408889634


@triton.jit(do_not_specialize=["lo"])
def _ts_scores_kernel(
    q_ptr, k_ptr, pos_ptr, hi_ptr, skip_ptr, s_ptr, m_ptr, l_ptr,
    stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_pb,
    Hkv, G, span, split_len, n_splits, lo,
    D: tl.constexpr, G_PAD: tl.constexpr, BLOCK_N: tl.constexpr, HAS_SKIP: tl.constexpr, PDL: tl.constexpr,
):
    """Program (bh, split): raw scores q_g . k of KV head bh's group over its split of the span (-inf off the
    candidates), and the split's running max / exp-sum per query head. With HAS_SKIP, rows b with skip[b] != 0
    return at once (their outputs are left as they were)."""
    _pdl_enter(PDL)
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (bh // Hkv).to(tl.int64)
    if HAS_SKIP:
        if tl.load(skip_ptr + b) != 0:
            return
    h = (bh % Hkv).to(tl.int64)
    offs_g = tl.arange(0, G_PAD)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < G
    q = tl.load(q_ptr + b * stride_qb + (h * G + offs_g[:, None]) * stride_qh + offs_d[None, :],
                mask=g_mask[:, None], other=0.0)
    hi = tl.load(hi_ptr + b)
    k_base = k_ptr + b * stride_kb + h * stride_kh
    rows = (bh.to(tl.int64) * G + offs_g).to(tl.int64)  # score rows of this program's query heads
    start = split * split_len
    end = tl.minimum(span, start + split_len)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    for block in range(start, end, BLOCK_N):
        slots = block + offs_n
        in_range = slots < end
        p = tl.load(pos_ptr + b * stride_pb + slots, mask=in_range, other=-1)
        cand = in_range & (p >= lo) & (p < hi)
        # masked by the range alone: the key load then does not wait for the position load (non-candidates, a
        # few hundred sink / local slots, are read and dropped below)
        k = tl.load(k_base + slots.to(tl.int64)[:, None] * stride_kn + offs_d[None, :], mask=in_range[:, None],
                    other=0.0)
        s = tl.dot(q, tl.trans(k))  # (G_PAD, BLOCK_N) fp32
        s = tl.where(cand[None, :], s, float("-inf"))
        tl.store(s_ptr + rows[:, None] * span + slots[None, :], s, mask=g_mask[:, None] & in_range[None, :])
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2((m_i - m_safe) * 1.4426950408889634) + tl.sum(
            tl.exp2((s - m_safe[:, None]) * 1.4426950408889634), axis=1)
        m_i = m_new
    tl.store(m_ptr + rows * n_splits + split, m_i, mask=g_mask)
    tl.store(l_ptr + rows * n_splits + split, l_i, mask=g_mask)


@triton.jit(do_not_specialize=["lo"])
def _ts_votes_kernel(
    s_ptr, m_ptr, l_ptr, pos_ptr, hi_ptr, skip_ptr, v_ptr,
    stride_pb, ROWS, span, n_splits, lo,
    ROWS_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr, BLOCK: tl.constexpr, HAS_SKIP: tl.constexpr,
    PDL: tl.constexpr,
):
    """Program (b, block): each query head's softmax weight exp(s - max) / sum from the split statistics, summed
    over the ROWS = Hkv * G query heads of batch row b, for BLOCK slots; -inf off the candidates. Skipped rows
    (HAS_SKIP) write nothing."""
    _pdl_enter(PDL)
    b = tl.program_id(0).to(tl.int64)
    if HAS_SKIP:
        if tl.load(skip_ptr + b) != 0:
            return
    offs_r = tl.arange(0, ROWS_PAD)
    offs_s = tl.arange(0, SPLITS_PAD)
    stat = (b * ROWS + offs_r[:, None]) * n_splits + offs_s[None, :]
    stat_ok = (offs_r[:, None] < ROWS) & (offs_s[None, :] < n_splits)
    m = tl.load(m_ptr + stat, mask=stat_ok, other=float("-inf"))
    l = tl.load(l_ptr + stat, mask=stat_ok, other=0.0)
    top = tl.max(m, axis=1)  # (ROWS_PAD,)
    top = tl.where(top == float("-inf"), 0.0, top)
    total = tl.sum(l * tl.exp2((m - top[:, None]) * 1.4426950408889634), axis=1)  # splits without candidates: 0
    inv = tl.where(total > 0, 1.0 / total, 1.0)
    slots = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_span = slots < span
    rows = b * ROWS + offs_r
    s = tl.load(s_ptr + rows[:, None] * span + slots[None, :], mask=(offs_r[:, None] < ROWS) & in_span[None, :],
                other=float("-inf"))
    w = tl.exp2((s - top[:, None]) * 1.4426950408889634) * inv[:, None]
    votes = tl.sum(w, axis=0)  # (BLOCK,)
    p = tl.load(pos_ptr + b * stride_pb + slots, mask=in_span, other=-1)
    hi = tl.load(hi_ptr + b)
    votes = tl.where((p >= lo) & (p < hi), votes, float("-inf"))
    tl.store(v_ptr + b * span + slots, votes, mask=in_span)


def tokenselect_votes(
    q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, lo: int, hi: torch.Tensor, span: int,
    skip: torch.Tensor | None = None, block: int | None = None, stages: int = 2,
) -> torch.Tensor:
    """Triton path of :func:`attnkit.kernels.torch_ref.tokenselect_votes` (same contract): one pass over the
    candidate keys writes fp32 scores and per-split softmax statistics, a second kernel turns them into the votes
    (the per-head weights are never written: 2 launches and one read of the scores instead of ~6 torch kernels).
    ``skip`` (B,) bool: rows whose votes are not needed (TokenSelect's Selection Cache reuses their picks) read
    no key and get unspecified votes. ``block`` keys per loop step (default: the decode kernels' tile) and ``stages`` pipeline stages: tuning knobs
    timed by ``benchmarks/decode_kernels.py``."""
    hi = hi.reshape(q.shape[0]).to(torch.int64).contiguous()
    skip_arg = skip.reshape(q.shape[0]).to(torch.int8) if skip is not None else None
    scores, m, l = _scores(q, k, pos, lo, hi, span, skip_arg, block, stages)
    return votes_from_scores(scores, m, l, pos, lo, hi, skip_arg)


def head_scores(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, lo: int, hi: torch.Tensor,
                span: int) -> torch.Tensor:
    """Triton path of :func:`attnkit.kernels.torch_ref.head_scores` (same contract): the scoring pass of
    :func:`tokenselect_votes` alone, (B, H, span) fp32 (the per-split statistics are left unused)."""
    hi = hi.reshape(q.shape[0]).to(torch.int64).contiguous()
    return _scores(q, k, pos, lo, hi, span)[0].view(q.shape[0], q.shape[1], span)


def _scores(q, k, pos, lo: int, hi: torch.Tensor, span: int, skip: torch.Tensor | None = None,
            block: int | None = None, stages: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The scoring kernel: (scores (B, Hkv, G, span) fp32, each split's max m and exp-sum l (B, Hkv, G, splits));
    hi (B,) int64, skip (B,) int8 or None."""
    batch, heads, one, dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    block = block or _block_n(dim)
    splits, split_len = num_splits(span, batch * kv_heads, block)
    scores = torch.empty((batch, kv_heads, group, span), device=q.device, dtype=torch.float32)
    m = torch.empty((batch, kv_heads, group, splits), device=q.device, dtype=torch.float32)
    l = torch.empty_like(m)
    _ts_scores_kernel[(batch * kv_heads, splits)](
        q, k, pos, hi, skip if skip is not None else hi, scores, m, l,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2), pos.stride(0),
        kv_heads, group, span, split_len, splits, int(lo),
        D=dim, G_PAD=max(16, triton.next_power_of_2(group)), BLOCK_N=block, num_warps=4, num_stages=stages,
        HAS_SKIP=skip is not None, PDL=pdl(q), launch_pdl=pdl(q),
    )
    return scores, m, l


def votes_from_scores(
    scores: torch.Tensor, m: torch.Tensor, l: torch.Tensor, pos: torch.Tensor, lo: int, hi: torch.Tensor,
    skip: torch.Tensor | None = None,
) -> torch.Tensor:
    """The votes kernel alone: scores (B, Hkv, G, span) fp32 (-inf off the candidates); m, l (B, Hkv, G, splits)
    each split's max and sum of exp(s - max) (m -inf, l 0 for a split without candidates); pos (B, Hkv, cap);
    hi (B,) int64; skip (B,) int8, rows left unwritten -> votes (B, span) fp32, -inf off the candidates."""
    batch, kv_heads, group, span = scores.shape
    splits = m.shape[-1]
    votes = torch.empty((batch, span), device=scores.device, dtype=torch.float32)
    rows = kv_heads * group
    block = 128 if rows <= 32 else 32  # (rows x block) fp32 weights in registers
    _ts_votes_kernel[(batch, triton.cdiv(span, block))](
        scores, m, l, pos, hi, skip if skip is not None else hi, votes, pos.stride(0), rows, span, splits, int(lo),
        ROWS_PAD=max(16, triton.next_power_of_2(rows)), SPLITS_PAD=max(16, triton.next_power_of_2(splits)),
        BLOCK=block, HAS_SKIP=skip is not None, num_warps=4, PDL=pdl(votes), launch_pdl=pdl(votes),
    )
    return votes
