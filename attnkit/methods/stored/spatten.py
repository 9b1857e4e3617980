"""SpAtten in software: cascade token pruning by attention accumulated over heads, layers and steps."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit.hf.cache import KVLayer
from attnkit.methods.base import LayerContext, Method, check_float, check_int
from attnkit.reference import dense_attention, expand_kv


class CascadeScores:
    """One score vector per row for all layers of a cache: attention received per position and how many
    query-heads could give it. Positions a decision prunes are dead for every layer, for good.

    score, count: (B, P) float32 by position; alive: (B, P) bool; version counts decisions (layers compact when
    theirs is behind)."""

    def __init__(self) -> None:
        self.score = self.count = self.alive = None
        self.version = 0

    def ensure(self, batch: int, positions: int, device) -> None:
        have = 0 if self.score is None else self.score.shape[1]
        if positions <= have:
            return
        size = max(positions, 2 * have, 256)
        grow = lambda old, fill, dtype: torch.cat(  # noqa: E731
            [old, torch.full((batch, size - have), fill, dtype=dtype, device=device)], dim=1
        ) if old is not None else torch.full((batch, size), fill, dtype=dtype, device=device)
        self.score = grow(self.score, 0.0, torch.float32)
        self.count = grow(self.count, 0.0, torch.float32)
        self.alive = grow(self.alive, True, torch.bool)


class SpAttenLayer(KVLayer):
    """Holds the positions the cascade keeps alive; adds its probabilities to the shared scores."""

    wants_probs = "all"
    shared_layout = False  # rows prune different positions

    def __init__(self, cfg: "SpAtten", layer_idx: int, run, shared: CascadeScores, last: bool) -> None:
        super().__init__(layer_idx, run)
        self.cfg, self.shared, self.last = cfg, shared, last
        self.applied = 0  # the cascade decision this layer's slots reflect

    def initial_capacity(self, tokens: int) -> int:
        return min(tokens, self.cfg.budget + max(self.chunk_hint, 1) + 1)

    def static_unsupported(self) -> str | None:
        return "cascade pruning changes the slots of every layer at a data-dependent step (decodes dynamically)"

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.applied != self.shared.version:  # a decision made after this layer's last forward
            self.drop_dead()
        return super().update(key_states, value_states, *args, **kwargs)

    def observe(self, probs: torch.Tensor) -> None:
        b, h, q, n = probs.shape
        pos = self.stored_pos()[:, 0]  # (B, n): the layout is shared by the KV heads of a row
        self.shared.ensure(b, int(self.seen) + 1, probs.device)
        received = probs.sum((1, 2))  # (B, n): over heads and queries
        qpos = self.qpos.view(b, 1, q)
        seen_by = ((qpos >= pos.unsqueeze(-1)) & (qpos >= 0)).sum(-1).float() * h  # query-heads that saw each slot
        at = pos.clamp_min(0)
        valid = (pos >= 0).float()
        self.shared.score.scatter_add_(1, at, received * valid)
        self.shared.count.scatter_add_(1, at, seen_by * valid)

    def compact(self) -> None:
        if not self.last:
            return
        sh, cfg = self.shared, self.cfg
        pos = self.stored_pos()[:, 0]  # (B, n)
        held = (pos >= 0).sum(-1)
        if int(held.max()) <= cfg.budget:
            return
        at = pos.clamp_min(0)
        avg = sh.score.gather(1, at) / sh.count.gather(1, at).clamp_min(1e-9)
        newest = self.count - cfg.recent  # (B, 1)
        protect = (pos < cfg.sinks) | (pos >= newest)
        priority = avg.masked_fill(protect, float("inf")).masked_fill(pos < 0, float("-inf"))
        keep = priority.topk(min(cfg.budget, pos.shape[1]), dim=-1).indices
        survive = torch.zeros_like(pos, dtype=torch.bool).scatter_(1, keep, True) & (pos >= 0)
        dead = (pos >= 0) & ~survive
        sh.alive.scatter_(1, at, ~dead & sh.alive.gather(1, at))
        sh.version += 1
        self.drop_dead()

    def drop_dead(self) -> None:
        """Compact to the slots whose positions are alive (a row short of slots keeps holes at pos -1)."""
        pos = self.stored_pos()
        live = (pos >= 0) & self.shared.alive.gather(1, pos[:, 0].clamp_min(0)).unsqueeze(1)
        keep = int(live.sum(-1).max())
        order = (~live).to(torch.int8).argsort(dim=-1, stable=True)[..., :keep].sort(dim=-1).values
        self.pos[:, :, : self.n].masked_fill_(~live, -1)
        self.keep_slots(order)
        self.padded = self.padded or bool((self.pos[:, :, :keep] < 0).any())
        self.applied = self.shared.version


@dataclass
class SpAtten(Method):
    """Prune the tokens that have received the least attention, for every layer at once (cascade).

    Paper: SpAtten, Wang et al., HPCA 2021 (https://arxiv.org/abs/2012.09852; mit-han-lab/spatten), an
    accelerator; this is its algorithm in software (the DRAM and speed figures of the hardware do not carry over).

    Each forward, on every global layer: exact attention over the live tokens (eager, float32, probabilities
    needed); each token's score adds the probabilities it received (summed over heads and queries) and its count
    the query-heads that could see it, in one score vector per row shared by all layers and steps. After the last
    global layer, if more than ``budget`` tokens are alive, the top ``budget`` by score / count stay (the first
    ``sinks`` and the ``recent`` newest always), the rest are pruned from every layer for good (cascade token
    pruning), and the memory is freed. Value pruning: probabilities whose mean over the heads is <=
    ``value_threshold`` are zeroed without renormalising (their V rows need not be read).
    How we differ: head pruning and progressive quantization are not implemented yet (they change no token set
    and need a custom kernel to save anything); pruning decisions apply to the layers before the last one from
    the next forward on; decoding runs eagerly (the cascade changes every layer's slots at data-dependent steps).
    Shapes: shared score / count (B, positions) float32; keys/values (B, Hkv, <= budget + q, D).
    """

    name = "spatten"
    summary = "cascade token pruning by attention accumulated over heads, layers and steps + value pruning"
    paper = "https://arxiv.org/abs/2012.09852"

    budget: int = 1024
    sinks: int = 0
    recent: int = 0
    value_threshold: float = 1e-5

    def __post_init__(self) -> None:
        check_int(self.name, "budget", self.budget, 1)
        check_int(self.name, "sinks", self.sinks, 0)
        check_int(self.name, "recent", self.recent, 0)
        check_float(self.name, "value_threshold", self.value_threshold, 0.0, 1.0)
        if self.sinks + self.recent >= self.budget:
            raise ValueError(f"{self.name}: sinks + recent = {self.sinks + self.recent} is invalid; accepted: "
                             f"less than budget={self.budget}")

    @classmethod
    def for_budget(cls, tokens: int) -> "SpAtten":
        return cls(budget=max(1, tokens))

    def kv_budget(self) -> int:
        return self.budget

    def make_layer(self, ctx: LayerContext) -> KVLayer:
        own = [i for i, t in enumerate(ctx.run.layer_types) if t != "sliding_attention"]
        if ctx.layer_idx == own[0]:  # the first layer of a new cache starts a new score vector
            ctx.run.shared["spatten"] = CascadeScores()
        return SpAttenLayer(self, ctx.layer_idx, ctx.run, ctx.run.shared["spatten"], ctx.layer_idx == own[-1])

    def attend(self, run, module, layer: KVLayer, query, key, value, scaling: float, softcap) -> torch.Tensor:
        from attnkit.hf.attention import attend_layer, only_real_queries

        if not isinstance(layer, SpAttenLayer) or self.value_threshold == 0.0:
            return attend_layer(run, layer, query, key, value, scaling, softcap)
        mask = layer.mask()
        _, probs, _ = dense_attention(query, key, value, mask, scaling, softcap)
        negligible = probs.mean(1, keepdim=True) <= self.value_threshold  # (B, 1, q, n)
        kept = probs.masked_fill(negligible, 0.0)
        out = torch.matmul(kept, expand_kv(value, query.shape[1]).float()).to(query.dtype)
        layer.observe(only_real_queries(layer, probs))
        if run.recorder is not None:  # no reference mask reproduces unrenormalised pruning: record what was kept
            run.recorder(dict(layer=layer.layer_idx, query=query, key=key, value=value, mask=mask,
                              scaling=scaling, out=out, value_pruned=negligible))
        layer.compact()
        return out
