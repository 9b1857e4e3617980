"""BASED: linear attention with a 2nd-order Taylor feature map, behind a gated short convolution.

Paper: Arora et al., "Simple linear attention language models balance the recall-throughput tradeoff"
(arXiv 2402.18668; HazyResearch/based, zoology ``mixers/based.py``).
Idea: phi(x) = [1, x / f^(1/4), vec(x x^T) / (sqrt2 * sqrt f)] on a small projected feature dim f, so that
phi(q).phi(k) = 1 + s + s^2 / 2 with s = q.k / sqrt f (the Taylor expansion of exp(s), always > 0); global causal
linear attention with that map recalls at a state set by f, not by the sequence.
Shapes: x (B, T, d); q, k (B, H, T, f); v (B, H, T, D) with D = d / H; phi(q), phi(k) (B, H, T, F) with
F = 1 + f + f(f+1)/2; state S (B, H, F, D), z (B, H, F), and the convolution's buffer (B, K - 1, d).
Deviations:
- vec(x x^T) keeps the f(f+1)/2 unique entries of the symmetric outer product (off-diagonal ones scaled by
  sqrt2 so the dot product is unchanged); Zoology's parallel map keeps all f^2, the state is smaller here.
- In BASED the gated short convolution (BaseConv) and the sliding-window softmax are separate layers of a hybrid.
  Here ``based`` runs a BaseConv (``conv_kernel`` taps, 0 = none) in front of the linear attention, inside one
  mixer. The layouts of the papers are assembled in :class:`attnkit.zoo.lm.TinyLM` through its per-layer
  ``mixers`` list: Zoology's MQAR Based model is ``["base_conv", "based"]`` with ``conv_kernel=0`` and no MLP;
  the BASED language model interleaves ``base_conv``, ``based`` and ``sliding_window`` (window 64) layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from attnkit.zoo.base import Mixer, State, check_float, check_int
from attnkit.zoo.base_conv import BaseConv, BaseConvConfig
from attnkit.zoo.linear_attention import causal_linear_attention, empty_linear_state, linear_attention_step


def taylor_dim(feature_dim: int) -> int:
    """F = 1 + f + f(f+1)/2, the width of the Taylor feature map with unique 2nd-order entries."""
    return 1 + feature_dim + feature_dim * (feature_dim + 1) // 2


class TaylorFeatureMap(torch.nn.Module):
    """phi(x) (..., f) -> (..., F) with phi(q).phi(k) = 1 + q.k / sqrt f + (q.k)^2 / (2 f)."""

    def __init__(self, feature_dim: int) -> None:
        super().__init__()
        rows, cols = torch.triu_indices(feature_dim, feature_dim)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.register_buffer("diagonal", rows == cols, persistent=False)
        self.first = feature_dim ** -0.25
        # x_i x_j / sqrt f for i < j (it stands for both (i, j) and (j, i)), x_i^2 / (sqrt2 sqrt f) on the diagonal;
        # Python floats, so the scales are exact in the input's dtype
        self.off_scale = 1.0 / math.sqrt(feature_dim)
        self.diag_scale = self.off_scale / math.sqrt(2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # index_select, not x[..., rows]: advanced indexing's backward is a sort-based index_put that took 42% of a
        # BASED training step on an H100 (zooprofile, nineteenth session); index_select's is an index_add
        pairs = x.index_select(-1, self.rows) * x.index_select(-1, self.cols)  # (..., f(f+1)/2)
        second = torch.where(self.diagonal, pairs * self.diag_scale, pairs * self.off_scale)
        return torch.cat([torch.ones_like(x[..., :1]), x * self.first, second], dim=-1)


@dataclass
class BasedConfig:
    """Settings of BASED (Zoology's MQAR runs: feature_dim 8-24, one head; eps as in its code)."""

    feature_dim: int = 16
    num_heads: int = 1
    conv_kernel: int = 3
    eps: float = 1e-12

    def __post_init__(self) -> None:
        check_int("based", "feature_dim", self.feature_dim, 1)
        check_int("based", "num_heads", self.num_heads, 1)
        check_int("based", "conv_kernel", self.conv_kernel, 0)
        check_float("based", "eps", self.eps, 0.0, 1.0, open_lo=True)


class Based(Mixer):
    """BaseConv (optional) then Taylor linear attention.

    ``state_size()`` = H * D * F + H * F (the spec's kv_heads * head_dim * (1 + f + f(f+1)/2) +
    kv_heads * (1 + f + f(f+1)/2), unique 2nd-order entries) + d * (conv_kernel - 1) for the convolution's
    buffer when ``conv_kernel`` > 0.
    """

    name = "based"
    paper = "https://arxiv.org/abs/2402.18668"
    config_class = BasedConfig

    def __init__(self, d_model: int, config: BasedConfig | None = None) -> None:
        super().__init__(d_model, config)
        cfg = self.config
        self.conv = BaseConv(d_model, BaseConvConfig(cfg.conv_kernel)) if cfg.conv_kernel else None
        self.proj = self.multi_head(cfg.num_heads, qk_dim=cfg.feature_dim)
        self.phi = TaylorFeatureMap(cfg.feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x) if self.conv is not None else x
        q, k, v = self.proj.qkv(h)  # q, k (B, H, T, f); v (B, H, T, D)
        return self.proj.out(causal_linear_attention(self.phi(q), self.phi(k), v, self.config.eps))

    def init_state(self, batch: int) -> State:
        f = taylor_dim(self.config.feature_dim)
        state = empty_linear_state(batch, self.num_heads, f, self.head_dim, self.factory())
        if self.conv is not None:
            state["conv"] = self.conv.init_state(batch)
        return state

    def step(self, x_t: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        h = self.conv.step(x_t, state["conv"])[0] if self.conv is not None else x_t
        q, k, v = self.proj.qkv_step(h)  # q, k (B, H, f); v (B, H, D)
        y = linear_attention_step(self.phi(q), self.phi(k), v, state, self.config.eps)
        return self.proj.out_step(y), state

    def state_size(self, seq_len: int | None = None) -> int:
        f = taylor_dim(self.config.feature_dim)
        conv = self.conv.state_size() if self.conv is not None else 0
        return self.num_heads * self.head_dim * f + self.num_heads * f + conv
