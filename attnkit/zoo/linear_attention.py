"""Causal linear attention with a positive feature map, decoded as a recurrence.

Paper: Katharopoulos et al., "Transformers are RNNs" (arXiv 2006.16236).
Idea: replace exp(q.k) by phi(q).phi(k), so y_t = phi(q_t)^T S_t / (phi(q_t)^T z_t + eps) with
S_t = sum_{i<=t} phi(k_i) v_i^T and z_t = sum_{i<=t} phi(k_i): a fixed-size state, exact in the chosen kernel.
Shapes: x (B, T, d); phi(q), phi(k) (B, H, T, F) with F = D for elementwise maps; v (B, H, T, D);
state S (B, H, F, D), z (B, H, F).
Deviation: the parallel path is the masked quadratic form (A = phi(Q) phi(K)^T, O(T^2 F)), not a chunked scan;
it uses O(T^2) memory per head instead of O(T F D) and is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from attnkit.zoo.base import Mixer, State, check_choice, check_float, check_int

FEATURE_MAPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "elu": lambda x: F.elu(x) + 1.0,  # the paper's map: positive, so the normaliser never vanishes
    "relu": F.relu,
}


def causal_linear_attention(fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    """Parallel (quadratic) causal linear attention.

    Parameters
    ----------
    fq, fk : (B, H, T, F) feature-mapped queries and keys.
    v : (B, H, T, Dv) values.
    eps : added to the normaliser.

    Returns
    -------
    (B, H, T, Dv): sum_{i<=t} (fq_t . fk_i) v_i / (sum_{i<=t} fq_t . fk_i + eps).
    """
    t = fq.shape[2]
    causal = torch.ones(t, t, dtype=torch.bool, device=fq.device).tril()
    scores = (fq @ fk.transpose(-1, -2)).masked_fill(~causal, 0.0)  # (B, H, T, T)
    return (scores @ v) / (scores.sum(-1, keepdim=True) + eps)


def empty_linear_state(batch: int, heads: int, features: int, v_dim: int, factory: dict) -> State:
    """S (B, H, F, Dv) and z (B, H, F), zero."""
    return {
        "S": torch.zeros(batch, heads, features, v_dim, **factory),
        "z": torch.zeros(batch, heads, features, **factory),
    }


def linear_attention_step(
    fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, state: State, eps: float
) -> torch.Tensor:
    """One recurrent step: fq, fk (B, H, F), v (B, H, Dv); updates S and z in place; returns (B, H, Dv)."""
    state["S"] += fk[..., :, None] * v[..., None, :]  # (B, H, F, Dv): add phi(k_t) v_t^T
    state["z"] += fk
    num = (fq[..., None, :] @ state["S"])[..., 0, :]  # (B, H, Dv)
    return num / ((fq * state["z"]).sum(-1, keepdim=True) + eps)


@dataclass
class LinearAttentionConfig:
    """Settings of linear attention: heads, the feature map (``elu`` = elu + 1, the paper's) and eps."""

    num_heads: int = 1
    feature_map: str = "elu"
    eps: float = 1e-6

    def __post_init__(self) -> None:
        check_int("linear_attention", "num_heads", self.num_heads, 1)
        check_choice("linear_attention", "feature_map", self.feature_map, tuple(FEATURE_MAPS))
        check_float("linear_attention", "eps", self.eps, 0.0, 1.0, open_lo=True)


class LinearAttention(Mixer):
    """Linear attention with an elementwise feature map.

    ``state_size()`` counts S and z: H * D * D + H * D (D = d / H; elementwise maps keep F = D).
    """

    name = "linear_attention"
    paper = "https://arxiv.org/abs/2006.16236"
    config_class = LinearAttentionConfig

    def __init__(self, d_model: int, config: LinearAttentionConfig | None = None) -> None:
        super().__init__(d_model, config)
        self.proj = self.multi_head(self.config.num_heads)
        self.phi = FEATURE_MAPS[self.config.feature_map]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.proj.qkv(x)  # (B, H, T, D)
        return self.proj.out(causal_linear_attention(self.phi(q), self.phi(k), v, self.config.eps))

    def init_state(self, batch: int) -> State:
        return empty_linear_state(batch, self.num_heads, self.head_dim, self.head_dim, self.factory())

    def step(self, x_t: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        q, k, v = self.proj.qkv_step(x_t)  # (B, H, D)
        y = linear_attention_step(self.phi(q), self.phi(k), v, state, self.config.eps)
        return self.proj.out_step(y), state

    def state_size(self, seq_len: int | None = None) -> int:
        h, d = self.num_heads, self.head_dim
        return h * d * d + h * d
