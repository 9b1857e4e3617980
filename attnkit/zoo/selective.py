"""Selective Self-Attention (SSA): causal softmax attention with a position- (and query-) dependent temperature.

Paper: Zhang, Chang, Li, Roy-Chowdhury, Chen, Oymak, "Selective Attention: Enhancing Transformer through Principled
Context Control" (arXiv 2411.12892, NeurIPS 2024; code umich-sota/selective_attention, lit_gpt/
model_finetune_att.py, model_finetune_att_no_func.py, gpt_2_PTS.py).
Idea: multiply the logits of the query at position n (1-indexed) by an inverse temperature that grows like log n,
so attention does not flatten as the context grows; the paper adds a learned query-dependent term, so that
similar queries can still ask for different sparsity.
Shapes: x (B, T, d); q, k, v (B, H, T, D) with D = d / H; tau (B, H, T, 1) scales q (the same as scaling the logits
q.k / sqrt D); cache k, v (B, H, n, D) after n tokens.

Temperature, ``form="code"`` (what the official code runs): tau_n = 1 + exp(-exp(beta)) log n with one learnable
scalar beta per layer, shared by all heads (``position="func"``, init 2.0 as in model_finetune_att.py; the GPT-2
pretraining file uses 1.5), or tau_n = 1 + beta log n (``position="no_func"``, init 1e-5 as in
model_finetune_att_no_func.py). The code applies tau to every logit of the row, before the causal mask.
``form="paper"`` adds the token-aware term: tau_n(q) = position term + tanh(u_h . gelu(q_h)), one vector u_h of D
numbers per head applied to the head's own query (weight sharing with W_q: D extra numbers per head), u = 0 at
init so the paper form starts equal to the code form. The paper's exact token function was not readable here;
this additive tanh(u . gelu(q)) form follows an unofficial reimplementation (Modified_Selective_Attention) and is
our choice. ``value_temperature`` (off by default) scales each value by 1 + tanh(w_h . gelu(v_h)) (w = 0 at init),
our reading of the paper's value temperature for suppressing noisy tokens.
Deviations: the code's KV-cache path indexes log n by the row within the current chunk (log 1 = 0 for every
decoded token); here decode uses the token's absolute position n, so decoding reproduces the parallel forward. No
RoPE inside the mixer (the LM may add learned positions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from attnkit.zoo.base import State, check_bool, check_choice, check_float
from attnkit.zoo.softmax import SoftmaxAttention, SoftmaxConfig

BETA_INIT = {"func": 2.0, "no_func": 1e-5}  # model_finetune_att.py, model_finetune_att_no_func.py


@dataclass
class SelectiveConfig(SoftmaxConfig):
    """Settings of selective attention: heads, biases, the form (``code``: position only; ``paper``: + query
    term), the position function, beta's initial value (None: the code's, per function) and value temperatures."""

    mixer_name: ClassVar[str] = "selective"

    form: str = "code"
    position: str = "func"
    beta_init: float | None = None
    value_temperature: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice(self.mixer_name, "form", self.form, ("code", "paper"))
        check_choice(self.mixer_name, "position", self.position, tuple(BETA_INIT))
        if self.beta_init is not None:
            check_float(self.mixer_name, "beta_init", self.beta_init, -100.0, 100.0)
        check_bool(self.mixer_name, "value_temperature", self.value_temperature)


class SelectiveAttention(SoftmaxAttention):
    """Softmax attention with the SSA temperature. ``state_size(seq_len)`` counts the KV cache: 2 * d * seq_len
    (beta and the token vectors are weights, the position is an integer)."""

    name = "selective"
    paper = "https://arxiv.org/abs/2411.12892"
    config_class = SelectiveConfig

    def __init__(self, d_model: int, config: SelectiveConfig | None = None) -> None:
        super().__init__(d_model, config)
        cfg = self.config
        init = BETA_INIT[cfg.position] if cfg.beta_init is None else cfg.beta_init
        self.beta = nn.Parameter(torch.tensor(float(init)))
        self.query_token = nn.Parameter(torch.zeros(self.num_heads, self.head_dim)) if cfg.form == "paper" else None
        self.value_token = nn.Parameter(torch.zeros(self.num_heads, self.head_dim)) if cfg.value_temperature else None

    def position_term(self, n: torch.Tensor) -> torch.Tensor:
        """tau_pos at 1-indexed positions n (T,) -> (T,)."""
        slope = torch.exp(-torch.exp(self.beta)) if self.config.position == "func" else self.beta
        return 1.0 + slope * torch.log(n)

    def scaled(self, q: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """q, v (B, H, T, D) at positions start + 1 .. start + T -> q * tau and v * value temperature."""
        n = torch.arange(start + 1, start + q.shape[2] + 1, device=q.device, dtype=q.dtype)
        tau = self.position_term(n)[:, None]  # (T, 1)
        if self.query_token is not None:
            tau = tau + torch.tanh((F.gelu(q) * self.query_token[:, None]).sum(-1, keepdim=True))  # (B, H, T, 1)
        if self.value_token is not None:
            v = v * (1.0 + torch.tanh((F.gelu(v) * self.value_token[:, None]).sum(-1, keepdim=True)))
        return q * tau, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.proj.qkv(x)  # (B, H, T, D)
        q, v = self.scaled(q, v, 0)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.allowed(x.shape[1], x.device))
        return self.proj.out(y)

    def step(self, x_t: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        q, k, v = self.proj.qkv(x_t[:, None])  # (B, H, 1, D)
        q, v = self.scaled(q, v, state["k"].shape[2])
        state["k"] = torch.cat([state["k"], k], dim=2)
        state["v"] = torch.cat([state["v"], v], dim=2)
        y = F.scaled_dot_product_attention(q, state["k"], state["v"])
        return self.proj.out(y)[:, 0], state
