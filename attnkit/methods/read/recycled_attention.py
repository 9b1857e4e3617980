"""Recycled Attention (RefreshKV): decode over a small recycled cache, refreshed by full steps on query drift."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnkit import kernels
from attnkit.hf.attention import attend_layer
from attnkit.hf.cache import KVLayer
from attnkit.methods.base import LayerContext, Method, check_float, check_int

NEG_INF = float("-inf")


class RecycledLayer(KVLayer):
    """The full cache plus, per KV head, the slots of the recycled cache and the query of the last full step.

    recycled: (B, Hkv, K) slot ids in ascending order of the score that chose them (-1: empty, kept first so that
    the rolling append drops an empty entry while there is one); qbar: (B, D) float32 mean query over heads.
    ``decode_step`` counts decode steps since the prompt (host int, also advanced by graph replays); ``checking``
    says whether the step under way (dynamic) or the next one (fixed-shape, whose counters advance after it) is a
    drift check. It is kept as a bool so that a compiled step specialises on the step's kind, not its number.
    """

    def __init__(self, cfg: "RecycledAttention", layer_idx: int, run) -> None:
        super().__init__(layer_idx, run)
        self.cfg = cfg
        self.recycled: torch.Tensor | None = None
        self.qbar: torch.Tensor | None = None
        self.set_step(0)

    def set_step(self, step: int) -> None:
        self.decode_step = step
        ahead = 1 if self.static else 0  # a fixed-shape step's counter advances after the step
        self.checking = (step + ahead) % self.cfg.stride == 0

    @property
    def wants_probs(self) -> str | None:  # the prompt's last query chooses the first recycled cache
        return "last:1" if self.qpos is not None and self.qpos.shape[1] > 1 else None

    def observe(self, probs: torch.Tensor, rows: slice | None = None) -> None:
        self.recycled = self.choose(probs[:, :, -1])
        self.set_step(0)

    def choose(self, probs: torch.Tensor) -> torch.Tensor:
        """(B, Hkv, K) slots from (B, H, n) probabilities: max over the GQA group, max-pool 7, top K."""
        b, h, n = probs.shape
        hkv = self.keys.shape[1]
        grouped = probs.float().view(b, hkv, h // hkv, n).amax(2)
        k = self.cfg.pool
        pooled = F.max_pool1d(grouped.flatten(0, 1).unsqueeze(1), k, stride=1, padding=k // 2).view(b, hkv, n)
        pooled = pooled.masked_fill(self.pos[:, :, :n] < 0, NEG_INF)
        take = min(self.cfg.recycled, n)
        # Ties (max-pooling makes runs of equal values) go to the lower slot, as a stable sort would (slots of a
        # row are in position order, so a padded row picks and orders exactly as that prompt alone): one int64
        # key, the value's bits (order-preserving for probabilities >= 0 and for -inf, which is negative) then
        # the slot reversed, ranked by a top-k instead of a sort of the whole span.
        tiebreak = n - 1 - torch.arange(n, device=pooled.device)
        key = (pooled.contiguous().view(torch.int32).to(torch.int64) << 32) | tiebreak
        best, top = key.topk(take, dim=-1)  # descending
        top = top.masked_fill(best < 0, -1).flip(-1)  # ascending score, empty (-inf) entries first
        if take < self.cfg.recycled:
            top = F.pad(top, (self.cfg.recycled - take, 0), value=-1)
        return top

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if key_states.shape[-2] == 1 and not self.static:
            self.set_step(self.decode_step + 1)
        return super().update(key_states, value_states, *args, **kwargs)

    def begin_static(self, steps: int) -> None:
        super().begin_static(steps)
        self.set_step(self.decode_step)

    def end_static(self) -> None:
        super().end_static()
        self.set_step(self.decode_step)

    def advance_host(self) -> None:
        super().advance_host()
        self.set_step(self.decode_step + 1)

    def host_state(self) -> tuple:
        return (*super().host_state(), self.decode_step)

    def set_host_state(self, state: tuple) -> None:
        super().set_host_state(state[:-1])
        self.set_step(state[-1])

    def static_phase(self) -> str:
        """The next step's kind: a drift check (every ``stride`` steps) or a partial step (CUDA graph key)."""
        return "check" if self.checking else "partial"

    def reset(self) -> None:
        super().reset()
        self.recycled = self.qbar = None
        self.set_step(0)


