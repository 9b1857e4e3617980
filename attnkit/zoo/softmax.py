"""Causal multi-head softmax attention, decoded through a KV cache.

Paper: Vaswani et al., "Attention Is All You Need" (arXiv 1706.03762); the full-attention baseline of Zoology
(arXiv 2312.04927) and BASED (arXiv 2402.18668).
Idea: every query weighs all earlier keys by softmax(q.k / sqrt(D)); exact recall at a state that grows with the
sequence (the KV cache).
Shapes: x (B, T, d); q, k, v (B, H, T, D) with D = d / H; cache k, v (B, H, n, D) after n tokens.
Deviation: none in the attention itself; like Zoology's MHA (num_heads 1, biases on) there are no positional
encodings inside the mixer (the LM may add learned positions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from attnkit.zoo.base import Mixer, State, check_bool, check_int


@dataclass
class SoftmaxConfig:
    """Settings of causal softmax attention (Zoology's MQAR baseline: one head, biased projections)."""

    mixer_name: ClassVar[str] = "softmax"

    num_heads: int = 1
    bias: bool = True

    def __post_init__(self) -> None:
        check_int(self.mixer_name, "num_heads", self.num_heads, 1)
        check_bool(self.mixer_name, "bias", self.bias)


class SoftmaxAttention(Mixer):
    """Causal multi-head softmax attention. ``state_size(seq_len)`` counts the KV cache: 2 * d * seq_len."""

    name = "softmax"
    paper = "https://arxiv.org/abs/1706.03762"
    config_class = SoftmaxConfig

    def __init__(self, d_model: int, config: SoftmaxConfig | None = None) -> None:
        super().__init__(d_model, config)
        self.proj = self.multi_head(self.config.num_heads, bias=self.config.bias)

    def allowed(self, seq_len: int, device: torch.device) -> torch.Tensor:
        """(T, T) bool, True where query t may read key i: i <= t."""
        return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.proj.qkv(x)  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.allowed(x.shape[1], x.device))
        return self.proj.out(y)

    def init_state(self, batch: int) -> State:
        empty = torch.zeros(batch, self.num_heads, 0, self.head_dim, **self.factory())
        return {"k": empty, "v": empty.clone()}  # (B, H, n, D), grown by one slot per step

    def step(self, x_t: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        q, k, v = self.proj.qkv(x_t[:, None])  # (B, H, 1, D)
        state["k"] = torch.cat([state["k"], k], dim=2)
        state["v"] = torch.cat([state["v"], v], dim=2)
        y = F.scaled_dot_product_attention(q, state["k"], state["v"])  # every cached key is in the past
        return self.proj.out(y)[:, 0], state

    def state_size(self, seq_len: int | None = None) -> int:
        return 2 * self.num_heads * self.head_dim * self.need_seq_len(seq_len)
