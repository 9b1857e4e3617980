"""Deconstructed attention: the controlled variants that each relax one design principle of softmax attention.

Paper: Xue, Moosavi, Aletras, "Deconstructing Attention: Investigating Design Principles for Effective Language
Modeling" (arXiv 2510.11602; no code released). Section numbers below are the paper's.
Idea: standard attention mixes tokens, with weights that depend on the input sequence, through dot products and a
softmax, from queries and keys of the current hidden states; each variant drops one of these. Dropping mixing
collapses a model; the others work surprisingly well, above all interleaved with standard layers (build such
hybrids with the LM's per-layer ``mixers`` list, e.g. ["deconstructed", "softmax"]).
Variants (``variant``), with v = W_V x from the current hidden states and D = d / H:
- ``no_mixing`` (3.2, "MLP"): no token mixing at all, a gated MLP W_dn(SiLU(W_gt x) * W_up x) with hidden width
  round(4d / 3) by default, so its 3 d m weights match attention's 4 d^2 (the paper matches parameter counts).
  State: none.
- ``fixed_mixing`` (3.4, "RndEmbQK"): queries and keys from fixed random embeddings e ~ N(0, embed_std^2)
  (a buffer, max_len x d, never trained), q_t = W_Q e_t, k_j = W_K e_j, y_t = sum_{j<=t} softmax_j(q_t.k_j /
  sqrt D) v_j: a sequence-independent causal mixing matrix over positions, row-normalised by the softmax and
  learned through W_Q, W_K only (parameter count independent of max_len, as in the paper). The paper passes e
  through the transformer stack below the layer; here e enters W_Q, W_K directly. State: the values (d * n).
- ``non_softmax`` (3.3, "Approximate"): the softmax replaced by its normalised 2nd-order Taylor kernel,
  y_t = sum_{j<=t} K(q_t, k_j) v_j / (sum_{j<=t} K(q_t, k_j) + eps), K = 1 + s + s^2 / 2 with s = q.k / sqrt D
  (always >= 1/2), decoded as linear attention with BASED's Taylor feature map (feature dimension = D). State: H D F
  + H F with F = 1 + D + D(D+1)/2.
- ``non_approximate`` (3.3, "Non-approximate"): no pairwise similarity; each key position j gets the scalar
  s_j = sum_c (SiLU(W_Q x_j) * W_K x_j)_c / sqrt D from its own token and y_t = sum_{j<=t} e^{s_j} v_j /
  sum_{j<=t} e^{s_j} (the paper's recurrent form, Appx. I). State: numerator, denominator and running maximum,
  H D + 2 H (the paper's cache of d + 2h numbers).
- ``decoupled_qk`` (3.5, "StaticEmbQK"): queries and keys from static embeddings instead of the current hidden
  states, causal softmax attention with v from the hidden states. The paper uses the input token embeddings
  Emb(t); a mixer sees only hidden states, so by default the static source is a learned position embedding
  (max_len x d) and the attention map is sequence-independent; pass ``qk_input`` (B, T, d) to ``forward`` (and its
  row to ``step``), e.g. the LM's token embeddings, for the paper's sequence-dependent form. State: keys and values
  (2 d n).
Shapes: x (B, T, d); q, k, v (B, H, T, D).
Deviations beyond those named: plain multi-head attention with biased projections (Qwen2.5 base in the paper, with
RoPE; none here); FixedSeqQK (keys from a fixed natural-text sequence) is not built: it is RndEmbQK with another
fixed input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from attnkit.zoo.base import Mixer, State, check_bool, check_choice, check_float, check_int, masked_softmax, split_heads
from attnkit.zoo.based import TaylorFeatureMap, taylor_dim
from attnkit.zoo.linear_attention import causal_linear_attention, empty_linear_state, linear_attention_step

VARIANTS = ("no_mixing", "fixed_mixing", "non_softmax", "non_approximate", "decoupled_qk")


@dataclass
class DeconstructedConfig:
    """Settings of the deconstructed-attention variants: which principle to relax, heads, biases, the longest
    sequence (fixed / position embeddings), the MLP width (0: round(4d/3)), the fixed embeddings' scale and the
    Taylor kernel's eps."""

    mixer_name: ClassVar[str] = "deconstructed"

    variant: str = "fixed_mixing"
    num_heads: int = 1
    bias: bool = True
    max_len: int = 2048
    mlp_hidden: int = 0
    embed_std: float = 1.0
    eps: float = 1e-12

    def __post_init__(self) -> None:
        name = self.mixer_name
        check_choice(name, "variant", self.variant, VARIANTS)
        check_int(name, "num_heads", self.num_heads, 1)
        check_bool(name, "bias", self.bias)
        check_int(name, "max_len", self.max_len, 1)
        check_int(name, "mlp_hidden", self.mlp_hidden, 0)
        check_float(name, "embed_std", self.embed_std, 0.0, open_lo=True)
        check_float(name, "eps", self.eps, 0.0, 1.0, open_lo=True)


