"""SnapKV: compress the prompt's KV from an observation window of its last queries."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnkit.hf.cache import KVLayer
from attnkit.methods.base import LayerContext, Method, check_choice, check_int


class SnapKVLayer(KVLayer):
    """Keeps the last ``window`` prompt tokens plus the ``budget - window`` older ones that the window's queries
    attend to most (pooled along the sequence); by default once, when decoding starts."""

    shared_layout = False

    def __init__(self, cfg: "SnapKV", layer_idx: int, run) -> None:
        super().__init__(layer_idx, run)
        self.cfg = cfg
        self.scores: torch.Tensor | None = None  # (B, Hkv, n_obs) window scores of the latest prefill chunk
        self.obs_window = 0

    @property
    def wants_probs(self) -> str | None:
        q = self.qpos.shape[1]
        return f"last:{self.cfg.window}" if q > 1 and self.n > self.cfg.budget else None

    def observe(self, probs: torch.Tensor, rows: slice | None = None) -> None:
        b, h, w, n = probs.shape
        self.scores = probs.sum(2).view(b, self.keys.shape[1], -1, n).mean(2)  # (B, Hkv, n)
        self.obs_window = w

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # The prompt ended with the previous forward: compress before the first decode step reads the cache.
        if key_states.shape[-2] == 1 and self.scores is not None:
            self.compress()
        return super().update(key_states, value_states, *args, **kwargs)

    def begin_static(self, steps: int) -> None:
        if self.scores is not None:  # the prompt's compression happens before the first fixed-shape step
            self.compress()
        super().begin_static(steps)

    def compact(self) -> None:
        if self.cfg.every_chunk and self.scores is not None:
            self.compress()

    def holds_prefix(self) -> bool:
        # Per-head layouts only begin with a compression, which leaves fewer slots than tokens seen: until then the
        # prompt's chunks are plain causal (the flash kernel, no (q, n) mask).
        return self.n == self.seen and not self.padded

    def keep_older(self, n_obs: int, w: int) -> int:
        """Slots kept among the ``n_obs - w`` prompt tokens older than the observation window."""
        return self.cfg.budget - w

    def compress(self) -> None:
        """Keep top (budget - w) of the observed slots older than the window, the window, and later slots."""
        cfg, n_obs, w = self.cfg, self.scores.shape[-1], self.obs_window
        older = self.scores[:, :, : n_obs - w]
        k = cfg.kernel
        pool = F.max_pool1d if cfg.pooling == "max" else F.avg_pool1d
        pooled = pool(older.flatten(0, 1).unsqueeze(1), k, stride=1, padding=k // 2).view_as(older)
        # Padding never wins a slot (zero-padded pooling treats it as the unpadded prompt's edge, as alone).
        pooled = pooled.masked_fill(self.pos[:, :, : n_obs - w] < 0, float("-inf"))
        if self.padded:  # each row's rule counts its own prompt (one host sync, once per prompt)
            real = (self.pos[:, 0, :n_obs] >= 0).sum(-1).tolist()
            keeps = [min(self.keep_older(r, w), max(r - w, 0)) for r in real]
        else:
            keeps = [min(self.keep_older(n_obs, w), n_obs - w)] * older.shape[0]
        _, top = pooled.topk(max(keeps), dim=-1)  # by score, descending
        if min(keeps) < max(keeps):  # a row that keeps fewer: its lowest-ranked extra picks become holes
            rank = torch.arange(max(keeps), device=top.device)
            extra = rank >= torch.tensor(keeps, device=top.device).view(-1, 1, 1)
            self.pos[:, :, : n_obs - w].scatter_(2, top, torch.where(extra, -1, self.pos[:, :, : n_obs - w].gather(2, top)))
        top = top.sort(dim=-1).values
        tail = torch.arange(n_obs - w, self.n, device=top.device).expand(*top.shape[:2], -1)
        self.keep_slots(torch.cat([top, tail], dim=-1))
        self.scores = None
        if not self.cfg.every_chunk:  # the prompt-sized buffers are not needed again: free them
            self.shrink()


@dataclass
class SnapKV(Method):
    """Keep the prompt tokens that the prompt's last queries attend to, per KV head.

    Paper: SnapKV, Li et al., NeurIPS 2024 (https://arxiv.org/abs/2404.14469). Each head's attention pattern on
    the prompt is visible in an observation window at the prompt's end; pooled window scores pick the clusters of
    tokens to keep, and generation then runs on the compressed cache.

    Algorithm: the prompt is prefilled densely (in chunks or not); when decoding starts, each prompt token older
    than the observation window is scored by the attention the prompt's ``window`` last queries give it (summed
    over those queries, averaged over the query heads of a GQA group), smoothed with a 1-D ``pooling`` of width
    ``kernel``; the top ``budget - window`` plus the window are kept. Decode steps then append without
    compression, as in the paper. The window is taken from the last prefill chunk, so it holds
    min(window, last chunk length) queries. ``every_chunk=True`` compresses after every prefill chunk instead
    (memory bounded by budget + chunk during prefill, as kvpress's chunked presses), which loses needles that
    the question only asks for at the end: on RULER NIAH at 4K with SmolLM2 it scored 0 where the paper's
    variant keeps the needle. Official defaults vary (window 32 or 64, kernel 5, avg pooling); we use 32 / 5 /
    avg. Shapes: keys/values (B, Hkv, n_prompt, D) during prefill, (B, Hkv, budget + generated, D) after.
    """

    name = "snapkv"
    summary = "prompt compression by an observation window of the last queries (pooled, per KV head)"
    paper = "https://arxiv.org/abs/2404.14469"

    budget: int = 1024
    window: int = 32
    kernel: int = 5
    pooling: str = "avg"
    every_chunk: bool = False

    def __post_init__(self) -> None:
        check_int(self.name, "window", self.window, 1)
        check_int(self.name, "budget", self.budget, self.window + 1)
        check_int(self.name, "kernel", self.kernel, 1)
        if self.kernel % 2 == 0:
            raise ValueError(f"{self.name}: kernel={self.kernel} is invalid; accepted: an odd integer >= 1")
        check_choice(self.name, "pooling", self.pooling, ("avg", "max"))
        check_choice(self.name, "every_chunk", self.every_chunk, (False, True))

    @classmethod
    def for_budget(cls, tokens: int) -> "SnapKV":
        return cls(budget=tokens, window=min(32, tokens // 4))

    def kv_budget(self) -> int:
        return self.budget

    def make_layer(self, ctx: LayerContext) -> KVLayer:
        return SnapKVLayer(self, ctx.layer_idx, ctx.run)
