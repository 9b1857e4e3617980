"""Exact sliding-window softmax attention, decoded through a ring of ``window`` KV slots.

Paper: the local-attention component of BASED (arXiv 2402.18668, window 64 in its language models); sliding
windows as in Longformer (arXiv 2004.05150).
Idea: query t reads only the ``window`` most recent keys (t - window < i <= t, itself included), so the state is
bounded; recall beyond the window is lost.
Shapes: x (B, T, d); q, k, v (B, H, T, D); ring k, v (B, H, window, D).
Deviation: Zoology's ``SlidingAttn(block_size=w)`` lets query t read keys t - w .. t, i.e. w + 1 keys; here
``window`` counts every key read, so Zoology's block_size w is ``window = w + 1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from attnkit.zoo.base import State, check_int
from attnkit.zoo.softmax import SoftmaxAttention, SoftmaxConfig


@dataclass
class SlidingWindowConfig(SoftmaxConfig):
    """Settings of sliding-window attention: heads, biases and the number of keys each query reads."""

    mixer_name: ClassVar[str] = "sliding_window"

    window: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.mixer_name, "window", self.window, 1)


class SlidingWindowAttention(SoftmaxAttention):
    """Softmax attention over the last ``window`` tokens.

    ``state_size(seq_len)`` counts the keys and values held: 2 * d * min(window, seq_len); without ``seq_len``
    the steady state 2 * d * window (the ring's size).
    """

    name = "sliding_window"
    paper = "https://arxiv.org/abs/2402.18668"
    config_class = SlidingWindowConfig

    def allowed(self, seq_len: int, device: torch.device) -> torch.Tensor:
        """(T, T) bool: t - window < i <= t."""
        full = torch.ones(seq_len, seq_len, dtype=torch.bool, device=device)
        return full.tril() & ~full.tril(-self.config.window)

    def init_state(self, batch: int) -> State:
        ring = torch.zeros(batch, self.num_heads, self.config.window, self.head_dim, **self.factory())
        return {"k": ring, "v": ring.clone(), "seen": 0}  # ring: (B, H, window, D); seen: tokens so far

    def step(self, x_t: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        window, seen = self.config.window, state["seen"]
        q, k, v = self.proj.qkv(x_t[:, None])  # (B, H, 1, D)
        slot = seen % window  # overwrite the oldest token; softmax is order-free, so the ring needs no shifting
        state["k"][:, :, slot] = k[:, :, 0]
        state["v"][:, :, slot] = v[:, :, 0]
        state["seen"] = seen + 1
        filled = (torch.arange(window, device=x_t.device) < min(seen + 1, window))[None]  # (1, window)
        y = F.scaled_dot_product_attention(q, state["k"], state["v"], attn_mask=filled)
        return self.proj.out(y)[:, 0], state

    def state_size(self, seq_len: int | None = None) -> int:
        held = self.config.window if seq_len is None else min(self.config.window, self.need_seq_len(seq_len))
        return 2 * self.num_heads * self.head_dim * held
