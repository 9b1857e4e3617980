"""Core Context Aware (CCA) attention: pooled core tokens of past groups + exact attention over a local window.

Paper: Chen, You, Zhang, Li, Li, Wang, Tan, "Core Context Aware Transformers for Long Context Language Modeling"
(arXiv 2412.12465, ICML 2025; chenyaofo/CCA-Attention, whose public snapshot holds the project page with the
method's equations, not the kernels).
Idea: tokens are grouped in groups of g; each complete group is compressed into one core token, weighted by its
importance to the group's last token; a query attends to the core tokens of groups far behind it (global,
O(L / g)) and exactly to its neighbourhood (local, about s tokens), in one softmax.
Globality-aware pooling: for group i (1-indexed tokens (i-1)g+1 .. ig),
    c_i = softmax(Q_ig K_{I_i}^T / sqrt D) X_{I_i},   K^G = C W^K, V^G = C W^V;
per head, with the layer's own projections (no new weights). Because the projections are affine and the weights
sum to 1, the head's core key / value is the same weighted average of the group's keys / values, which is how it is
computed here.
Locality and causality: query i (1-indexed) sees the core tokens of groups 1 .. j with j = max(0, floor((i - s) / g))
and the exact tokens j*g + 1 .. i, a window of s + ((i - s) mod g) tokens that starts on a group boundary. So the
cores and the window cover every past token exactly once, and a core is only read once its group (which its own
last query pooled) is complete. The project page writes the window start as max(1, i - s - ((i - s) mod g)) = j*g,
one token earlier than this partition (it would count token j*g twice, in core j and in the window); the window size
it states, s + ((i - s) mod g), matches the partition used here.
Fusion: the two parts are concatenated and share one softmax (the paper's differentiable fusion):
    y_i = softmax(q_i [K^G_{1..j}; K_{jg+1..i}]^T / sqrt D) [V^G_{1..j}; V_{jg+1..i}].
Shapes: x (B, T, d); q, k, v (B, H, T, D); core keys / values (B, H, floor(T / g), D); decode state: the cores of
every complete group and the window's keys / values (B, H, <= s + g - 1, D).
Defaults: g = 16, s = 1024, a long-context setting chosen within the range the paper's ablations report (g = 8 to
64, s = 512, per the method notes read here); the paper's main setting was not readable here, so check it before
quoting these as the paper's. MQAR-sized runs want much smaller values.
Deviations: none in the definition above; the parallel path is a masked dense computation (O(T^2) memory), not the
paper's Triton kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from attnkit.zoo.base import State, check_int, masked_softmax
from attnkit.zoo.softmax import SoftmaxAttention, SoftmaxConfig


@dataclass
class CCAConfig(SoftmaxConfig):
    """Settings of CCA attention: heads, biases, the group size g and the local window s (tokens)."""

    mixer_name: ClassVar[str] = "cca"

    group_size: int = 16
    local_window: int = 1024

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.mixer_name, "group_size", self.group_size, 1)
        check_int(self.mixer_name, "local_window", self.local_window, 1)


class CCAAttention(SoftmaxAttention):
    """Core tokens of far groups + exact local window, one softmax.

    ``state_size(seq_len)`` counts the cores of the complete groups and the window kept for the next query, after
    n = seq_len tokens: 2 * d * (floor(n / g) + n - j(n) * g) with j(n) = max(0, floor((n - s) / g)).
    """

    name = "cca"
    paper = "https://arxiv.org/abs/2412.12465"
    config_class = CCAConfig

    def first_exact(self, n: torch.Tensor) -> torch.Tensor:
        """j(n) * g: the 0-indexed position where the exact window of the n-th token (1-indexed) starts."""
        g, s = self.config.group_size, self.config.local_window
        return torch.div(n - s, g, rounding_mode="floor").clamp_min(0) * g

    def cores(self, q_last: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pool groups: q_last (B, H, G, D) the groups' last queries, k, v (B, H, G, g, D) -> core k, v (B, H, G, D)."""
        w = torch.softmax((k @ q_last[..., None])[..., 0] * self.head_dim ** -0.5, dim=-1)  # (B, H, G, g)
        return (w[..., None] * k).sum(-2), (w[..., None] * v).sum(-2)

    def attend(self, q: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               key_pos: torch.Tensor, ck: torch.Tensor, cv: torch.Tensor) -> torch.Tensor:
        """Queries (B, H, Tq, D) at 0-indexed ``positions`` over exact keys at ``key_pos`` and cores 0 .. G - 1."""
        start = self.first_exact(positions + 1)[:, None]  # (Tq, 1)
        exact = (key_pos[None, :] >= start) & (key_pos[None, :] <= positions[:, None])  # (Tq, n)
        far = torch.arange(ck.shape[2], device=q.device)[None, :] * self.config.group_size < start  # (Tq, G)
        scores = q @ torch.cat([ck, k], dim=2).transpose(-1, -2) * self.head_dim ** -0.5
        return masked_softmax(scores, torch.cat([far, exact], dim=1)) @ torch.cat([cv, v], dim=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, t = self.config.group_size, x.shape[1]
        q, k, v = self.proj.qkv(x)
        full = (t // g) * g
        groups = (t // g, g)
        ck, cv = self.cores(q[:, :, g - 1 : full : g], k[:, :, :full].unflatten(2, groups),
                            v[:, :, :full].unflatten(2, groups))
        positions = torch.arange(t, device=x.device)
        return self.proj.out(self.attend(q, positions, k, v, positions, ck, cv))

    def init_state(self, batch: int) -> State:
        state = super().init_state(batch)  # k, v: the exact window
        state.update(ck=state["k"].clone(), cv=state["k"].clone(), start=0)  # cores; position of window's first key
        return state

    def step(self, x_t: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        g = self.config.group_size
        q, k, v = self.proj.qkv(x_t[:, None])  # (B, H, 1, D)
        state["k"] = torch.cat([state["k"], k], dim=2)
        state["v"] = torch.cat([state["v"], v], dim=2)
        t = state["start"] + state["k"].shape[2] - 1
        if (t + 1) % g == 0:  # t completes a group, which lies inside the window: pool it with t's query
            lo = t + 1 - g - state["start"]
            ck, cv = self.cores(q, state["k"][:, :, None, lo:], state["v"][:, :, None, lo:])
            state["ck"] = torch.cat([state["ck"], ck], dim=2)
            state["cv"] = torch.cat([state["cv"], cv], dim=2)
        positions = torch.tensor([t], device=x_t.device)
        key_pos = torch.arange(state["start"], t + 1, device=x_t.device)
        y = self.attend(q, positions, state["k"], state["v"], key_pos, state["ck"], state["cv"])
        keep = int(self.first_exact(positions + 1)) - state["start"]  # later windows start no earlier
        state["k"], state["v"], state["start"] = state["k"][:, :, keep:], state["v"][:, :, keep:], state["start"] + keep
        return self.proj.out(y)[:, 0], state

    def state_size(self, seq_len: int | None = None) -> int:
        n = self.need_seq_len(seq_len)
        held = n // self.config.group_size + n - int(self.first_exact(torch.tensor(n)))
        return 2 * self.num_heads * self.head_dim * held
