"""Sparse prefill attention: exact attention of a chunk's queries under a per-query key selection.

Three shapes of selection cover the sparse-prefill family:

- a token mask (B, Hm, q, n), Hm in {1, Hkv, H}: :func:`masked_attention` (the reference path, in query blocks so
  memory stays q_block x n per head);
- per-head token sets shared by queries and keys (Token Sparse Attention): :func:`compact_attention` gathers Q, K
  and V per query head, runs causal attention on the compacted sequence and scatters the output back (zeros for
  queries outside the set);
- key blocks per query block (DHSA, Rectified SpaAttn): :func:`block_token_mask` turns (B, Hs, nqb, nkb) block
  choices into the token mask.

Visibility inside a selection is always by stored positions (causal, and -1 slots never read), so eviction and
padding stay right. Every path returns the log-sum-exp too (Rectified SpaAttn merges with it).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from attnkit.reference import dense_attention, expand_kv


def causal_visibility(qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
    """(B, 1, q, n) bool: key slot j is visible to query i (0 <= pos_j <= pos_i). qpos (B, q); kpos (B, n)."""
    k = kpos.unsqueeze(1).unsqueeze(2)
    return (k <= qpos.view(qpos.shape[0], 1, -1, 1)) & (k >= 0)


def causal_pairs(qpos: torch.Tensor) -> float:
    """(query, key) pairs a dense causal prefill chunk attends per head: each real query sees pos + 1 keys."""
    return float((qpos + 1).clamp_min(0).sum())


def read_pairs(chosen: torch.Tensor, local: torch.Tensor, first: int = 0) -> float:
    """(query, key) pairs read when each query reads its block's chosen slots up to its own slot: chosen (B, Hs,
    g, n) bool for query blocks first .. first + g - 1; local (B, q) block of every query (-1: padding), the q
    queries being the last q slots. Summed over the Hs selection heads."""
    b, hs, g, n = chosen.shape
    q = local.shape[1]
    cum = chosen.int().cumsum(-1).view(b, hs, g * n)
    blk = local - first
    ok = (blk >= 0) & (blk < g)
    at = (blk.clamp(0, g - 1) * n + torch.arange(n - q, n, device=local.device)).view(b, 1, q).expand(b, hs, q)
    return float((cum.gather(2, at) * ok.unsqueeze(1)).sum())


def masked_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor, scaling: float,
    block: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact float32 attention under a bool mask, in blocks of queries.

    query (B, H, q, D); key/value (B, Hkv, n, D); mask broadcastable to (B, Hm, q, n) with Hm in {1, Hkv, H}
    -> (out (B, H, q, D) in the query's dtype, zero rows where nothing is visible; lse (B, H, q) float32).
    """
    outs, lses = [], []
    for s in range(0, query.shape[2], block):
        m = mask[:, :, s : s + block] if mask.shape[2] > 1 else mask
        out, _, lse = dense_attention(query[:, :, s : s + block], key, value, m, scaling)
        outs.append(out.to(query.dtype))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def gather_heads(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, Hx, n, D) with Hx dividing H; idx (B, H, k) long -> (B, H, k, D), query head h reading x's head
    h // (H / Hx)."""
    b, h, k = idx.shape
    hx = x.shape[1]
    src = x.unsqueeze(2).expand(b, hx, h // hx, *x.shape[2:]).reshape(b, h, *x.shape[2:])
    return src.gather(2, idx.unsqueeze(-1).expand(b, h, k, x.shape[-1]))


def compact_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kpos: torch.Tensor, keys_idx: torch.Tensor,
    n_query: int, scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token Sparse Attention's compacted attention: each query head keeps a token set; its kept queries attend
    causally to its kept keys only, and its other queries get a zero update.

    query (B, H, q, D) (the chunk's queries: the last q stored slots); key/value (B, Hkv, n, D); kpos (B, n)
    stored positions; keys_idx (B, H, k) ascending slot ids per query head, -1 for unused entries (rows may keep
    fewer); the kept queries are the entries >= n - q (their slot's query). n_query: the largest number of kept
    queries in any (row, head). -> (out (B, H, q, D), zeros for queries outside the set; lse (B, H, q)).
    """
    b, h, q, d = query.shape
    n = key.shape[2]
    valid = keys_idx >= 0
    safe = keys_idx.clamp_min(0)
    k_sel, v_sel = gather_heads(key, safe), gather_heads(value, safe)  # (B, H, k, D)
    pos_sel = kpos.unsqueeze(1).expand(b, h, n).gather(2, safe).masked_fill(~valid, -1)  # (B, H, k)
    # the kept queries are the kept slots of the chunk: ascending ids put them last, so take the last n_query
    # entries of each list (entries before a row's first chunk slot are masked as "not a query")
    qslot = keys_idx[:, :, -n_query:]  # (B, H, nq)
    is_query = qslot >= n - q
    q_sel = query.gather(2, (qslot - (n - q)).clamp(0, q - 1).unsqueeze(-1).expand(b, h, n_query, d))
    qpos = pos_sel[:, :, -n_query:].masked_fill(~is_query, -1)
    if query.is_cuda and query.dtype != torch.float32 and bool(valid.all()) and bool(is_query.all()):
        # every list full and every query slot a query: plain bottom-right causal on the compacted sequence (no
        # (nq, k) mask: at one 32K chunk it alone would take 34 GB)
        from attnkit.hf.attention import causal_prefill

        out_sel = causal_prefill(q_sel, k_sel, v_sel, scaling)
        lse_sel = None
    else:  # eager float32 in query chunks whose scores stay under MASKED_SCORE_BYTES (padded rows at 16K: 13 GiB)
        from attnkit.hf.attention import masked_chunk_rows

        kp = pos_sel.unsqueeze(2)  # (B, H, 1, k)
        rows = masked_chunk_rows(q_sel, k_sel)
        outs, lses = [], []
        for s in range(0, n_query, rows):
            qp = qpos[:, :, s : s + rows].unsqueeze(-1)
            mask = (kp <= qp) & (kp >= 0) & (qp >= 0)  # (B, H, rows, k)
            o, _, lse_rows = dense_attention(q_sel[:, :, s : s + rows], k_sel, v_sel, mask, scaling)
            outs.append(o.to(query.dtype))
            lses.append(lse_rows)
        out_sel, lse_sel = torch.cat(outs, 2), torch.cat(lses, 2)
    out = query.new_zeros(b, h, q + 1, d)  # slot q: where non-queries scatter (dropped)
    at = torch.where(is_query, qslot - (n - q), q)
    out.scatter_(2, at.unsqueeze(-1).expand(b, h, n_query, d), out_sel)
    lse = torch.full((b, h, q + 1), float("-inf"), device=query.device)
    if lse_sel is not None:
        lse.scatter_(2, at, lse_sel)
    return out[:, :, :q], lse[:, :, :q]


def compact_mask(keys_idx: torch.Tensor, n: int, q: int, kpos: torch.Tensor, qpos: torch.Tensor) -> torch.Tensor:
    """(B, H, q, n) bool mask equal to :func:`compact_attention`'s reads: query i of head h sees slot j iff both
    are in h's set and j is causally visible to i."""
    b, h, _ = keys_idx.shape
    chosen = torch.zeros((b, h, n + 1), dtype=torch.bool, device=keys_idx.device)
    chosen.scatter_(2, keys_idx.masked_fill(keys_idx < 0, n), True)
    chosen = chosen[..., :n]  # (B, H, n)
    return chosen[:, :, -q:].unsqueeze(-1) & chosen.unsqueeze(2) & causal_visibility(qpos, kpos)


def flex_ready(layer, query: torch.Tensor, block: int, kernel: str) -> bool:
    """True when a prefill chunk may go to :func:`flex_block_attention`: ``kernel`` is "flex" or "auto" on CUDA
    (and ``ATTNKIT_KERNELS`` is not "torch"), the layer holds every token in order unpadded (slot = position)
    and the chunk starts on a block boundary."""
    import os

    if kernel == "gather" or (kernel == "auto" and (not query.is_cuda or os.environ.get("ATTNKIT_KERNELS") == "torch")):
        return False
    aligned = layer.n == layer.seen and not layer.padded and (layer.n - query.shape[2]) % block == 0
    if kernel == "flex" and not aligned:
        return False  # a padded or evicted layout: the gather path (same result)
    return aligned


def query_blocks(qpos: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Query blocks by position, so a padded row blocks as its prompt alone: qpos (B, q) -> (local block of
    every query (B, q), -1 for padding; query index at each (block, offset) (B, nqb, block), -1 where none;
    nqb)."""
    b, q = qpos.shape
    qb = torch.where(qpos >= 0, qpos // block, -1)
    base = qb.masked_fill(qb < 0, 1 << 40).min(-1, keepdim=True).values.clamp_max(qb.max())
    local = torch.where(qb >= 0, qb - base, -1)
    nqb = int(local.max()) + 1
    qidx = torch.full((b, nqb * block + 1), -1, dtype=torch.long, device=qpos.device)
    at = torch.where(local >= 0, local * block + qpos % block, nqb * block)
    qidx.scatter_(1, at, torch.arange(q, device=qpos.device).expand(b, q))
    return local, qidx[:, :-1].view(b, nqb, block), nqb


def mask_to_lists(chosen: torch.Tensor) -> torch.Tensor:
    """(..., n) bool -> (..., k) ascending slot ids of the True entries, -1 first where a row has fewer; k =
    the most True entries of any row."""
    k = max(int(chosen.sum(-1).max()), 1)
    n = chosen.shape[-1]
    key = torch.where(chosen, torch.arange(n, device=chosen.device), -1)
    return key.topk(k, dim=-1).values.flip(-1)


def block_gather_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, qidx: torch.Tensor, lists: torch.Tensor,
    qpos: torch.Tensor, kpos: torch.Tensor, scaling: float, group: int = 64,
) -> torch.Tensor:
    """Exact attention where each query block reads its own list of key slots (causal by position inside it),
    gathering the listed K/V once per block instead of materialising a (q, n) mask.

    query (B, H, q, D); key/value (B, Hkv, n, D); qidx (B, nqb, block) query index per block offset (-1: none);
    lists (B, Hs, nqb, k) slot ids per block, -1 unused, Hs in {1, Hkv} (a list shared by the query heads of a
    KV head, or by all); qpos (B, q); kpos (B, n) or (B, Hkv, n) -> out (B, H, q, D), zero rows where a query
    reads nothing. ``group`` query blocks are gathered at a time (memory: group x k x D per head).
    """
    b, h, q, d = query.shape
    hkv = key.shape[1]
    nqb, blk = qidx.shape[1:]
    hs, k = lists.shape[1], lists.shape[-1]
    g = h // hkv
    kpos3 = kpos.unsqueeze(1).expand(b, hkv, kpos.shape[-1]) if kpos.ndim == 2 else kpos
    out = query.new_zeros(b, h, q + 1, d)
    for s in range(0, nqb, group):
        qi = qidx[:, s : s + group]  # (B, G, blk)
        nb = qi.shape[1]
        safe_q = qi.clamp_min(0).view(b, 1, nb * blk)
        qq = query.gather(2, safe_q.unsqueeze(-1).expand(b, h, nb * blk, d)).view(b, hkv, g, nb, blk, d)
        qp = qpos.gather(1, safe_q[:, 0]).masked_fill(qi.view(b, -1) < 0, -1).view(b, 1, 1, nb, blk, 1)
        li = lists[:, :, s : s + group].expand(b, hkv, nb, k) if hs == 1 else lists[:, :, s : s + group]
        safe_k = li.clamp_min(0).reshape(b, hkv, nb * k)
        kk = key.gather(2, safe_k.unsqueeze(-1).expand(b, hkv, nb * k, d)).view(b, hkv, 1, nb, k, d)
        vv = value.gather(2, safe_k.unsqueeze(-1).expand(b, hkv, nb * k, value.shape[-1])).view(b, hkv, 1, nb, k, -1)
        kp = kpos3.gather(2, safe_k).masked_fill(li.reshape(b, hkv, -1) < 0, -1).view(b, hkv, 1, nb, 1, k)
        mask = (kp >= 0) & (kp <= qp) & (qp >= 0)  # (B, Hkv, 1, nb, blk, k)
        if query.is_cuda and query.dtype != torch.float32:
            o = _sdpa_blocks(qq, kk, vv, mask, scaling)
        else:
            scores = torch.matmul(qq.float(), kk.float().transpose(-1, -2)) * scaling  # (B, Hkv, G, nb, blk, k)
            probs = scores.masked_fill(~mask, float("-inf")).softmax(-1).nan_to_num(0.0)
            o = torch.matmul(probs, vv.float()).to(query.dtype)
        o = o.reshape(b, h, nb * blk, d)
        at = torch.where(qi.view(b, -1) >= 0, qi.view(b, -1), q)
        out.scatter_(2, at.view(b, 1, -1, 1).expand(b, h, nb * blk, d), o)
    return out[:, :, :q]


def _sdpa_blocks(qq, kk, vv, mask, scaling: float) -> torch.Tensor:
    """Fused attention per (row, query block): qq (B, Hkv, G, nb, blk, D), kk/vv (B, Hkv, 1, nb, k, D), mask
    (B, Hkv, 1, nb, blk, k) -> (B, Hkv, G, nb, blk, D); rows with no visible key come out zero."""
    b, hkv, g, nb, blk, d = qq.shape
    k = kk.shape[4]
    q2 = qq.permute(0, 3, 1, 2, 4, 5).reshape(b * nb, hkv * g, blk, d)
    k2 = kk.permute(0, 3, 1, 2, 4, 5).expand(b, nb, hkv, g, k, d).reshape(b * nb, hkv * g, k, d)
    v2 = vv.permute(0, 3, 1, 2, 4, 5).expand(b, nb, hkv, g, k, vv.shape[-1]).reshape(b * nb, hkv * g, k, -1)
    m = mask.permute(0, 3, 1, 2, 4, 5).expand(b, nb, hkv, g, blk, k).reshape(b * nb, hkv * g, blk, k)
    empty = ~m.any(-1, keepdim=True)
    o = F.scaled_dot_product_attention(q2, k2, v2, attn_mask=m | empty, scale=scaling).masked_fill(empty, 0.0)
    return o.view(b, nb, hkv, g, blk, -1).permute(0, 2, 3, 1, 4, 5)


_FLEX: dict[str, object] = {}
FLEX_BUCKET = 2048  # tokens: the compiled kernel's shapes are queries and keys rounded up to a multiple of this
_FLEX_REFUSED: set[int] = set()  # block sizes the compiled flex_attention could not build a kernel for


def flex_block_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, blocks: torch.Tensor | None, block: int,
    scaling: float, compiled: bool | None = None, tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block-sparse causal attention through FlexAttention: query block i (of this chunk) reads the key blocks
    ``blocks`` marks, causally. For a layer holding every token in order (slot = position) with the chunk
    starting on a block boundary.

    query (B, H, q, D) = the last q of n slots; key/value (B, Hkv, n, D); blocks (B, Hs, the chunk's query
    blocks (block 0 holds its first query), key blocks) bool, Hs in {1, Hkv, H} -> (B, H, q, D). ``tokens``
    (B, Hs, the chunk's query blocks, n) bool instead selects key tokens per query block (DHSA, TCA); the key
    blocks holding any of them are the kernel's blocks. On CUDA the compiled kernel skips unmarked blocks;
    elsewhere FlexAttention's eager path computes the same (slowly: tests only).
    """
    from torch.nn.attention.flex_attention import flex_attention

    h, q, n = query.shape[1], query.shape[2], key.shape[2]
    if (n - q) % block:
        raise ValueError(f"flex_block_attention: the chunk starts at slot {n - q}, not on a block of {block}")
    use_compiled = (query.is_cuda if compiled is None else compiled) and block not in _FLEX_REFUSED
    gqa = key.shape[1] != h
    if use_compiled:
        if "fn" not in _FLEX:
            _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
        try:
            return _compiled_flex(query, key, value, blocks, tokens, block, scaling)
        except Exception as err:  # noqa: BLE001 - Inductor raises many types; any of them means "no compiled kernel"
            # Inductor's flex kernels need blocks of at least its tile (seen on the H100: a 4-token block has no
            # valid config); the uncompiled flex_attention is exact, only slower, so run that for this block size.
            _FLEX_REFUSED.add(block)
            warnings.warn(f"attnkit: compiled FlexAttention refused {block}-token blocks ({type(err).__name__}); "
                          "running the uncompiled flex_attention for this block size", stacklevel=2)
    bm = flex_block_mask(h, q, n, block, blocks, tokens)
    return flex_attention(query, key, value, block_mask=bm, scale=scaling, enable_gqa=gqa)


def _compiled_flex(query, key, value, blocks, tokens, block: int, scaling: float) -> torch.Tensor:
    """``flex_block_attention`` through the compiled kernel, on shapes padded at the end to a multiple of
    FLEX_BUCKET tokens: the kernel is built per shape, and every prompt length of an eval sweep would otherwise
    compile anew (seconds each). The padded keys lie after every real query (causally invisible); the padded
    queries choose no block and are cut off."""
    h, q, n = query.shape[1], query.shape[2], key.shape[2]
    step = block * -(-FLEX_BUCKET // block)
    qp, np_ = -(-q // step) * step, -(-n // step) * step
    nqb, nkb = -(-q // block), -(-n // block)
    if (qp, np_) != (q, n):
        query = F.pad(query, (0, 0, 0, qp - q))
        key, value = F.pad(key, (0, 0, 0, np_ - n)), F.pad(value, (0, 0, 0, np_ - n))
        if tokens is not None:
            tokens = F.pad(tokens[:, :, :nqb], (0, np_ - n, 0, qp // block - nqb))
        else:
            blocks = F.pad(blocks[:, :, :nqb], (0, np_ // block - nkb, 0, qp // block - nqb))
    bm = flex_block_mask(h, qp, np_, block, blocks, tokens, off=n - q)
    # one compile per padded shape (a chunked prefill's key length grows): past dynamo's default limit of 8 it
    # would silently run the unfused flex_attention, which holds the whole score matrix (OOM at 32K)
    with torch._dynamo.config.patch(recompile_limit=max(256, torch._dynamo.config.recompile_limit)):
        out = _FLEX["fn"](query, key, value, block_mask=bm, scale=scaling, enable_gqa=key.shape[1] != h)
    return out[:, :, :q]


def flex_block_mask(h: int, q: int, n: int, block: int, blocks: torch.Tensor | None = None,
                    tokens: torch.Tensor | None = None, off: int | None = None):
    """FlexAttention's BlockMask for :func:`flex_block_attention` (its arguments; h query heads, a chunk of q
    queries over n slots, starting on a block boundary). Key blocks wholly chosen and wholly before a query
    block's first query are listed as full: the compiled kernel skips the mask_mod there (for token choices a
    per-element gather from the (B, Hs, blocks, n) mask); the other chosen blocks are partial. ``off``: the
    chunk's first slot when q and n were padded at the end (default n - q)."""
    from torch.nn.attention.flex_attention import BlockMask

    nqb, off = -(-q // block), n - q if off is None else off
    if tokens is not None:
        tok = tokens[:, :, :nqb].contiguous()  # (B, Hs, q blocks of the chunk, n)
        nkb = -(-n // block)
        per_block = F.pad(tok, (0, nkb * block - n)).view(*tok.shape[:3], nkb, block)
        sel, whole = per_block.any(-1), per_block.all(-1)
        grp = h // tok.shape[1]  # query heads per selection head (a KV head's group, or all)

        def mask_mod(bi, hi, qi, ki):
            return (ki <= qi + off) & tok[bi, hi // grp, qi // block, ki]
    else:
        sel = blocks[:, :, :nqb].contiguous()  # (B, Hs, q blocks of the chunk, nkb)
        whole = sel
        grp = h // sel.shape[1]

        def mask_mod(bi, hi, qi, ki):
            return (ki <= qi + off) & sel[bi, hi // grp, qi // block, ki // block]

    first_q_block = torch.arange(sel.shape[2], device=sel.device).view(-1, 1) + off // block
    full = whole & (torch.arange(sel.shape[-1], device=sel.device) < first_q_block)
    num, idx = _kv_block_lists(sel & ~full, h)
    full_num, full_idx = _kv_block_lists(full, h)
    return BlockMask.from_kv_blocks(num, idx, full_num, full_idx, BLOCK_SIZE=block, mask_mod=mask_mod,
                                    seq_lengths=(q, n))


def _kv_block_lists(chosen: torch.Tensor, h: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, Hs, query blocks, key blocks) bool -> BlockMask's (count, ascending key block indices) int32, with the
    selection heads repeated to H query heads unless they are 1 or H already."""
    if 1 < chosen.shape[1] < h:
        chosen = chosen.repeat_interleave(h // chosen.shape[1], 1)
    nkb = chosen.shape[-1]
    idx = torch.where(chosen, torch.arange(nkb, device=chosen.device), nkb).sort(-1).values.clamp_max(nkb - 1)
    return chosen.sum(-1).to(torch.int32), idx.to(torch.int32)


def block_token_mask(blocks: torch.Tensor, q: int, n: int, block_q: int, block_k: int) -> torch.Tensor:
    """(B, Hs, nqb, nkb) bool block choices -> (B, Hs, q, n) bool; query block i covers queries
    [i * block_q, (i + 1) * block_q), key block j covers slots [j * block_k, (j + 1) * block_k)."""
    return blocks.repeat_interleave(block_q, dim=2)[:, :, :q].repeat_interleave(block_k, dim=3)[..., :n]


def group_stats(x: torch.Tensor, ids: torch.Tensor, nb: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Means, mean absolute deviations and row counts of groups of rows (blocks, chunks): x (B, Hx, n, D), ids
    (B, n) group of each row in [0, nb) (-1: padding, not counted) -> (mean (B, Hx, nb, D), dev (B, Hx, nb, D),
    count (B, nb)), float32."""
    b, hx, n, d = x.shape
    w = (ids >= 0).float()
    at = ids.clamp_min(0).view(b, 1, n, 1).expand(b, hx, n, d)
    cnt = torch.zeros((b, nb), device=x.device).scatter_add_(1, ids.clamp_min(0), w)
    xf = x.float() * w.view(b, 1, n, 1)
    mean = torch.zeros((b, hx, nb, d), device=x.device).scatter_add_(2, at, xf) / cnt.clamp_min(1).view(b, 1, nb, 1)
    dev = (x.float() - mean.gather(2, at)).abs() * w.view(b, 1, n, 1)
    dev = torch.zeros_like(mean).scatter_add_(2, at, dev) / cnt.clamp_min(1).view(b, 1, nb, 1)
    return mean, dev, cnt


__all__ = [
    "block_gather_attention",
    "flex_ready",
    "block_token_mask",
    "causal_pairs",
    "causal_visibility",
    "compact_attention",
    "compact_mask",
    "expand_kv",
    "flex_block_attention",
    "flex_block_mask",
    "gather_heads",
    "mask_to_lists",
    "masked_attention",
    "group_stats",
    "query_blocks",
    "read_pairs",
]
