"""Pure-torch decode attention over fixed-capacity slot buffers: the CPU/CI path and the kernels' reference.

Layout shared with :mod:`attnkit.kernels.triton_decode`:

* ``q``: (B, H, 1, D), one decode query per row.
* ``k``, ``v``: (B, Hkv, cap, D) slot buffers; query head ``h`` reads KV head ``h // (H // Hkv)``.
* ``pos``: (B, Hkv, cap) integer, a slot is valid iff ``pos >= 0`` (holes are -1).

Everything here is vectorised over batch and heads and has no host sync, so it also runs under CUDA graphs.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def _grouped(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, H, 1, D) -> (B, Hkv, G, D) float32, G = H // Hkv (head h = hkv * G + g, as expand_kv)."""
    batch, heads, one, dim = q.shape
    if one != 1:
        raise ValueError(f"decode attention takes one query per row, got q of shape {tuple(q.shape)}")
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads cannot share {kv_heads} KV heads evenly")
    return q.float().reshape(batch, kv_heads, heads // kv_heads, dim)


def masked_decode(
    qg: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    valid: torch.Tensor,
    scale: float,
    out_dtype: torch.dtype,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax attention of grouped queries over keys with a validity mask.

    qg : (B, Hkv, G, D) float32
    k, v : (B, Hkv, n, D)
    valid : (B, Hkv, n) bool
    out : optional (B, H, 1, D) buffer written in place
    Returns (B, H, 1, D) in ``out_dtype``; rows with no valid key are zero.
    """
    scores = torch.einsum("bhgd,bhnd->bhgn", qg, k.float()) * scale
    scores = scores.masked_fill(~valid.unsqueeze(2), NEG_INF)
    # softmax of an all -inf row is NaN; those rows attend to nothing and are defined as zero.
    probs = torch.softmax(scores, dim=-1).nan_to_num(nan=0.0)
    attended = torch.einsum("bhgn,bhnd->bhgd", probs, v.float())
    batch, kv_heads, group, dim = attended.shape
    result = attended.reshape(batch, kv_heads * group, 1, dim).to(out_dtype)
    if out is None:
        return result
    return out.copy_(result)


def _as_count(n: int | torch.Tensor, device: torch.device) -> int | torch.Tensor:
    """An int stays an int; a 0-d/1-element tensor becomes a 0-d tensor on ``device`` (no .item())."""
    if isinstance(n, torch.Tensor):
        return n.reshape(()).to(device)
    return int(n)


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos: torch.Tensor,
    n: int | torch.Tensor,
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense decode attention over the first ``n`` slots of a slot buffer.

    Parameters
    ----------
    q : (B, H, 1, D)
    k, v : (B, Hkv, cap, D)
    pos : (B, Hkv, cap) int32/int64; slot valid iff ``pos >= 0``
    n : int, or 0-d/1-element int tensor (may live on the device): slots ``>= n`` are ignored
    scale : multiplier of q.k (default D ** -0.5)
    out : optional (B, H, 1, D) buffer in q's dtype, written in place

    Returns
    -------
    out : (B, H, 1, D) in q's dtype; rows with no valid slot are zero
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    cap = k.shape[2]
    slots = torch.arange(cap, device=k.device)
    valid = (pos >= 0) & (slots < _as_count(n, k.device))
    return masked_decode(_grouped(q, k.shape[1]), k, v, valid, scale, q.dtype, out)


def decode_attention_mass(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, n: int, scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense decode attention over the first ``n`` slots and the probability each slot received, summed over the
    query heads of its KV head (H2O's accumulated attention).

    q (B, H, 1, D); k, v (B, Hkv, cap, D); pos (B, Hkv, cap) (slot valid iff pos >= 0); n: int ->
    (out (B, H, 1, D) in q's dtype, zero for rows with no valid slot; mass (B, Hkv, n) float32).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    b, h = q.shape[:2]
    hkv = k.shape[1]
    qg = _grouped(q, hkv)  # (B, Hkv, G, D) float32
    valid = pos[:, :, :n] >= 0
    scores = torch.einsum("bhgd,bhnd->bhgn", qg, k[:, :, :n].float()) * scale
    probs = torch.softmax(scores.masked_fill(~valid.unsqueeze(2), NEG_INF), dim=-1).nan_to_num(nan=0.0)
    out = torch.einsum("bhgn,bhnd->bhgd", probs, v[:, :, :n].float()).reshape(b, h, 1, -1).to(q.dtype)
    return out, probs.sum(2)


def selected_slots(idx: torch.Tensor, page_size: int, cap: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot indices covered by selected pages.

    idx : (B, Hkv, K) page ids, -1 = unused entry
    Returns (slots, in_range): both (B, Hkv, K * page_size); ``slots`` is clamped into [0, cap) so it can be
    used to gather, ``in_range`` is False for unused entries and for slots past ``cap`` (a partial last page).
    """
    offsets = torch.arange(page_size, device=idx.device)
    slots = (idx.long().unsqueeze(-1) * page_size + offsets).flatten(-2)
    used = (idx >= 0).unsqueeze(-1).expand(*idx.shape, page_size).flatten(-2)
    in_range = used & (slots < cap)
    return slots.clamp(0, cap - 1), in_range


def take_rows(x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Rows of x (B, Hx, n, ...) at slots (B, Hx, m), or (B, m) for the same slots in every head -> (B, Hx, m, ...).

    Slots must be in [0, n). Indexing copies whole rows; ``torch.gather`` with an index expanded over the last
    dimension walks element by element (1.6x slower on CPU, 3.3x against ``index_select`` at batch 1). On the
    CPU a few (row, head) pairs take one ``index_select`` each (1.8x faster than advanced indexing at 3 heads).
    """
    b, h = x.shape[:2]
    if slots.dim() == 2:
        if b == 1:
            return x.index_select(2, slots[0])
        slots = slots.unsqueeze(1).expand(b, h, slots.shape[1])
    if not x.is_cuda and b * h <= 64:
        out = x.new_empty((b, h, slots.shape[2], *x.shape[3:]))
        for i in range(b):
            for j in range(h):  # written in place: stacking the pieces would copy them again
                torch.index_select(x[i, j], 0, slots[i, j], out=out[i, j])
        return out
    rows = torch.arange(b, device=x.device).view(b, 1, 1)
    heads = torch.arange(h, device=x.device).view(1, h, 1)
    return x[rows, heads, slots]


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
    """Decode attention over the valid slots of selected pages only.

    Parameters
    ----------
    q : (B, H, 1, D)
    k, v : (B, Hkv, cap, D)
    pos : (B, Hkv, cap) int; slot valid iff ``pos >= 0``
    idx : (B, Hkv, K) int32/int64 page ids per KV head, read by every query head of its group, or (B, H, K) per
        query head (each head its own selection of its KV head's pages: TidalDecode, FASA); page ``p`` covers
        slots ``[p * page_size, (p+1) * page_size)`` (``page_size == 1``: idx are slot indices). -1 marks an
        unused entry. Ids must be unique per row: a duplicated page is counted twice (neither path de-duplicates;
        :func:`topk_pages` output is unique).
    page_size : slots per page
    scale : multiplier of q.k (default D ** -0.5)
    out : optional (B, H, 1, D) buffer in q's dtype, written in place

    Returns
    -------
    out : (B, H, 1, D) in q's dtype; rows with no valid selected slot are zero
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    batch, kv_heads, cap = k.shape[:3]
    heads = q.shape[1]
    per_head = idx.shape[1] != kv_heads  # (B, H, K): query head h reads KV head h // G at its own pages
    if per_head and idx.shape[1] != heads:
        raise ValueError(f"idx {tuple(idx.shape)} must be (B, Hkv={kv_heads}, K) or (B, H={heads}, K)")
    sel = idx.reshape(batch, kv_heads, -1) if per_head else idx  # a group's selections side by side
    slots, in_range = selected_slots(sel, page_size, cap)
    # The CPU path gathers a (B, Hkv, G * K * page_size, D) copy; the Triton kernel reads the rows in place.
    k_sel, v_sel = take_rows(k, slots), take_rows(v, slots)
    valid = in_range & (pos.gather(2, slots) >= 0)
    if per_head:  # each query head is a group of one over its own rows
        rows = (batch, heads, -1)
        return masked_decode(_grouped(q, heads), k_sel.reshape(*rows, k.shape[-1]),
                             v_sel.reshape(*rows, v.shape[-1]), valid.reshape(rows), scale, q.dtype, out)
    return masked_decode(_grouped(q, kv_heads), k_sel, v_sel, valid, scale, q.dtype, out)


# ---------------------------------------------------------------------------------------------------------------
# Quest page selection (Tang et al. 2024): per-page channel-wise key bounds and an upper bound of q.k per page.


def page_summaries(
    k: torch.Tensor, pos: torch.Tensor, page_size: int, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Channel-wise max and min of the valid keys of each page.

    Parameters
    ----------
    k : (B, Hkv, cap, D)
    pos : (B, Hkv, cap); slot valid iff ``pos >= 0``
    page_size : slots per page; a partial last page covers the remaining ``cap % page_size`` slots
    dtype : summary dtype (default k's dtype: a bf16 summary is half the bytes selection reads every step)

    Returns
    -------
    summary : (B, Hkv, P, 2, D), P = ceil(cap / page_size); ``[..., 0, :]`` = max, ``[..., 1, :]`` = min.
        A page with no valid key holds max = -inf, min = +inf: :func:`update_page_summary` can then fold new
        keys in with plain max/min, and :func:`quest_scores` maps such pages to -inf.
    """
    batch, kv_heads, cap, dim = k.shape
    pages = -(-cap // page_size)
    pad = pages * page_size - cap
    valid = (pos >= 0).unsqueeze(-1)
    kf = k.float()
    kmax = kf.masked_fill(~valid, NEG_INF)
    kmin = kf.masked_fill(~valid, float("inf"))
    if pad:
        kmax = torch.nn.functional.pad(kmax, (0, 0, 0, pad), value=NEG_INF)
        kmin = torch.nn.functional.pad(kmin, (0, 0, 0, pad), value=float("inf"))
    kmax = kmax.view(batch, kv_heads, pages, page_size, dim).amax(dim=3)
    kmin = kmin.view(batch, kv_heads, pages, page_size, dim).amin(dim=3)
    return torch.stack([kmax, kmin], dim=3).to(k.dtype if dtype is None else dtype)


def update_page_summary(summary: torch.Tensor, k_new: torch.Tensor, slot: torch.Tensor, page_size: int) -> None:
    """Fold one appended key per KV head into the summary of the page holding ``slot``, in place.

    Graph-friendly: ``slot`` stays on the device (no .item()). If the slot overwrote an evicted key, the old key
    stays folded in: the bounds only loosen, so the Quest score remains an upper bound.

    Parameters
    ----------
    summary : (B, Hkv, P, 2, D), as from :func:`page_summaries`
    k_new : (B, Hkv, 1, D) or (B, Hkv, D), the key written at ``slot`` in every row
    slot : 0-d or 1-element int tensor, the slot shared by all rows and heads
    page_size : slots per page (as given to :func:`page_summaries`)
    """
    page = torch.div(slot.reshape(1).long(), page_size, rounding_mode="floor")
    new = k_new.reshape(*summary.shape[:2], 1, summary.shape[-1]).to(summary.dtype)  # (B, Hkv, 1, D)
    cur = summary.index_select(2, page)  # (B, Hkv, 1, 2, D)
    folded = torch.stack([torch.maximum(cur[:, :, :, 0], new), torch.minimum(cur[:, :, :, 1], new)], dim=3)
    summary.index_copy_(2, page, folded)


def quest_scores(q: torch.Tensor, summary: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Quest's upper bound of q.k per page, summed over the query heads of each GQA group.

    Per head and channel, ``max(q * kmax, q * kmin) = relu(q) * kmax + min(q, 0) * kmin`` (kmax >= kmin), so the
    group sum is one matvec of the summary with ``[sum_g relu(q_g), sum_g min(q_g, 0)]``: the summary is read once.

    Parameters
    ----------
    q : (B, H, 1, D)
    summary : (B, Hkv, P, 2, D)
    scale : optional multiplier (a positive scale does not change the ranking)

    Returns
    -------
    scores : (B, Hkv, P) float32; -inf for pages with no valid key. With a bf16/fp16 summary the matvec runs in
        that dtype (fp32 accumulate on GPU) and its output is rounded to it: fine for ranking, not for exact ties.
    """
    batch, kv_heads, pages, two, dim = summary.shape
    qg = _grouped(q, kv_heads)  # (B, Hkv, G, D)
    weights = torch.cat([qg.clamp_min(0).sum(2), qg.clamp_max(0).sum(2)], dim=-1)  # (B, Hkv, 2D)
    if scale is not None:
        weights = weights * scale
    flat = summary.reshape(batch, kv_heads, pages, two * dim)
    scores = torch.matmul(flat, weights.to(summary.dtype).unsqueeze(-1)).squeeze(-1).float()
    # Empty pages give -inf or NaN (0 * inf) above; mark them -inf explicitly (their max is -inf in every channel).
    empty = summary[:, :, :, 0, 0] == NEG_INF
    return scores.masked_fill(empty, NEG_INF)


def topk_pages(
    scores: torch.Tensor, k: int, n_valid_pages: int | torch.Tensor, force_last: bool = True
) -> torch.Tensor:
    """Top-k pages per KV head on the device.

    Parameters
    ----------
    scores : (B, Hkv, P) float
    k : pages to select
    n_valid_pages : int or 0-d/1-element device tensor; pages ``>= n_valid_pages`` are never selected
    force_last : always select page ``n_valid_pages - 1`` (the one being written, Quest keeps it)

    Returns
    -------
    idx : (B, Hkv, k) int64 unique page ids in no particular order; -1 pads rows with fewer than k selectable
        pages (pages past ``n_valid_pages`` or with score -inf, i.e. no valid key).
    """
    pages = scores.shape[-1]
    n_valid = _as_count(n_valid_pages, scores.device)
    page_ids = torch.arange(pages, device=scores.device)
    masked = scores.float().masked_fill(page_ids >= n_valid, NEG_INF)
    if force_last:
        masked = masked.masked_fill(page_ids == n_valid - 1, float("inf"))
    take = min(k, pages)
    top, idx = torch.topk(masked, take, dim=-1, sorted=False)
    idx = idx.masked_fill(top == NEG_INF, -1)
    if take < k:
        idx = torch.nn.functional.pad(idx, (0, k - take), value=-1)
    return idx


def tokenselect_votes(
    q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, lo: int, hi: torch.Tensor, span: int
) -> torch.Tensor:
    """TokenSelect's soft votes over the first ``span`` slots (Wu et al. 2024).

    Parameters
    ----------
    q : (B, H, 1, D) decode queries
    k : (B, Hkv, cap, D); query head h reads KV head h // (H // Hkv)
    pos : (B, Hkv, cap) positions (the same for every KV head: TokenSelect keeps the full cache)
    lo : candidates have position >= lo (after the sinks)
    hi : (B, 1) int; candidates of row b have position < hi[b] (before the local window)
    span : slots considered

    Returns
    -------
    votes : (B, span) float32, sum over heads of softmax_j(q_h . k_j) over the candidates (unscaled q.k, as the
        official code); -inf off the candidates (so a row without candidates is all -inf).
    """
    scores = head_scores(q, k, pos, lo, hi, span)
    votes = torch.nan_to_num(scores.softmax(-1), nan=0.0).sum(1)
    kpos = pos[:, 0, :span]
    return votes.masked_fill((kpos < lo) | (kpos >= hi.view(-1, 1)), NEG_INF)


def head_scores(q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, lo: int, hi: torch.Tensor,
                span: int) -> torch.Tensor:
    """Raw per-query-head scores q_h . k_j (unscaled, fp32) over the first ``span`` slots.

    q (B, H, 1, D); k (B, Hkv, cap, D), query head h reading KV head h // (H // Hkv); pos (B, Hkv, cap), of which
    KV head 0's positions decide (layers whose heads hold the same slots); candidates of row b have
    ``lo <= pos < hi[b]``, hi (B, 1) int -> (B, H, span) float32, -inf off the candidates.
    """
    b, h, _, d = q.shape
    keys = k[:, :, :span]
    kpos = pos[:, 0, :span]
    candidate = (kpos >= lo) & (kpos < hi.view(-1, 1))
    scores = torch.matmul(q.reshape(b, keys.shape[1], h // keys.shape[1], d).float(), keys.float().transpose(-1, -2))
    return scores.reshape(b, h, -1).masked_fill(~candidate.view(b, 1, -1), NEG_INF)
