"""How a sequence of n tokens is split over the ranks of a context-parallel group.

``zigzag`` (load-balanced, the layout of torch's ``_HeadTailLoadBalancer``): the sequence is cut into 2W chunks
and rank r holds chunks r and 2W-1-r, concatenated, so under a causal mask every rank does the same work.
``contiguous``: rank r holds the r-th of W equal pieces (causal work grows with the rank; Ulysses does not
care, since after its all-to-all every rank attends over the whole sequence for its heads).

Within a rank the tokens stay in ascending position order in both layouts, so causal attention of a rank's
queries over its own keys is plain index-causal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LAYOUTS = ("zigzag", "contiguous")


@dataclass(frozen=True)
class SeqLayout:
    """Positions held by each of ``world`` ranks for a sequence of ``n`` tokens (this process is ``rank``)."""

    n: int
    world: int
    rank: int = 0
    kind: str = "zigzag"

    def __post_init__(self) -> None:
        if self.kind not in LAYOUTS:
            raise ValueError(f"layout={self.kind!r} is invalid; accepted: {', '.join(map(repr, LAYOUTS))}")
        if not (isinstance(self.world, int) and self.world >= 1 and 0 <= self.rank < self.world):
            raise ValueError(f"rank {self.rank} of world size {self.world} is invalid; accepted: 0 <= rank < world")
        parts = 2 * self.world if self.kind == "zigzag" else self.world
        if not (isinstance(self.n, int) and self.n > 0 and self.n % parts == 0):
            what = "2 x world size" if self.kind == "zigzag" else "the world size"
            raise ValueError(
                f"{self.kind} layout: sequence length {self.n} is not a multiple of {what} = {parts}; accepted: "
                f"lengths divisible by {parts} (pad the prompt)"
            )

    @property
    def chunk(self) -> int:
        """Tokens per chunk: n / 2W (zigzag) or n / W (contiguous)."""
        return self.n // (2 * self.world if self.kind == "zigzag" else self.world)

    @property
    def local_len(self) -> int:
        return self.n // self.world

    def chunks(self, rank: int | None = None) -> list[tuple[int, int]]:
        """[(start, stop)] position ranges held by ``rank`` (default: this one), in local order (ascending)."""
        r = self.rank if rank is None else rank
        c = self.chunk
        if self.kind == "contiguous":
            return [(r * c, (r + 1) * c)]
        return [(r * c, (r + 1) * c), ((2 * self.world - 1 - r) * c, (2 * self.world - r) * c)]

    def positions(self, rank: int | None = None, device=None) -> torch.Tensor:
        """(n / W,) long: the global positions of ``rank``'s tokens, in local order."""
        return torch.cat([torch.arange(a, b, device=device) for a, b in self.chunks(rank)])

    def all_positions(self, device=None) -> torch.Tensor:
        """(n,) long: every rank's positions, rank after rank (the order of an all-gather or all-to-all)."""
        return torch.cat([self.positions(r, device) for r in range(self.world)])

    def owner(self, pos: int) -> tuple[int, int]:
        """(rank, local index) of global position ``pos``."""
        for r in range(self.world):
            at = 0
            for a, b in self.chunks(r):
                if a <= pos < b:
                    return r, at + pos - a
                at += b - a
        raise ValueError(f"position {pos} is outside the sequence; accepted: 0 <= pos < {self.n}")

    def shard(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """This rank's part of ``x`` (the whole sequence along ``dim``), in local order."""
        return torch.cat([x.narrow(dim, a, b - a) for a, b in self.chunks()], dim=dim)

    def unshard(self, gathered: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's part concatenated rank after rank along ``dim`` -> the sequence in position order."""
        if self.kind == "contiguous":
            return gathered
        order = torch.argsort(self.all_positions(gathered.device))
        return gathered.index_select(dim, order)
