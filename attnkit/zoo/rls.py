"""Recursive least squares memory: the exact ridge-regression solution of test-time regression.

Paper: Wang et al., "Test-time regression: a unifying framework for designing sequence models with associative
memory" (arXiv 2501.12352; no official code).
Idea: the memory is M_t = argmin_M sum_{i<=t} ||v_i - M k_i||^2 + ridge ||M||_F^2 =
V_t^T K_t (K_t^T K_t + ridge I)^-1 and the readout y_t = M_t q_t. Unlike linear attention (which drops the key
covariance inverse) it decorrelates the keys; decode updates P_t = (K_t^T K_t + ridge I)^-1 and M_t by
Sherman-Morrison (rank-one), O(D^2) per token.
Shapes: x (B, T, d); q, k, v (B, H, T, D) with D = d / H; state M (B, H, D, D) (values x keys) and
P (B, H, D, D).
Parallel path: C_t = ridge I + cumsum_{i<=t} k_i k_i^T (B, H, T, D, D), x_t = C_t^-1 q_t by a batched solve,
y_t = sum_{i<=t} (k_i . x_t) v_i; numerically the stable route for training, but O(T D^2) memory and O(T D^3) time: a CPU
MQAR training step at D = 64, T = 32 is about 30x slower than the delta rule's.
Deviation: q and k are L2-normalised by default (the paper's argument for QK-normalisation; it keeps the ridge
comparable across heads); no weighting gamma (every token counts equally, as in plain RLS).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit.zoo.base import Mixer, State, check_bool, check_float, check_int, l2_normalize


@dataclass
class RLSConfig:
    """Settings of the RLS memory: heads, the ridge penalty (> 0 keeps every C_t invertible), QK-normalisation."""

    num_heads: int = 1
    ridge: float = 1.0
    normalize_qk: bool = True

    def __post_init__(self) -> None:
        check_int("rls", "num_heads", self.num_heads, 1)
        check_float("rls", "ridge", self.ridge, 0.0, open_lo=True)
        check_bool("rls", "normalize_qk", self.normalize_qk)


class RLSMemory(Mixer):
    """Ridge-regression memory. ``state_size()`` counts M and the full (symmetric) P: H * (D * D + D * D)."""

    name = "rls"
    paper = "https://arxiv.org/abs/2501.12352"
    config_class = RLSConfig

    def __init__(self, d_model: int, config: RLSConfig | None = None) -> None:
        super().__init__(d_model, config)
        self.proj = self.multi_head(self.config.num_heads)

    def normalized(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.config.normalize_qk:
            return q, k
        return l2_normalize(q, 1e-6), l2_normalize(k, 1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.proj.qkv(x)  # (B, H, T, D)
        q, k = self.normalized(q, k)
        eye = torch.eye(self.head_dim, dtype=x.dtype, device=x.device)
        cov = torch.cumsum(k[..., :, None] * k[..., None, :], dim=2) + self.config.ridge * eye  # (B, H, T, D, D)
        solved = torch.linalg.solve(cov, q[..., None])[..., 0]  # (B, H, T, D): C_t^-1 q_t
        y = (solved @ k.transpose(-1, -2)).tril() @ v  # y_t = sum_{i<=t} (x_t . k_i) v_i
        return self.proj.out(y)

    def init_state(self, batch: int) -> State:
        h, d, fac = self.num_heads, self.head_dim, self.factory()
        p = torch.eye(d, **fac).expand(batch, h, d, d) / self.config.ridge  # P_0 = I / ridge
        return {"M": torch.zeros(batch, h, d, d, **fac), "P": p.clone()}

    def step(self, x_t: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        q, k, v = self.proj.qkv_step(x_t)  # (B, H, D)
        q, k = self.normalized(q, k)
        m, p = state["M"], state["P"]
        pk = (p @ k[..., None])[..., 0]  # (B, H, D): P_{t-1} k_t
        gain = pk / (1.0 + (k * pk).sum(-1, keepdim=True))  # = P_t k_t
        p -= gain[..., :, None] * pk[..., None, :]  # Sherman-Morrison: P_t = P_{t-1} - gain (P_{t-1} k)^T
        m += (v - (m @ k[..., None])[..., 0])[..., :, None] * gain[..., None, :]  # M_t = M_{t-1} + err gain^T
        return self.proj.out_step((m @ q[..., None])[..., 0]), state

    def state_size(self, seq_len: int | None = None) -> int:
        return self.num_heads * 2 * self.head_dim * self.head_dim
