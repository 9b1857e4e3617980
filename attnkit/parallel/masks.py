"""What each query may read under context parallelism, by global position (zigzag chunks are not contiguous).

``None`` stands for plain causal attention, which ring and Ulysses plan without a mask. The other kinds give a
bool mask for any (query positions, key positions) pair of blocks:

- :class:`WindowMask`: attnkit's ``window`` method in a prefill forward, each query reads itself and the
  ``window`` keys before it;
- :class:`BlockLists`: a per-query-block choice of key positions (DHSA), causal inside it, with the last
  queries dense.

:func:`dhsa_mask` computes DHSA's choice for this rank's query blocks exactly as one process would: the only
global input is the head-averaged keys (B, n, D) float32, all-gathered; the query-block representations are local.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.distributed as dist

from attnkit.parallel.layout import SeqLayout


@dataclass
class WindowMask:
    """Query at position p reads keys at p - window .. p."""

    window: int

    def mask(self, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
        """qpos (Tq,), kpos (Tk,) -> (1, 1, Tq, Tk) bool."""
        diff = qpos.view(-1, 1) - kpos.view(1, -1)
        return ((diff >= 0) & (diff <= self.window))[None, None]


@dataclass
class BlockLists:
    """chosen (B, blocks, n) bool: the key positions query block i (positions i*block .. (i+1)*block-1) reads
    before causality; rows of blocks this rank does not need may be all False. Queries at ``dense_from`` and
    later read causally everything (DHSA's dense tail)."""

    chosen: torch.Tensor
    block: int
    dense_from: int

    def mask(self, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
        """qpos (Tq,), kpos (Tk,) -> (B, 1, Tq, Tk) bool."""
        rows = self.chosen[:, qpos // self.block]  # (B, Tq, n)
        pick = rows.index_select(2, kpos) | (qpos >= self.dense_from).view(1, -1, 1)
        return (pick & (kpos.view(1, 1, -1) <= qpos.view(1, -1, 1))).unsqueeze(1)


def all_gather_rows(out: torch.Tensor, x: torch.Tensor, group=None) -> None:
    """out (W * R, ...) <- every rank's x (R, ...), rank after rank (``all_gather_single`` from torch 2.13,
    ``all_gather_into_tensor`` before it)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x, group=group)


def all_gather_seq(x: torch.Tensor, layout: SeqLayout, group=None, dim: int = 1) -> torch.Tensor:
    """This rank's part of a sequence tensor (local order along ``dim``) -> the whole sequence in position order."""
    x = x.movedim(dim, 0).contiguous()
    out = x.new_empty((layout.world * x.shape[0], *x.shape[1:]))
    all_gather_rows(out, x, group)
    return layout.unshard(out, 0).movedim(0, dim)


def dhsa_mask(method, query: torch.Tensor, key: torch.Tensor, layout: SeqLayout, scale: float, group=None,
              everyone: bool = False, shared: dict | None = None) -> BlockLists | None:
    """DHSA's selection (``boundaries="fixed"``) for this rank's queries; None where DHSA stays dense (n <= budget).

    query (B, H, Tl, D), key (B, Hkv, Tl, D): this rank's tokens (all heads). The keys' head mean is gathered
    (B, n, D) so the chunk representations equal one process's; DHSA's own ``choose`` then runs on this rank's
    query blocks against all keys. ``everyone``: OR the rows of all ranks (Ulysses needs every block's choice).
    Requires query blocks not to straddle ranks: the layout's chunk a multiple of ``method.block``.
    """
    if method.boundaries != "fixed":
        raise ValueError(f"dhsa under context parallelism: boundaries={method.boundaries!r} is not supported; "
                         "accepted: 'fixed' (the 'mass' boundaries need every query's attention mass)")
    if layout.chunk % method.block:
        raise ValueError(f"dhsa under context parallelism: block={method.block} does not divide the layout's "
                         f"chunk of {layout.chunk} tokens; accepted: a block dividing {layout.chunk}")
    b, n = query.shape[0], layout.n
    keys = all_gather_seq(key.float().mean(1), layout, group)  # (B, n, D), position order
    qpos = layout.positions(device=query.device).expand(b, -1)
    kpos = torch.arange(n, device=query.device).expand(b, 1, n)
    layer = SimpleNamespace(stored_pos=lambda: kpos, qpos=qpos, layer_idx=0)
    run = SimpleNamespace(layer_types=[None], shared={} if shared is None else shared)
    picked = method.choose(run, layer, query, keys.unsqueeze(1), keys.unsqueeze(1), scale)
    if picked is None:
        return None
    chosen, _, _ = picked  # (B, local blocks, n): local block j is global block base + j
    base = int(qpos.min()) // method.block
    rows = torch.zeros((b, -(-n // method.block), n), dtype=torch.uint8, device=query.device)
    rows[:, base : base + chosen.shape[1]] = chosen.to(torch.uint8)
    if everyone:
        dist.all_reduce(rows, op=dist.ReduceOp.MAX, group=group)
    return BlockLists(rows.bool(), method.block, n - min(method.dense_tail, n))
