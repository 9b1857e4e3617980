"""SpAtten in software: cascade token pruning by attention accumulated over heads, layers and steps."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from attnkit.hf.cache import KVLayer
from attnkit.methods.base import LayerContext, Method, check_float, check_int
from attnkit.reference import attention_probs, dense_attention, expand_kv


class CascadeScores:
    """One score vector per row for all layers of a cache: attention received per position and how many
    query-heads could give it. Positions a decision prunes are dead for every layer, for good.

    score, count: (B, P) float32 by position; alive: (B, P) bool; version counts decisions (layers compact when
    theirs is behind)."""

    def __init__(self) -> None:
        self.score = self.count = self.alive = None
        self.version = 0
        self.head_score: torch.Tensor | None = None  # (B, H) float32: accumulated |output| per query head
        self.head_alive: torch.Tensor | None = None  # (B, H) bool: heads not pruned yet (cascade: only shrinks)
        self.rows = 0  # (query, head) rows attended under the quantization simulation
        self.refetched = 0  # of them, rows whose max probability fell below the threshold (LSBs fetched)
        # fixed-shape steps: the last layer's decision, applied by every layer (same slot: same layouts)
        self.evict_slot: torch.Tensor | None = None  # (B, 1) slot the next token is written to
        self.evict_drop: torch.Tensor | None = None  # (B, 1) bool: that slot held a token pruned for good

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
    """Holds the positions the cascade keeps alive; adds its probabilities (and its heads' output magnitudes)
    to the shared scores."""

    wants_probs = "all"
    shared_layout = False  # rows prune different positions

    def __init__(self, cfg: "SpAtten", layer_idx: int, run, shared: CascadeScores, last: bool) -> None:
        super().__init__(layer_idx, run)
        self.cfg, self.shared, self.last = cfg, shared, last
        self.applied = 0  # the cascade decision this layer's slots reflect

    def initial_capacity(self, tokens: int) -> int:
        return min(tokens, self.cfg.budget + max(self.chunk_hint, 1) + 1)

    def static_unsupported(self) -> str | None:
        if self.cfg.head_keep < 1.0 or self.cfg.msb_bits:
            return "head pruning and the quantization simulation run on the dynamic path only"
        return super().static_unsupported()

    # -- fixed-shape steps: one token in, at most one pruned, every layer at the same slot ------------------------
    # After the prompt every layer holds the same live positions in the same slots (a pending decision is applied
    # first). A step attends over the span (budget + 1 slots at most) and adds its probabilities to the shared
    # scores; the last layer then picks the lowest-scored unprotected slot when more than ``budget`` are live: its
    # position is pruned for good and the next token of every layer goes there (the dynamic path drops it from
    # every layer and appends at the end: the same live set, slots in another order).
    def static_span(self, steps: int) -> int:
        return min(self.n + steps, self.cfg.budget + 1)

    def begin_static(self, steps: int) -> None:
        if self.applied != self.shared.version:
            self.drop_dead()
        super().begin_static(steps)
        b = self.keys.shape[0]
        self.shared.ensure(b, self.seen + steps + 1, self.device)
        self.shared.evict_slot = torch.full((b, 1), self.n, dtype=torch.long, device=self.device)
        self.shared.evict_drop = torch.zeros((b, 1), dtype=torch.bool, device=self.device)

    def apply_decision(self) -> None:
        """Free the slot the last layer chose (if it pruned a token there) and write the next token into it."""
        sh = self.shared
        b, h = self.pos.shape[:2]
        slot = sh.evict_slot.view(b, 1, 1).expand(b, h, 1)
        self.pos.scatter_(2, slot, torch.where(sh.evict_drop.view(b, 1, 1), -1, self.pos.gather(2, slot)))
        self.wslot.copy_(slot)

    def static_write(self, key_states: torch.Tensor, value_states: torch.Tensor):
        self.apply_decision()  # the previous step's decision (layers before the last have not applied it yet)
        return super().static_write(key_states, value_states)

    def static_attend(self, query: torch.Tensor, scaling: float, softcap: float | None) -> torch.Tensor:
        span, cfg, sh = self.span, self.cfg, self.shared
        pos = self.pos[:, :, :span]
        keys, values = self.keys[:, :, :span], self.values[:, :, :span]
        out, probs, _ = dense_attention(query, keys, values, (pos >= 0).unsqueeze(2), scaling, softcap)
        if cfg.value_threshold > 0.0:
            out = torch.matmul(value_pruned(probs, cfg.value_threshold)[0], expand_kv(values, query.shape[1]).float())
        kpos = pos[:, 0]  # (B, span)
        self.add_scores(probs, kpos)
        if self.last:
            slot = self.priority(kpos).argmin(-1, keepdim=True)  # an empty slot while there is one
            there = kpos.gather(1, slot)
            drop = ((kpos >= 0).sum(-1, keepdim=True) > cfg.budget) & (there >= 0)
            sh.alive.scatter_(1, there.clamp_min(0), sh.alive.gather(1, there.clamp_min(0)) & ~drop)
            sh.evict_slot.copy_(slot)
            sh.evict_drop.copy_(drop)
        return out.to(query.dtype)

    def static_after(self) -> None:
        if self.last:  # the dynamic path drops the pruned token from the last layer at once
            self.apply_decision()

    def end_static(self) -> None:
        """Held slots to the front in slot order (the dynamic layout). As on the dynamic path, a layer before the
        last still holds the token the last step pruned, until its next forward drops it."""
        super().end_static()
        self.drop_dead(dead=self.last)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.applied != self.shared.version:  # a decision made after this layer's last forward
            self.drop_dead()
        return super().update(key_states, value_states, *args, **kwargs)

    def observe(self, probs: torch.Tensor, rows: slice | None = None) -> None:
        self.shared.ensure(probs.shape[0], int(self.seen) + 1, probs.device)
        self.add_scores(probs, self.stored_pos()[:, 0], rows)  # the layout is shared by the KV heads of a row

    def add_scores(self, probs: torch.Tensor, pos: torch.Tensor, rows: slice | None = None) -> None:
        """Add probabilities (B, H, q, n) of the chunk's queries (or of its query ``rows``) to the shared score of
        the positions pos (B, n) of the slots they read, and to their count the query-heads that could see them."""
        b, h, q, _ = probs.shape
        received = probs.sum((1, 2))  # (B, n): over heads and queries
        qpos = (self.qpos if rows is None else self.qpos[:, rows]).reshape(b, 1, q)
        seen_by = ((qpos >= pos.unsqueeze(-1)) & (qpos >= 0)).sum(-1).float() * h  # query-heads that saw each slot
        at = pos.clamp_min(0)
        valid = (pos >= 0).float()
        self.shared.score.scatter_add_(1, at, received * valid)
        self.shared.count.scatter_add_(1, at, seen_by * valid)

    def priority(self, pos: torch.Tensor) -> torch.Tensor:
        """(B, n) what keeps each slot of positions pos (B, n): its score / count; +inf for sinks and the recent
        window, -inf for empty slots."""
        sh, cfg = self.shared, self.cfg
        at = pos.clamp_min(0)
        avg = sh.score.gather(1, at) / sh.count.gather(1, at).clamp_min(1e-9)
        protect = (pos < cfg.sinks) | (pos >= self.count - cfg.recent)
        return avg.masked_fill(protect, float("inf")).masked_fill(pos < 0, float("-inf"))

    def prune_heads(self, out: torch.Tensor) -> torch.Tensor:
        """Cascade head pruning on this layer's output (B, H, q, D): heads pruned so far give zeros; the survivors
        add their |output| to the shared importance; then, if more than ``head_keep`` x H heads are alive, the
        least important are pruned for the layers and steps after this one."""
        sh, cfg = self.shared, self.cfg
        b, h = out.shape[:2]
        if sh.head_alive is None or sh.head_alive.shape != (b, h):
            sh.head_score = torch.zeros((b, h), dtype=torch.float32, device=out.device)
            sh.head_alive = torch.ones((b, h), dtype=torch.bool, device=out.device)
        out = out * sh.head_alive.view(b, h, 1, 1).to(out.dtype)
        real = self.real_queries(out.shape[2])  # pad queries add nothing
        mag = out.float().abs() if real is None else out.float().abs() * real.view(b, 1, -1, 1)
        sh.head_score += mag.sum((2, 3))
        keep = max(1, math.ceil(cfg.head_keep * h))
        if int(sh.head_alive.sum(-1).max()) > keep:
            ranked = sh.head_score.masked_fill(~sh.head_alive, float("-inf"))
            top = ranked.topk(keep, dim=-1).indices
            sh.head_alive = torch.zeros_like(sh.head_alive).scatter_(1, top, True) & sh.head_alive
        return out

    def compact(self) -> None:
        if not self.last:
            return
        sh, cfg = self.shared, self.cfg
        pos = self.stored_pos()[:, 0]  # (B, n)
        held = (pos >= 0).sum(-1)
        if int(held.max()) <= cfg.budget:
            return
        at = pos.clamp_min(0)
        keep = self.priority(pos).topk(min(cfg.budget, pos.shape[1]), dim=-1).indices
        survive = torch.zeros_like(pos, dtype=torch.bool).scatter_(1, keep, True) & (pos >= 0)
        dead = (pos >= 0) & ~survive
        sh.alive.scatter_(1, at, ~dead & sh.alive.gather(1, at))
        sh.version += 1
        self.drop_dead()

    def drop_dead(self, dead: bool = True) -> None:
        """Compact to the slots whose positions are alive (a row short of slots keeps holes at pos -1); with
        ``dead`` False, to the held slots only (pruned tokens are then dropped by the next forward)."""
        pos = self.stored_pos()
        live = pos >= 0
        if dead:
            live = live & self.shared.alive.gather(1, pos[:, 0].clamp_min(0)).unsqueeze(1)
        keep = int(live.sum(-1).max())
        order = (~live).to(torch.int8).argsort(dim=-1, stable=True)[..., :keep].sort(dim=-1).values
        self.pos[:, :, : self.n].masked_fill_(~live, -1)
        self.keep_slots(order)
        self.padded = self.padded or bool((self.pos[:, :, :keep] < 0).any())
        self.applied = self.shared.version if dead else -1


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
    Cascade head pruning (``head_keep`` < 1): each head's importance is the |output| it has produced, summed over
    layers and steps in the same shared state; once more than ``head_keep`` x H heads are alive, the least
    important are pruned, for every later layer and step (their output is zero). Progressive quantization
    (``msb_bits`` > 0), a *simulation*: K and V are quantized per token and head (symmetric, absmax) to
    ``msb_bits + lsb_bits`` bits; attention runs first on the MSBs only (the low ``lsb_bits`` dropped), and the
    (query, head) rows whose largest probability is below ``quant_threshold`` (a flat distribution, where
    rounding matters) are recomputed with all the bits. ``run.stats()["spatten"]`` reports the share of rows
    that needed the LSBs; nothing is stored in fewer bits, so no memory or time is saved here.
    How we differ: the paper's head pruning targets BERT-style summarisation and prunes from a start layer on,
    with fine-tuning; here it runs on any layer after the first global one, without fine-tuning, and is off by
    default. Pruning decisions apply to the layers before the last one from the next forward on. Decode steps
    take fixed shapes (CUDA graphs) unless head pruning or the quantization simulation is on: every layer writes
    the new token into the slot of the token the last layer pruned (eager float32 attention over budget + 1 slots).
    Shapes: shared score / count (B, positions) float32; keys/values (B, Hkv, <= budget + q, D).
    """

    name = "spatten"
    summary = "cascade token pruning by attention accumulated over heads, layers and steps + value pruning"
    paper = "https://arxiv.org/abs/2012.09852"

    budget: int = 1024
    sinks: int = 0
    recent: int = 0
    value_threshold: float = 1e-5
    head_keep: float = 1.0
    msb_bits: int = 0
    lsb_bits: int = 4
    quant_threshold: float = 0.1

    def __post_init__(self) -> None:
        check_int(self.name, "budget", self.budget, 1)
        check_int(self.name, "sinks", self.sinks, 0)
        check_int(self.name, "recent", self.recent, 0)
        check_float(self.name, "value_threshold", self.value_threshold, 0.0, 1.0)
        check_float(self.name, "head_keep", self.head_keep, 0.0, 1.0)
        if self.head_keep <= 0.0:
            raise ValueError(f"{self.name}: head_keep={self.head_keep} is invalid; accepted: 0 < head_keep <= 1")
        check_int(self.name, "msb_bits", self.msb_bits, 0)
        check_int(self.name, "lsb_bits", self.lsb_bits, 0)
        if self.msb_bits + self.lsb_bits > 16 or (self.msb_bits and self.msb_bits < 2):
            raise ValueError(f"{self.name}: msb_bits={self.msb_bits}, lsb_bits={self.lsb_bits} are invalid; "
                             "accepted: msb_bits 0 (off) or >= 2, msb_bits + lsb_bits <= 16")
        check_float(self.name, "quant_threshold", self.quant_threshold, 0.0, 1.0)
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

    def extra_stats(self, run) -> dict:
        sh = run.shared.get("spatten")
        if sh is None:
            return {}
        out = {}
        if sh.head_alive is not None:
            out["heads_alive"] = sh.head_alive.sum(-1).tolist()
        if self.msb_bits:
            out["lsb_refetch_share"] = sh.refetched / sh.rows if sh.rows else 0.0
        return {"spatten": out} if out else {}

    def attend(self, run, module, layer: KVLayer, query, key, value, scaling: float, softcap) -> torch.Tensor:
        from attnkit.hf.attention import attend_layer, only_real_queries, row_blocks

        plain = self.value_threshold == 0.0 and self.head_keep == 1.0 and not self.msb_bits
        if not isinstance(layer, SpAttenLayer) or plain or layer.static:
            return attend_layer(run, layer, query, key, value, scaling, softcap)
        h = query.shape[1]
        mask = layer.mask() if run.recorder is not None else None  # the recorder's; otherwise built per block
        if self.msb_bits:  # K and V with all bits and with the MSBs only, quantized once for every block
            keys = quantize_split(key, self.msb_bits, self.lsb_bits)
            v_full, v_msb = (expand_kv(v, h).float() for v in quantize_split(value, self.msb_bits, self.lsb_bits))
        else:
            v_full = expand_kv(value, h).float()
        outs, pruned = [], []
        for rows, block_mask in row_blocks(layer, query, key, mask):  # scores under MASKED_SCORE_BYTES per block
            if self.msb_bits:
                probs, refetch = self.progressive(layer, query[:, :, rows], keys, block_mask, scaling, softcap, rows)
            else:
                probs, _ = attention_probs(query[:, :, rows], key, block_mask, scaling, softcap)
            kept, negligible = value_pruned(probs, self.value_threshold)
            if self.msb_bits:  # a row reads the V it fetched: MSBs only, or all bits where it refetched
                outs.append(torch.where(refetch, torch.matmul(kept, v_full), torch.matmul(kept, v_msb)).to(query.dtype))
            else:
                outs.append(torch.matmul(kept, v_full).to(query.dtype))
            layer.observe(only_real_queries(layer, probs, rows), rows)
            if run.recorder is not None:
                pruned.append(negligible)
            del probs, kept, negligible
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)
        if self.head_keep < 1.0:  # after every block: the heads' importance is the whole chunk's
            out = layer.prune_heads(out)
        if run.recorder is not None:  # no reference mask reproduces unrenormalised pruning: record what was kept
            run.recorder(dict(layer=layer.layer_idx, query=query, key=key, value=value, mask=mask,
                              scaling=scaling, out=out, value_pruned=torch.cat(pruned, dim=2)))
        layer.compact()
        return out

    def progressive(self, layer: SpAttenLayer, query, keys, mask, scaling, softcap, rows: slice):
        """Progressive quantization, simulated, for the chunk's query ``rows`` (query (B, H, q', D); keys: K with
        all bits and K's MSBs, (B, Hkv, n, D)) -> (probs (B, H, q', n), refetch (B, H, q', 1) bool): a row's
        probabilities come from the MSB-only keys unless their max is below the threshold, then from the keys
        with all bits (the LSBs fetched)."""
        full_k, msb_k = keys
        coarse, _ = attention_probs(query, msb_k, mask, scaling, softcap)
        fine, _ = attention_probs(query, full_k, mask, scaling, softcap)
        refetch = coarse.amax(-1, keepdim=True) < self.quant_threshold  # (B, H, q', 1)
        real = layer.real_queries(None, rows)
        counted = refetch if real is None else refetch & real.bool().view(real.shape[0], 1, -1, 1)
        sh = layer.shared
        b, h, q = query.shape[:3]
        sh.rows += int(b * h * q if real is None else h * real.sum())
        sh.refetched += int(counted.sum())
        return torch.where(refetch, fine, coarse), refetch


def value_pruned(probs: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SpAtten's value pruning: (probs (B, H, q, n) with the entries whose mean over heads is <= threshold zeroed,
    not renormalised; which entries, (B, 1, q, n) bool)."""
    negligible = probs.mean(1, keepdim=True) <= threshold
    return probs.masked_fill(negligible, 0.0), negligible


def quantize_split(x: torch.Tensor, msb: int, lsb: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., D) -> (all msb + lsb bits, MSBs only), symmetric per-vector absmax quantization, dequantized to
    x's dtype. The MSB-only value truncates the low ``lsb`` bits toward zero, as fetching only the MSBs would."""
    levels = 2 ** (msb + lsb - 1) - 1
    scale = x.float().abs().amax(-1, keepdim=True).clamp_min(1e-12) / levels
    q = torch.round(x.float() / scale).clamp(-levels, levels)
    step = 2 ** lsb
    q_msb = torch.trunc(q / step) * step
    return (q * scale).to(x.dtype), (q_msb * scale).to(x.dtype)
