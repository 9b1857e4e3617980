"""A tiny configurable causal LM around zoo mixers: the model Zoology trains on MQAR.

Token embedding (+ optional learned positions), ``n_layers`` pre-norm blocks of (mixer + residual, MLP +
residual), a final LayerNorm and a tied or untied head. ``mixers`` is one name for every layer or one name per
layer, so hybrids are a list: Zoology's MQAR Based model is ``mixers=["base_conv", "based"]`` with
``mixer_settings={"based": {"conv_kernel": 0}}`` and ``mlp_ratio=0`` (its state mixer is the identity); the BASED
language models interleave ``base_conv``, ``based`` and ``sliding_window`` layers.
Shapes: ids (B, T) -> logits (B, T, V); one decode step ids_t (B,) -> logits (B, V).
Deviations from Zoology's LM: no dropout or stochastic depth. Its blocks carry the residual separately and add it
before each norm, the same function as plain pre-norm, except that its identity state mixer still adds
LayerNorm(x) to the stream where ``mlp_ratio=0`` here adds nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from attnkit.zoo.base import Mixer, State, check_bool, check_float, check_int
from attnkit.zoo.registry import build_mixer


@dataclass
class LMConfig:
    """Settings of :class:`TinyLM`: 2 layers of width 64 and a vocabulary of 8192 as in Zoology's MQAR runs.

    ``mixer_settings`` maps a mixer name to the settings every layer of that kind gets. ``mlp_ratio`` 0 drops the
    MLP (Zoology's MQAR runs have none; the default 4 is a standard block); ``max_positions`` 0 drops learned
    position embeddings (as those runs do). Weights start from N(0, ``init_std``), Zoology's init.
    """

    vocab_size: int = 8192
    d_model: int = 64
    n_layers: int = 2
    mixers: str | list[str] = "based"
    mixer_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    mlp_ratio: int = 4
    max_positions: int = 0
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self) -> None:
        check_int("lm", "vocab_size", self.vocab_size, 2)
        check_int("lm", "d_model", self.d_model, 1)
        check_int("lm", "n_layers", self.n_layers, 1)
        check_int("lm", "mlp_ratio", self.mlp_ratio, 0)
        check_int("lm", "max_positions", self.max_positions, 0)
        check_float("lm", "norm_eps", self.norm_eps, 0.0, 1.0, open_lo=True)
        check_float("lm", "init_std", self.init_std, 0.0, 1.0, open_lo=True)
        check_bool("lm", "tie_embeddings", self.tie_embeddings)
        names = [self.mixers] if isinstance(self.mixers, str) else list(self.mixers)
        if not all(isinstance(n, str) for n in names):
            raise ValueError(f"lm: mixers={self.mixers!r} is invalid; accepted: mixer names (str)")
        if not isinstance(self.mixers, str) and len(self.mixers) != self.n_layers:
            raise ValueError(
                f"lm: mixers={self.mixers!r} has {len(self.mixers)} entries; accepted: one name, or one per layer "
                f"(n_layers={self.n_layers})"
            )

    def layer_mixers(self) -> list[str]:
        return [self.mixers] * self.n_layers if isinstance(self.mixers, str) else list(self.mixers)


class Block(nn.Module):
    """Pre-norm block: x + mixer(norm(x)), then x + mlp(norm(x)) when the MLP is on."""

    def __init__(self, mixer: Mixer, cfg: LMConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mixer = mixer
        self.mlp = None
        if cfg.mlp_ratio:
            hidden = cfg.mlp_ratio * cfg.d_model
            self.norm2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
            self.mlp = nn.Sequential(nn.Linear(cfg.d_model, hidden), nn.GELU(), nn.Linear(hidden, cfg.d_model))

    def mlp_part(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.mlp is None else x + self.mlp(self.norm2(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d)
        return self.mlp_part(x + self.mixer(self.norm1(x)))

    def step(self, x_t: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:  # (B, d)
        y, state = self.mixer.step(self.norm1(x_t), state)
        return self.mlp_part(x_t + y), state


class TinyLM(nn.Module):
    """Embedding, blocks of zoo mixers, final norm, head. ``state_size`` sums the mixers' decode states."""

    def __init__(self, config: LMConfig | None = None) -> None:
        super().__init__()
        cfg = self.config = config or LMConfig()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.positions = nn.Embedding(cfg.max_positions, cfg.d_model) if cfg.max_positions else None
        mixers = [build_mixer(n, cfg.d_model, **cfg.mixer_settings.get(n, {})) for n in cfg.layer_mixers()]
        self.blocks = nn.ModuleList(Block(m, cfg) for m in mixers)
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        for module in self.modules():  # Zoology's init: N(0, 0.02) for linear and embedding weights
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=cfg.init_std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    def embed_at(self, ids: torch.Tensor, start: int) -> torch.Tensor:
        """(B, T) ids at positions start .. start + T - 1 -> (B, T, d). Ids are checked against the vocabulary on
        the CPU only: on a GPU the check would read a value back to the host every step (and break CUDA graphs)."""
        if ids.dtype not in (torch.long, torch.int32) or ids.dim() != 2:
            raise ValueError(f"lm: token ids of dtype {ids.dtype} and shape {tuple(ids.shape)}; accepted: a (B, T) "
                             "long or int32 tensor")
        vocab = self.embed.num_embeddings
        if ids.device.type == "cpu" and ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < vocab:
            raise ValueError(f"lm: token ids in [{int(ids.min())}, {int(ids.max())}]; accepted: ids in [0, {vocab - 1}] "
                             f"(vocab_size={vocab})")
        h = self.embed(ids)
        if self.positions is not None:
            end = start + ids.shape[1]
            if end > self.config.max_positions:
                raise ValueError(f"lm: position {end - 1} is beyond max_positions={self.config.max_positions}")
            h = h + self.positions(torch.arange(start, end, device=ids.device))
        return h

    def forward(self, ids: torch.Tensor, at: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) long -> (B, T, V) logits; with ``at`` (B, T) bool, the (N, V) logits of only the N positions it
        marks, in row-major order (MQAR labels a few query positions: the head over all T positions was most of a
        step's work and memory at a vocabulary of 8,192); with ``at`` (B, K) long positions, the (B * K, V) logits
        at those positions of each row (fixed shapes, no host sync: for CUDA graphs)."""
        h = self.embed_at(ids, 0)
        for block in self.blocks:
            h = block(h)
        if at is not None and at.dtype == torch.bool:
            h = h[at]
        elif at is not None:
            h = h.gather(1, at[..., None].expand(-1, -1, h.shape[-1])).flatten(0, 1)
        return self.head(self.norm(h))

    def init_state(self, batch: int) -> State:
        return {"layers": [b.mixer.init_state(batch) for b in self.blocks], "pos": 0}

    def step(self, ids_t: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One token per row: ids_t (B,) -> logits (B, V), through every mixer's decode path."""
        h = self.embed_at(ids_t[:, None], state["pos"])[:, 0]
        for i, block in enumerate(self.blocks):
            h, state["layers"][i] = block.step(h, state["layers"][i])
        state["pos"] += 1
        return self.head(self.norm(h)), state

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy decoding through the decode paths.

        The prompt is fed token by token (no mixer folds a parallel prefill into its state yet).

        Returns
        -------
        ids : (B, T + max_new_tokens) the prompt and the generated tokens.
        logits : (B, T + max_new_tokens - 1, V) the logits of every step (the last token's are not computed).
        """
        check_int("lm", "max_new_tokens", max_new_tokens, 0)
        if prompt.dim() != 2 or prompt.shape[1] == 0:
            raise ValueError(f"lm: prompt of shape {tuple(prompt.shape)} is invalid; accepted: (B, T) with T >= 1")
        ids, state, logits = prompt, self.init_state(prompt.shape[0]), []
        for t in range(prompt.shape[1] + max_new_tokens - 1):
            out, state = self.step(ids[:, t], state)
            logits.append(out)
            if t + 1 >= ids.shape[1]:
                ids = torch.cat([ids, out.argmax(-1, keepdim=True)], dim=1)
        empty = prompt.new_zeros(prompt.shape[0], 0, self.config.vocab_size, dtype=self.head.weight.dtype)
        return ids, torch.stack(logits, dim=1) if logits else empty

    def state_size(self, seq_len: int | None = None) -> int:
        """Floats carried per sequence by one decode step: the sum over layers (``seq_len`` for growing states)."""
        return sum(b.mixer.state_size(seq_len) for b in self.blocks)
