"""DeltaNet: a fast-weight memory written by the delta rule, with a parallel (UT-transform) path.

Paper: Yang et al., "Parallelizing Linear Transformers with the Delta Rule over Sequence Length"
(arXiv 2406.06484); the rule from Schlag et al., "Linear Transformers Are Secretly Fast Weight Programmers"
(arXiv 2102.11174).
Idea: S_t = S_{t-1} + beta_t (v_t - S_{t-1} k_t) k_t^T, y_t = S_t q_t: each token corrects what the memory
returns for its key instead of only adding to it (one SGD step on ||v - S k||^2 with step size beta_t).
Shapes: x (B, T, d); q, k, v (B, H, T, D) with D = d / H, q and k L2-normalised; beta (B, H, T) from a sigmoid
projection; state S (B, H, D, D) (values x keys).
Parallel path: writing S_t = sum_{i<=t} u_i k_i^T, the pseudo-values solve the unit lower-triangular system
u_t + beta_t sum_{i<t} (k_t.k_i) u_i = beta_t v_t (one triangular solve over the whole sequence, the UT transform
of the paper with a single chunk), then y = (Q K^T masked causally) U. O(T^2) per head; exact.
Deviation: no short convolutions, q/k activation or output norm of the DeltaNet layer; plain L2-normalised q, k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from attnkit.zoo.base import Mixer, State, check_float, check_int, l2_normalize


@dataclass
class DeltaRuleConfig:
    """Settings of the delta rule: heads and the floor of the q/k norms."""

    num_heads: int = 1
    norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        check_int("delta_rule", "num_heads", self.num_heads, 1)
        check_float("delta_rule", "norm_eps", self.norm_eps, 0.0, 1.0, open_lo=True)


class DeltaRule(Mixer):
    """Delta-rule fast-weight memory. ``state_size()`` counts S: H * D * D (D = d / H)."""

    name = "delta_rule"
    paper = "https://arxiv.org/abs/2406.06484"
    config_class = DeltaRuleConfig

    def __init__(self, d_model: int, config: DeltaRuleConfig | None = None) -> None:
        super().__init__(d_model, config)
        self.proj = self.multi_head(self.config.num_heads)
        self.beta = nn.Linear(d_model, self.num_heads, bias=False)

    def inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, d) -> q, k (normalised), v (B, H, T, D) and beta (B, H, T)."""
        q, k, v = self.proj.qkv(x)
        eps = self.config.norm_eps
        return l2_normalize(q, eps), l2_normalize(k, eps), v, torch.sigmoid(self.beta(x)).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v, beta = self.inputs(x)
        t = x.shape[1]
        eye = torch.eye(t, dtype=x.dtype, device=x.device)
        lower = (beta[..., None] * (k @ k.transpose(-1, -2))).tril(-1)  # (B, H, T, T): beta_t k_t.k_i, i < t
        u = torch.linalg.solve_triangular(eye + lower, beta[..., None] * v, upper=False, unitriangular=True)
        y = (q @ k.transpose(-1, -2)).tril() @ u  # (B, H, T, D): y_t = sum_{i<=t} (q_t.k_i) u_i
        return self.proj.out(y)

    def init_state(self, batch: int) -> State:
        return {"S": torch.zeros(batch, self.num_heads, self.head_dim, self.head_dim, **self.factory())}

    def step(self, x_t: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        q, k, v, beta = (t[:, :, 0] for t in self.inputs(x_t[:, None]))  # (B, H, D); beta (B, H)
        s = state["S"]  # (B, H, D, D)
        error = v - (s @ k[..., None])[..., 0]  # what the memory misses for k_t
        s += beta[..., None, None] * error[..., :, None] * k[..., None, :]
        return self.proj.out_step((s @ q[..., None])[..., 0]), state

    def state_size(self, seq_len: int | None = None) -> int:
        return self.num_heads * self.head_dim * self.head_dim
