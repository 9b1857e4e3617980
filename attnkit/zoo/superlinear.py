"""Superlinear multi-step (span) attention: route each query to top-k spans of ~sqrt(t) tokens, attend inside them.

Paper: Huang, "Superlinear Multi-Step Attention" (arXiv 2601.18401; code concavity-ai/superlinear, read through
its reference span search ``kernels/superlinear/search/_reference.py`` (``get_spans``), ``kernels/common/power.py``,
``kernels/common/adjustment.py`` and the fused span-attention paths that gate spans by their search scores).
Idea (the N = 2 "jump search" case, O(L^1.5)): a query at position t scores only O(sqrt t) anchor keys on fixed
stripes, keeps the top-k anchors, attends exactly inside the contiguous span behind each anchor (plus a short
sliding window), and mixes the span outputs with a softmax over the anchors' scores. The anchors' spans together
cover every past token (structural non-exclusion), so any token can be reached.
Definition (0-indexed query t, as in the reference code with power 1/2):
- window: the W = (sw_index + 1)^2 - 1 most recent keys t - W + 1 .. t (none for sw_index 0);
- anchors: a_s = t - s^2 + 1 for s = sw_index + 1, sw_index + 2, .. while a_s >= 0 (the first is just before the
  window); routing score r_s = qs_t . k_{a_s} with a separate learned search query qs (the code's Q1), unscaled;
- the top_k anchors by r are selected; anchor a's span is a - ceil(backward_factor * (t + 1)^span_power) .. a
  (clipped at 0), which lies before the window;
- span output o_a = softmax over (span keys + window keys) of q_t . k / sqrt D, with the attention query q (Q2);
- y_t = sum over selected a of softmax_a(r_a) o_a. A query with no anchor yet (t + 1 < (sw_index + 1)^2) uses the
  window alone, which then holds its whole past (the code's uniform fallback gives the same).
Training and decoding follow this same definition (selection is hard top-k in both; gradients reach the routing
through the gate softmax), so decode reproduces the parallel forward.
Shapes: x (B, T, d); q, qs, k, v (B, H, T, D); selected anchors (B, H, T, top_k); decode cache k, v (B, H, n, D):
like the paper, every key and value is kept (O(L) memory), only the compute is subquadratic.
Simplifications: no accumulation stage (the paper's Mamba-2 layers that make each anchor key a summary of the
prefix; in a zoo LM the earlier layers play that part); stripe power fixed at 1/2 (the code also has 1/3..1/6);
no forward span extension (the code's ``forward_factor`` 0.0 default); the parallel path is a masked dense
computation, O(T^2) memory and time per span, not the paper's bucketed O(L^1.5) kernels.
Defaults: top_k 2, backward_factor 2.0 and span_power 0.5 as in ``get_spans``; sw_index 1 (a 3-token local window)
where the reference function's default is 0 (no window: the local span is then the span of the stripe-1 anchor, the
query itself, only when selected).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from attnkit.zoo.base import State, check_float, check_int, masked_softmax, split_heads
from attnkit.zoo.softmax import SoftmaxAttention, SoftmaxConfig


@dataclass
class SuperlinearConfig(SoftmaxConfig):
    """Settings of span attention: heads, biases, spans kept per query, the sliding-window index (window
    (sw_index + 1)^2 - 1 tokens) and the span length ceil(backward_factor * (t + 1)^span_power)."""

    mixer_name: ClassVar[str] = "superlinear"

    top_k: int = 2
    sw_index: int = 1
    backward_factor: float = 2.0
    span_power: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.mixer_name, "top_k", self.top_k, 1)
        check_int(self.mixer_name, "sw_index", self.sw_index, 0)
        check_float(self.mixer_name, "backward_factor", self.backward_factor, 0.0)
        check_float(self.mixer_name, "span_power", self.span_power, 0.0, 1.0, open_lo=True)


class SuperlinearAttention(SoftmaxAttention):
    """Top-k span attention gated by routing scores. ``state_size(seq_len)`` counts the full KV cache:
    2 * d * seq_len (the paper keeps every key and value)."""

    name = "superlinear"
    paper = "https://arxiv.org/abs/2601.18401"
    config_class = SuperlinearConfig

    def __init__(self, d_model: int, config: SuperlinearConfig | None = None) -> None:
        super().__init__(d_model, config)
        self.search = nn.Linear(d_model, d_model, bias=self.config.bias)  # the routing query Q1

    def span_length(self, t: int) -> int:
        cfg = self.config
        return math.ceil(cfg.backward_factor * (t + 1) ** cfg.span_power)

    def attend(self, q: torch.Tensor, qs: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               positions: list[int]) -> torch.Tensor:
        """Queries q, qs (B, H, Tq, D) at 0-indexed ``positions`` over keys / values (B, H, n, D) at 0 .. n - 1."""
        cfg, n, dev = self.config, k.shape[2], q.device
        pos = torch.tensor(positions, device=dev)[:, None]  # (Tq, 1)
        key = torch.arange(n, device=dev)[None, :]  # (1, n)
        back = pos - key + 1  # distance + 1; anchors sit where it is s^2 with s > sw_index
        root = back.clamp_min(0).double().sqrt().round().long()
        anchor = (root * root == back) & (root > cfg.sw_index) & (back > 0)  # (Tq, n)
        window = (back > 0) & (back <= (cfg.sw_index + 1) ** 2 - 1)
        routing = (qs @ k.transpose(-1, -2)).masked_fill(~anchor, float("-inf"))  # (B, H, Tq, n)
        r, chosen = routing.topk(min(cfg.top_k, n), dim=-1)  # (B, H, Tq, k)
        valid = torch.isfinite(r)
        lo = chosen - torch.tensor([self.span_length(t) for t in positions], device=dev)[:, None]  # span start
        in_span = (key[..., None] >= lo[..., None, :]) & (key[..., None] <= chosen[..., None, :])  # (B,H,Tq,n,k)
        allowed = (in_span & valid[..., None, :]) | window[..., None]
        scores = (q @ k.transpose(-1, -2))[..., None] * self.head_dim ** -0.5  # (B, H, Tq, n, 1)
        spans = torch.einsum("bhtnk,bhnd->bhtkd", masked_softmax(scores, allowed, dim=-2), v)  # (B,H,Tq,k,D)
        gate = masked_softmax(r, valid)  # (B, H, Tq, k); zero where no anchor is valid
        alone = (~valid.any(-1, keepdim=True)).to(q.dtype)  # no anchor yet: the window (every slot holds it)
        return (gate[..., None] * spans).sum(-2) + alone * spans[..., 0, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.proj.qkv(x)
        qs = split_heads(self.search(x), self.num_heads)
        return self.proj.out(self.attend(q, qs, k, v, list(range(x.shape[1]))))

    def step(self, x_t: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        q, k, v = self.proj.qkv(x_t[:, None])  # (B, H, 1, D)
        qs = split_heads(self.search(x_t[:, None]), self.num_heads)
        state["k"] = torch.cat([state["k"], k], dim=2)
        state["v"] = torch.cat([state["v"], v], dim=2)
        y = self.attend(q, qs, state["k"], state["v"], [state["k"].shape[2] - 1])
        return self.proj.out(y)[:, 0], state