@dataclass
class RecycledAttention(Method):
    """Decode over a small recycled cache; a full-attention step refreshes it when the query has drifted.

    Paper: Recycled Attention, renamed RefreshKV (Xu et al., arXiv 2411.05787, ACL 2025; the authors' repo holds no
    code). The tokens the last full-attention step attended to most stay the important ones for the next steps.

    Per global layer: the prompt is prefilled densely, and its last query's attention (max over the query heads of
    a KV group, max-pooled with width ``pool``) picks the ``recycled`` slots per KV head; its mean query over
    heads is kept. Each decode step attends over the recycled slots plus the current token (partial step), and
    the current token then joins the recycled cache, which drops its lowest-scored entry. Every ``stride``-th
    step the mean query is compared with the kept one: a row whose cosine is <= ``threshold`` takes a full step
    (attention over the whole cache), whose attention rebuilds its recycled cache and whose query is kept.
    The full cache is never evicted: a speed method, not a memory one.
    How we differ: the recycled cache is a list of slot ids read in place (no second K/V copy), so "appending the
    new K/V to the full cache" is already done; per batch row the check step computes both the full and the
    partial output and keeps one (the paper's batch-1 code branches); the first recycled cache comes from the
    prompt's last query, as in the paper. Defaults: K 2048 (the paper uses L / 8), stride 5, threshold 0.85
    (the paper's value for Llama-3.1-8B; 0.95 for Qwen2), pool 7.
    Shapes: recycled (B, Hkv, K) slot ids; partial steps read (B, Hkv, K + 1, D) in place.
    """

    name = "recycled_attention"
    summary = "partial steps over a recycled top-K cache, full steps on query drift every `stride` steps"
    paper = "https://arxiv.org/abs/2411.05787"
    kind = "read"

    recycled: int = 2048
    stride: int = 5
    threshold: float = 0.85
    pool: int = 7

    def __post_init__(self) -> None:
        check_int(self.name, "recycled", self.recycled, 1)
        check_int(self.name, "stride", self.stride, 1)
        check_float(self.name, "threshold", self.threshold, -1.0, 1.0)
        check_int(self.name, "pool", self.pool, 1)
        if self.pool % 2 == 0:
            raise ValueError(f"{self.name}: pool={self.pool} is invalid; accepted: an odd integer >= 1")

    @classmethod
    def for_budget(cls, tokens: int) -> "RecycledAttention":
        """``tokens`` recycled slots per KV head (a partial step reads tokens + 1)."""
        return cls(recycled=max(1, tokens))

    def make_layer(self, ctx: LayerContext) -> KVLayer:
        return RecycledLayer(self, ctx.layer_idx, ctx.run)

    def attend(self, run, module, layer: KVLayer, query, key, value, scaling: float, softcap) -> torch.Tensor:
        q = query.shape[2]
        if not isinstance(layer, RecycledLayer) or softcap is not None or q > 1 or layer.recycled is None:
            out = attend_layer(run, layer, query, key, value, scaling, softcap)
            if isinstance(layer, RecycledLayer) and q > 1:
                layer.qbar = query[:, :, -1].float().mean(1)  # (B, D): the prompt's last query
            return out
        b, h, _, d = query.shape
        cur = layer.wslot if layer.static else torch.full_like(layer.recycled[..., :1], layer.n - 1)
        idx = torch.cat([layer.recycled, cur], dim=-1)  # (B, Hkv, K + 1)
        out = kernels.sparse_decode_attention(query, layer.keys, layer.values, layer.pos, idx, 1, scaling)
        rolled = torch.cat([layer.recycled[..., 1:], cur], dim=-1)
        full = None
        if layer.checking:  # drift check: a drifted row takes the full step
            qmean = query[:, :, 0].float().mean(1)  # (B, D)
            full = F.cosine_similarity(qmean, layer.qbar, dim=-1) <= self.threshold  # (B,)
            # The full step runs for every row unless this is the CPU's dynamic path, where reading `full` on the
            # host is free and the step is skipped when no row drifted (no host sync on CUDA, graphs or not).
            if layer.static or query.is_cuda or bool(full.any()):
                span = layer.span if layer.static else layer.n
                hkv = layer.keys.shape[1]
                scores = kernels.head_scores(query, layer.keys, layer.pos, 0, layer.count, span)  # (B, H, span)
                probs = torch.softmax(scores * scaling, dim=-1)
                if layer.static:
                    out_full = kernels.decode_attention(query, layer.keys, layer.values, layer.pos, span, scaling)
                else:
                    out_full = torch.matmul(probs.view(b, hkv, h // hkv, span).to(layer.values.dtype),
                                            layer.values[:, :, :span]).reshape(b, h, 1, d).to(query.dtype)
                rebuilt = layer.choose(probs)
                out = torch.where(full.view(b, 1, 1, 1), out_full, out)
                rolled = torch.where(full.view(b, 1, 1), rebuilt, rolled)
                layer.qbar.copy_(torch.where(full.view(b, 1), qmean, layer.qbar))
        if run.recorder is not None:
            run.recorder(dict(layer=layer.layer_idx, query=query, key=key, value=value,
                              mask=read_mask(idx, full, layer), scaling=scaling, out=out))
        layer.recycled.copy_(rolled)
        if layer.static:
            layer.static_after()
        else:
            layer.compact()
        return out


def read_mask(idx: torch.Tensor, full: torch.Tensor | None, layer: KVLayer) -> torch.Tensor:
    """(B, Hkv, 1, n) bool: the valid slots a decode step read (every valid slot for rows on a full step)."""
    n = layer.n
    valid = layer.stored_pos() >= 0
    chosen = torch.zeros((*idx.shape[:2], n + 1), dtype=torch.bool, device=idx.device)
    chosen.scatter_(2, torch.where(idx >= 0, idx, n), True)
    read = chosen[..., :n] & valid
    if full is not None:
        read = torch.where(full.view(-1, 1, 1), valid, read)
    return read.unsqueeze(2)
