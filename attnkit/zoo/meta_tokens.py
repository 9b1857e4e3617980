"""Learned meta-tokens: causal softmax attention that also reads M learned memory tokens.

Paper: Shah, Gupta, Ramji, Chaudhari, "Language Modeling with Learned Meta-Tokens" (arXiv 2509.16278, ICLR 2026;
code not released at the time of writing).
Idea: learned tokens give attention content-based anchors; a sparse meta-attention lets the meta tokens attend only
among themselves, beside ordinary causal attention, so they can cache and point to context.
In the paper, one special meta token (a vocabulary entry with a learned embedding) is injected uniformly at random
into the pre-training stream, M = 0.1 * block length copies per sequence, with no loss at those positions; every
layer runs causal multi-head attention and then a meta-attention layer softmax(QK^T / sqrt d + M_causal + P) V,
where P is 0 where query and key are both meta tokens and -inf elsewhere.
As a mixer (the input is (B, T, d) with no room for extra tokens): the layer owns M learned meta-token states
m_1..m_M (``num_meta``), prepended before position 0 of every sequence. With ``meta_attention`` they first run the
paper's meta-attention among themselves (meta token i reads meta tokens <= i through a meta-attention layer with
its own q, k, v, o projections, followed by a LayerNorm as in the paper's block: m <- LN(m + o_meta(attention)));
their keys and values W_K m, W_V m then sit in front of the causal keys, so
every query attends to [all M meta tokens, its causal past] under one softmax.
Shapes: x (B, T, d); meta (M, d); q (B, H, T, D); keys and values (B, H, M + T, D); decode cache (B, H, M + n, D).
Simplifications, plainly: (1) the meta tokens are per-layer learned prefixes (Memory-Transformer style), not tokens
injected at random positions of the stream; they therefore cannot cache the context that precedes them, which is
the paper's main mechanism (it needs the tokens inside the sequence, across layers); (2) being input-independent,
the meta-attention among them is a fixed function of the weights, a reparametrisation of learned keys and values
that adds no expressivity within one layer; (3) M distinct learned tokens instead of one repeated embedding; (4)
no positional encoding at the meta tokens (the paper finds zeroing it there as good or better). Without the
LayerNorm the meta-attention residual grew under Adam (meta keys / values of norm ~1e3 within 100 MQAR steps, d 64)
until the meta tokens took all the attention and MQAR stayed at chance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from attnkit.zoo.base import Projections, State, check_bool, check_int, split_heads
from attnkit.zoo.softmax import SoftmaxAttention, SoftmaxConfig


@dataclass
class MetaTokensConfig(SoftmaxConfig):
    """Settings of meta-token attention: heads, biases, the number of learned meta tokens and whether they run
    the paper's meta-attention among themselves first."""

    mixer_name: ClassVar[str] = "meta_tokens"

    num_meta: int = 16
    meta_attention: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.mixer_name, "num_meta", self.num_meta, 1)
        check_bool(self.mixer_name, "meta_attention", self.meta_attention)


class MetaTokenAttention(SoftmaxAttention):
    """Causal softmax attention over [M meta tokens, causal past].

    ``state_size(seq_len)`` counts the cache with the meta tokens' keys and values in front: 2 * d * (M + seq_len).
    """

    name = "meta_tokens"
    paper = "https://arxiv.org/abs/2509.16278"
    config_class = MetaTokensConfig

    def __init__(self, d_model: int, config: MetaTokensConfig | None = None) -> None:
        super().__init__(d_model, config)
        self.meta = nn.Parameter(torch.randn(self.config.num_meta, d_model))  # unit scale, like normed inputs
        cfg = self.config
        if cfg.meta_attention:  # the paper's meta-attention layer: its own q, k, v, o and the LayerNorm after it
            self.meta_proj = Projections(d_model, cfg.num_heads, self.head_dim, self.head_dim, cfg.bias)
            self.meta_norm = nn.LayerNorm(d_model)

    def meta_states(self) -> torch.Tensor:
        """(M, d): the meta tokens after the meta-attention among themselves (causal over meta index)."""
        m = self.meta
        if not self.config.meta_attention:
            return m
        q, k, v = self.meta_proj.qkv(m[None])  # (1, H, M, D)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.allowed(m.shape[0], m.device))
        return self.meta_norm(m + self.meta_proj.out(y)[0])

    def meta_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The meta tokens' keys and values, (1, H, M, D) each."""
        m = self.meta_states()[None]
        return split_heads(self.proj.k(m), self.num_heads), split_heads(self.proj.v(m), self.num_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.proj.qkv(x)  # (B, H, T, D)
        mk, mv = self.meta_kv()
        keys = torch.cat([mk.expand(b, -1, -1, -1), k], dim=2)  # (B, H, M + T, D)
        values = torch.cat([mv.expand(b, -1, -1, -1), v], dim=2)
        meta_cols = torch.ones(t, self.config.num_meta, dtype=torch.bool, device=x.device)
        allowed = torch.cat([meta_cols, self.allowed(t, x.device)], dim=1)  # (T, M + T)
        return self.proj.out(F.scaled_dot_product_attention(q, keys, values, attn_mask=allowed))

    def init_state(self, batch: int) -> State:
        mk, mv = self.meta_kv()
        # the cache starts with the meta tokens; ``step`` (inherited) appends and attends to every cached key
        return {"k": mk.detach().expand(batch, -1, -1, -1).clone(), "v": mv.detach().expand(batch, -1, -1, -1).clone()}

    def state_size(self, seq_len: int | None = None) -> int:
        return 2 * self.num_heads * self.head_dim * (self.config.num_meta + self.need_seq_len(seq_len))