class DeconstructedAttention(Mixer):
    """One relaxed-attention variant (see the module docstring); ``state_size`` per variant: no_mixing 0,
    fixed_mixing d * seq_len, non_softmax H D F + H F, non_approximate H D + 2 H, decoupled_qk 2 d * seq_len."""

    name = "deconstructed"
    paper = "https://arxiv.org/abs/2510.11602"
    config_class = DeconstructedConfig

    def __init__(self, d_model: int, config: DeconstructedConfig | None = None) -> None:
        super().__init__(d_model, config)
        cfg = self.config
        self.variant = cfg.variant
        self.num_heads = cfg.num_heads
        self.head_dim = self.per_head(cfg.num_heads)
        if self.variant == "no_mixing":
            hidden = cfg.mlp_hidden or max(1, round(4 * d_model / 3))
            self.gate = nn.Linear(d_model, hidden, bias=cfg.bias)
            self.up = nn.Linear(d_model, hidden, bias=cfg.bias)
            self.down = nn.Linear(hidden, d_model, bias=cfg.bias)
            return
        self.proj = self.multi_head(cfg.num_heads, bias=cfg.bias)
        if self.variant == "fixed_mixing":
            noise = torch.randn(cfg.max_len, d_model, generator=torch.Generator().manual_seed(0))
            self.register_buffer("fixed", cfg.embed_std * noise)  # saved with the weights: the map is reproducible
        elif self.variant == "decoupled_qk":
            self.positions = nn.Embedding(cfg.max_len, d_model)
        elif self.variant == "non_softmax":
            self.phi = TaylorFeatureMap(self.head_dim)

    # ---- helpers ----

    def static(self, start: int, length: int, device: torch.device) -> torch.Tensor:
        """(length, d): the fixed or learned position embeddings of positions start .. start + length - 1."""
        end = start + length
        if end > self.config.max_len:
            raise ValueError(f"deconstructed: position {end - 1} is beyond max_len={self.config.max_len}")
        table = self.fixed if self.variant == "fixed_mixing" else self.positions.weight
        return table[start:end]

    def static_qk(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(..., T, d) static rows -> q, k (..., H, T, D) (a batch dim of 1 when ``source`` has none)."""
        source = source if source.dim() == 3 else source[None]
        return split_heads(self.proj.q(source), self.num_heads), split_heads(self.proj.k(source), self.num_heads)

    def position_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """non_approximate: (B, T, d) -> s_j (B, H, T) and v (B, H, T, D)."""
        q = F.silu(split_heads(self.proj.q(x), self.num_heads))
        k, v = split_heads(self.proj.k(x), self.num_heads), split_heads(self.proj.v(x), self.num_heads)
        return (q * k).sum(-1) * self.head_dim ** -0.5, v

    # ---- parallel path ----

    def forward(self, x: torch.Tensor, qk_input: torch.Tensor | None = None) -> torch.Tensor:
        if self.variant == "no_mixing":
            return self.down(F.silu(self.gate(x)) * self.up(x))
        t = x.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        if self.variant == "non_approximate":
            s, v = self.position_scores(x)
            return self.proj.out(masked_softmax(s[..., None, :], causal) @ v)  # row t: keys j <= t
        if self.variant == "non_softmax":
            q, k, v = self.proj.qkv(x)
            return self.proj.out(causal_linear_attention(self.phi(q), self.phi(k), v, self.config.eps))
        v = split_heads(self.proj.v(x), self.num_heads)
        q, k = self.static_qk(qk_input if qk_input is not None else self.static(0, t, x.device))
        y = F.scaled_dot_product_attention(q.expand_as(v), k.expand_as(v), v, attn_mask=causal)
        return self.proj.out(y)

    # ---- decode path ----

    def init_state(self, batch: int) -> State:
        h, d, fac = self.num_heads, self.head_dim, self.factory()
        if self.variant == "no_mixing":
            return {}
        if self.variant == "non_softmax":
            return empty_linear_state(batch, h, taylor_dim(d), d, fac)
        if self.variant == "non_approximate":
            return {"num": torch.zeros(batch, h, d, **fac), "den": torch.zeros(batch, h, **fac),
                    "max": torch.full((batch, h), float("-inf"), **fac)}
        empty = torch.zeros(batch, h, 0, d, **fac)
        return {"v": empty} if self.variant == "fixed_mixing" else {"k": empty, "v": empty.clone()}

    def step(self, x_t: torch.Tensor, state: State, qk_input: torch.Tensor | None = None) -> tuple[torch.Tensor, State]:
        if self.variant == "no_mixing":
            return self.forward(x_t), state
        if self.variant == "non_softmax":
            q, k, v = self.proj.qkv_step(x_t)
            return self.proj.out_step(linear_attention_step(self.phi(q), self.phi(k), v, state, self.config.eps)), state
        if self.variant == "non_approximate":
            s, v = (t[:, :, 0] for t in self.position_scores(x_t[:, None]))  # (B, H), (B, H, D)
            peak = torch.maximum(state["max"], s)
            old, new = torch.exp(state["max"] - peak), torch.exp(s - peak)  # exp(-inf) = 0 at the first token
            state["num"] = state["num"] * old[..., None] + new[..., None] * v
            state["den"] = state["den"] * old + new
            state["max"] = peak
            return self.proj.out_step(state["num"] / state["den"][..., None]), state
        v = split_heads(self.proj.v(x_t[:, None]), self.num_heads)  # (B, H, 1, D)
        state["v"] = torch.cat([state["v"], v], dim=2)
        n = state["v"].shape[2]
        if self.variant == "fixed_mixing":  # keys of every position so far come from the fixed embeddings
            q, k = self.static_qk(self.static(0, n, x_t.device))
            q = q[:, :, -1:]
        else:
            source = qk_input[:, None] if qk_input is not None else self.static(n - 1, 1, x_t.device)
            q, k = self.static_qk(source)
            state["k"] = torch.cat([state["k"], k.expand_as(v)], dim=2)
            k = state["k"]
        y = F.scaled_dot_product_attention(q.expand_as(v), k.expand_as(state["v"]), state["v"])
        return self.proj.out(y)[:, 0], state

    def state_size(self, seq_len: int | None = None) -> int:
        h, d = self.num_heads, self.head_dim
        if self.variant == "no_mixing":
            return 0
        if self.variant == "non_softmax":
            return h * d * taylor_dim(d) + h * taylor_dim(d)
        if self.variant == "non_approximate":
            return h * d + 2 * h
        per_token = h * d if self.variant == "fixed_mixing" else 2 * h * d
        return per_token * self.need_seq_len(seq_len)
