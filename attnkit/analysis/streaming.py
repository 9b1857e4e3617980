"""Streaming-head candidates: heads whose attention already looks like StreamingLLM's cache (sinks + recent).

Per query head, the streaming mass is the attention a query puts on the first ``sinks`` tokens plus the ``recent``
keys ending at itself, averaged over the queries at positions >= sinks + recent (earlier queries see nothing
else, so they would score 1 by construction) of essay windows of a few hundred tokens.

Rule (ours; DuoAttention learns such heads, RazorAttention keeps sinks + window for every non-retrieval head): a
KV head of a global layer is a streaming candidate when every query head of its group has streaming mass
>= ``mass_min`` (0.9 by default) and, given head scores, it is not a RazorAttention retrieval head (top 14% by
induction or top 1% by echo). The model's own sliding-window layers are local already and are not listed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit.analysis.capture import is_sliding, layer_probs, record_prefill, softcap_of
from attnkit.analysis.heads import HeadScores
from attnkit.analysis.inputs import essay_windows
from attnkit.session import text_config


def streaming_region(t: int, sinks: int, recent: int) -> torch.Tensor:
    """(T, T) bool: key k is a sink (k < sinks) or among the ``recent`` keys up to query i."""
    i = torch.arange(t)[:, None]
    k = torch.arange(t)[None, :]
    return (k <= i) & ((k < sinks) | (i - k < recent))


@dataclass
class StreamingHeads:
    """mass (L, H): mean streaming mass per query head; see the module docstring for the rule."""

    mass: torch.Tensor
    sinks: int
    recent: int
    tokens: int
    num_key_value_heads: int
    sliding: list[bool]

    def per_kv_head(self) -> torch.Tensor:
        """(L, Hkv): the least streaming query head of each group (a KV head is only as local as its group)."""
        n_layers, n_heads = self.mass.shape
        return self.mass.view(n_layers, self.num_key_value_heads, -1).amin(-1)

    def candidates(self, scores: HeadScores | None = None, mass_min: float = 0.9) -> list[tuple[int, int]]:
        """(layer, kv_head) streaming candidates, sorted."""
        retrieval = set(scores.retrieval_heads()) if scores is not None else set()
        kv = self.per_kv_head()
        return [(l, h) for l in range(kv.shape[0]) for h in range(kv.shape[1])
                if not self.sliding[l] and float(kv[l, h]) >= mass_min and (l, h) not in retrieval]

    def to_dict(self, scores: HeadScores | None = None, mass_min: float = 0.9) -> dict:
        return {"sinks": self.sinks, "recent": self.recent, "tokens": self.tokens, "mass": self.mass.tolist(),
                "mass_min": mass_min, "candidates": [list(p) for p in self.candidates(scores, mass_min)]}


@torch.inference_mode()
def streaming_heads(model, tokenizer=None, samples: int = 4, tokens: int = 512, sinks: int = 4, recent: int = 64,
                    *, seed: int = 0, ids: torch.Tensor | None = None) -> StreamingHeads:
    """Streaming mass of every (layer, query head) on essay windows (or ``ids`` (S, T))."""
    if ids is None:
        if tokenizer is None:
            raise ValueError("streaming_heads needs a tokenizer (or ids=)")
        ids = essay_windows(tokenizer, samples, tokens, seed + 2)
    t = ids.shape[1]
    if t <= sinks + recent:
        raise ValueError(f"tokens={t} is invalid; accepted: more than sinks + recent = {sinks + recent}")
    cfg = text_config(model)
    mass = torch.zeros(cfg.num_hidden_layers, cfg.num_attention_heads)
    region = streaming_region(t, sinks, recent).float()
    softcap = softcap_of(model)

    def on_layer(layer: int, query, key, mask, scaling: float) -> None:
        p = layer_probs(query, key, mask, scaling, softcap)  # (B, H, T, T)
        m = (p * region.to(p.device)).sum(-1)[:, :, sinks + recent:]  # (B, H, q)
        mass[layer] = m.mean((0, 2)).cpu()

    record_prefill(model, ids, on_layer)
    return StreamingHeads(mass, sinks, recent, t, cfg.num_key_value_heads, is_sliding(model))
