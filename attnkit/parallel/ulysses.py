"""Ulysses (all-to-all, head-parallel) attention: swap a sequence shard of all heads for all tokens of a head shard.

Paper: Jacobs et al. 2023, DeepSpeed Ulysses (https://arxiv.org/abs/2309.14509). One ``all_to_all_single`` per
tensor turns q (B, H, n/W, D) into (B, H/W, n, D) (gloo supports it in torch 2.13, checked by the CPU tests), each
rank attends causally over the whole sequence for its heads, and the inverse all-to-all returns (B, H, n/W, D).
Work is even in any layout; tokens arrive rank after rank, so a zigzag layout is put into position order
(an index_select of n rows) before the local attention and back after it; the contiguous layout needs none.

Grouped KV heads: query head group j (heads j H/W .. (j+1) H/W - 1) reads KV heads j Hkv/W ..; so H must divide by
W, and Hkv by W, or else W by Hkv, in which case each KV head is replicated W / Hkv times before the all-to-all
(each rank then holds one KV head; the extra traffic is (W / Hkv - 1) x the keys').
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from attnkit.parallel.blocks import attend_block
from attnkit.parallel.layout import SeqLayout
from attnkit.parallel.ring import check_qkv


def check_heads(heads: int, kv_heads: int, world: int) -> None:
    """One ValueError naming the head counts unless Ulysses can split them over ``world`` ranks."""
    if heads % world:
        raise ValueError(f"ulysses: {heads} query heads do not split over {world} ranks; accepted: query heads "
                         f"divisible by the world size {world} (or use strategy='ring')")
    if kv_heads % world and world % kv_heads:
        raise ValueError(f"ulysses: {kv_heads} KV heads over {world} ranks; accepted: KV heads divisible by "
                         f"{world}, or dividing it (replicated), or strategy='ring'")


def seq_to_heads(x: torch.Tensor, world: int, group=None) -> torch.Tensor:
    """(B, Hx, T, D) this rank's tokens, all heads -> (B, Hx/W, W T, D) every rank's tokens (rank after rank),
    this rank's head group."""
    b, hx, t, d = x.shape
    send = x.view(b, world, hx // world, t, d).transpose(0, 1).contiguous()  # (W, B, Hx/W, T, D): group j to j
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[j]: rank j's tokens of this head group
    return recv.permute(1, 2, 0, 3, 4).reshape(b, hx // world, world * t, d)


def heads_to_seq(y: torch.Tensor, world: int, group=None) -> torch.Tensor:
    """Inverse of :func:`seq_to_heads`: (B, Hl, W T, D) -> (B, W Hl, T, D)."""
    b, hl, wt, d = y.shape
    t = wt // world
    send = y.view(b, hl, world, t, d).permute(2, 0, 1, 3, 4).contiguous()  # (W, B, Hl, T, D): rank j's tokens
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[j]: head group j of this rank's tokens
    return recv.transpose(0, 1).reshape(b, world * hl, t, d)


def ulysses_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: SeqLayout, group=None,
    scale: float | None = None, visibility=None,
) -> torch.Tensor:
    """Head-parallel attention of this rank's tokens. Same contract as :func:`attnkit.parallel.ring.ring_attention`:
    query (B, H, n/W, D), key/value (B, Hkv, n/W, D) in ``layout`` order -> (B, H, n/W, D) in the query's dtype.
    Other visibilities than causal build a dense (n, n) bool mask (exactness first: tests and small n)."""
    check_qkv(query, key, value, layout, "ulysses_attention")
    w = layout.world
    check_heads(query.shape[1], key.shape[1], w)
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    if key.shape[1] % w:  # fewer KV heads than ranks: replicate so each head group gets its own
        rep = w // key.shape[1]
        key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    q, k, v = (seq_to_heads(x, w, group) for x in (query, key, value))  # (B, H/W | Hkv/W, n, D)
    order = None
    if layout.kind != "contiguous":
        order = torch.argsort(layout.all_positions(query.device))  # rank-major -> position order
        q, k, v = (x.index_select(2, order) for x in (q, k, v))
    if visibility is None:
        out, _ = attend_block(q, k, v, scale, causal=True)
    else:
        pos = torch.arange(layout.n, device=query.device)
        out, _ = attend_block(q, k, v, scale, mask=visibility.mask(pos, pos))
    out = out.to(query.dtype)
    if order is not None:
        out = out.index_select(2, torch.argsort(order))
    return heads_to_seq(out.contiguous(), w, group)
