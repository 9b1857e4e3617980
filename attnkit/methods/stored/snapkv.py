"""SnapKV: compress the prompt's KV from an observation window of its last queries."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnkit.hf.cache import KVLayer
from attnkit.methods.base import LayerContext, Method, check_choice, check_int


class SnapKVLayer(KVLayer):
    """After a prefill forward that leaves more than ``budget`` tokens: keep the last ``window`` tokens plus the
    ``budget - window`` older ones the window's queries attend to most (pooled along the sequence)."""

    shared_layout = False

    def __init__(self, cfg: "SnapKV", layer_idx: int, run) -> None:
        super().__init__(layer_idx, run)
        self.cfg = cfg
        self.scores: torch.Tensor | None = None

    @property
    def wants_probs(self) -> str | None:
        q = self.qpos.shape[0]
        return f"last:{self.cfg.window}" if q > 1 and self.n > self.cfg.budget else None

    def observe(self, probs: torch.Tensor) -> None:
        b, h, _, n = probs.shape
        self.scores = probs.sum(2).view(b, self.keys.shape[1], -1, n).mean(2)  # (B, Hkv, n)

    def compact(self) -> None:
        if self.scores is None:
            return
        cfg, window = self.cfg, min(self.cfg.window, self.qpos.shape[0])
        older = self.scores[:, :, : self.n - window]
        k = cfg.kernel
        pool = F.max_pool1d if cfg.pooling == "max" else F.avg_pool1d
        pooled = pool(older.flatten(0, 1).unsqueeze(1), k, stride=1, padding=k // 2).view_as(older)
        self.keep_slots(self.recent_and_top(pooled, cfg.budget, window))
        self.scores = None


@dataclass
class SnapKV(Method):
    """Keep the prompt tokens that the prompt's last queries attend to, per KV head.

    Paper: SnapKV, Li et al., NeurIPS 2024 (https://arxiv.org/abs/2404.14469). Each head's attention pattern on
    the prompt is visible in an observation window at the prompt's end; pooled window scores pick the clusters of
    tokens to keep, and generation then runs on the compressed cache.

    Algorithm: after a prefill forward holding n > ``budget`` tokens, score each older token by the attention
    its ``window`` last queries give it (summed over those queries, averaged over the query heads of a GQA group),
    smooth with a 1-D ``pooling`` of width ``kernel``, keep the top ``budget - window`` plus the window. Decode
    steps append without compression (as in the paper). Deviation: with chunked prefill the compression runs after
    every chunk, observed from that chunk's last queries (memory stays bounded); one prefill forward over the
    whole prompt is the paper's method. Official defaults vary (window 32 or 64, kernel 5, avg pooling); we use
    32 / 5 / avg. Shapes: keys/values (B, Hkv, budget + q, D) during a forward.
    """

    name = "snapkv"
    summary = "prompt compression by an observation window of the last queries (pooled, per KV head)"
    paper = "https://arxiv.org/abs/2404.14469"

    budget: int = 1024
    window: int = 32
    kernel: int = 5
    pooling: str = "avg"

    def __post_init__(self) -> None:
        check_int(self.name, "window", self.window, 1)
        check_int(self.name, "budget", self.budget, self.window + 1)
        check_int(self.name, "kernel", self.kernel, 1)
        if self.kernel % 2 == 0:
            raise ValueError(f"{self.name}: kernel={self.kernel} is invalid; accepted: an odd integer >= 1")
        check_choice(self.name, "pooling", self.pooling, ("avg", "max"))

    @classmethod
    def for_budget(cls, tokens: int) -> "SnapKV":
        return cls(budget=tokens, window=min(32, tokens // 4))

    def kv_budget(self) -> int:
        return self.budget

    def make_layer(self, ctx: LayerContext) -> KVLayer:
        return SnapKVLayer(self, ctx.layer_idx, ctx.run)
