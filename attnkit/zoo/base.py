"""The mixer contract: a causal token mixer ``(B, T, d) -> (B, T, d)`` with a decode path and a state count.

Every zoo mixer is one ``torch.nn.Module`` subclass of :class:`Mixer` plus one small dataclass config with
validated fields (the paper's defaults). The three methods beyond ``forward``:

- ``init_state(batch) -> state``: the empty decode state (a dict of tensors, plus int counters) on the mixer's
  own device and dtype;
- ``step(x_t, state) -> (y_t, state)``: one token, ``x_t`` (B, d) -> ``y_t`` (B, d). Steps from ``init_state``
  reproduce ``forward`` token by token; a step may update the state's tensors in place and returns the state;
- ``state_size(seq_len=None) -> int``: the floats one decode step carries per sequence (integer counters are not
  counted). Mixers whose state grows (a KV cache) need ``seq_len``; fixed-state mixers ignore it.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

State = dict[str, Any]


def check_int(owner: str, name: str, value: Any, lo: int, hi: int | None = None) -> None:
    """Raise ValueError naming the owner, field, value and accepted range unless ``lo <= value <= hi``."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= lo and (hi is None or value <= hi)
    if not ok:
        accepted = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
        raise ValueError(f"{owner}: {name}={value!r} is invalid; accepted: {accepted}")


def check_float(owner: str, name: str, value: Any, lo: float, hi: float = math.inf, open_lo: bool = False) -> None:
    """Raise ValueError unless ``value`` is a number in ``[lo, hi]`` (``(lo, hi]`` with ``open_lo``)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not (number and (value > lo if open_lo else value >= lo) and value <= hi):
        left = "(" if open_lo else "["
        raise ValueError(f"{owner}: {name}={value!r} is invalid; accepted: a number in {left}{lo}, {hi}]")


def check_bool(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{owner}: {name}={value!r} is invalid; accepted: True, False")


def check_choice(owner: str, name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{owner}: {name}={value!r} is invalid; accepted: {', '.join(map(repr, choices))}")


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, T, H*D) -> (B, H, T, D)."""
    b, t, _ = x.shape
    return x.view(b, t, num_heads, -1).transpose(1, 2)


def l2_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / max(||x||, eps) over the last dim."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(eps)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) -> (B, T, H*D)."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


class Projections(nn.Module):
    """The q, k, v input projections and the output projection of a multi-head mixer.

    Queries and keys have ``qk_dim`` channels per head, values ``v_dim``; the output maps ``H * v_dim`` back to
    ``d_model``.
    """

    def __init__(self, d_model: int, num_heads: int, qk_dim: int, v_dim: int, bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(d_model, num_heads * qk_dim, bias=bias)
        self.k = nn.Linear(d_model, num_heads * qk_dim, bias=bias)
        self.v = nn.Linear(d_model, num_heads * v_dim, bias=bias)
        self.o = nn.Linear(num_heads * v_dim, d_model, bias=bias)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, d) -> q, k (B, H, T, qk_dim) and v (B, H, T, v_dim)."""
        h = self.num_heads
        return split_heads(self.q(x), h), split_heads(self.k(x), h), split_heads(self.v(x), h)

    def out(self, y: torch.Tensor) -> torch.Tensor:
        """(B, H, T, v_dim) -> (B, T, d)."""
        return self.o(merge_heads(y))

    def qkv_step(self, x_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One token: (B, d) -> q, k (B, H, qk_dim) and v (B, H, v_dim)."""
        q, k, v = self.qkv(x_t[:, None])
        return q[:, :, 0], k[:, :, 0], v[:, :, 0]

    def out_step(self, y_t: torch.Tensor) -> torch.Tensor:
        """One token: (B, H, v_dim) -> (B, d)."""
        return self.o(y_t.flatten(1))


class Mixer(nn.Module):
    """Base of every zoo mixer. Subclasses set ``name``, ``paper`` and ``config_class`` and take
    ``(d_model, config=None)``; ``None`` means the config's defaults."""

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    config_class: ClassVar[type] = type(None)

    def __init__(self, d_model: int, config: Any = None) -> None:
        super().__init__()
        check_int(self.name, "d_model", d_model, 1)
        if config is None:
            config = self.config_class()
        if not isinstance(config, self.config_class):
            raise ValueError(f"{self.name}: config must be a {self.config_class.__name__}, got {type(config).__name__}")
        self.d_model = d_model
        self.config = config

    def per_head(self, num_heads: int) -> int:
        """d_model // num_heads; ValueError when num_heads does not divide d_model."""
        if self.d_model % num_heads:
            raise ValueError(
                f"{self.name}: num_heads={num_heads} does not divide d_model={self.d_model}; "
                f"accepted: a divisor of {self.d_model}"
            )
        return self.d_model // num_heads

    def multi_head(self, num_heads: int, qk_dim: int | None = None, bias: bool = False) -> Projections:
        """Set ``num_heads`` and ``head_dim`` (d / H) and return the q, k, v, o projections, with ``qk_dim``
        query/key channels per head (``head_dim`` when None) and ``head_dim`` value channels."""
        self.num_heads = num_heads
        self.head_dim = self.per_head(num_heads)
        return Projections(self.d_model, num_heads, qk_dim or self.head_dim, self.head_dim, bias)

    def factory(self) -> dict[str, Any]:
        """Device and dtype of the mixer's parameters, for allocating states."""
        p = next(self.parameters())
        return {"device": p.device, "dtype": p.dtype}

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, T, d)
        raise NotImplementedError

    def init_state(self, batch: int) -> State:
        raise NotImplementedError(f"{self.name} has no decode path")

    def step(self, x_t: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:  # (B, d) -> (B, d)
        raise NotImplementedError(f"{self.name} has no decode path")

    def state_size(self, seq_len: int | None = None) -> int:
        raise NotImplementedError(f"{self.name} does not count its state")

    def need_seq_len(self, seq_len: int | None) -> int:
        """``seq_len`` checked for mixers whose state grows with the sequence."""
        if seq_len is None:
            raise ValueError(f"{self.name}: the state grows with the sequence; pass seq_len (an integer >= 0)")
        check_int(self.name, "seq_len", seq_len, 0)
        return seq_len


def masked_softmax(scores: torch.Tensor, allowed: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """softmax of ``scores`` over the entries where ``allowed`` (broadcastable bool) is True along ``dim``.

    Rows with no allowed entry give all zeros instead of NaN, in the forward and the backward pass (the shift by
    the row's maximum is detached: softmax does not depend on it).
    """
    scores = torch.where(allowed, scores, float("-inf"))  # broadcasts both
    peak = scores.detach().amax(dim, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    weights = torch.exp(scores - peak)
    total = weights.sum(dim, keepdim=True)
    return weights / torch.where(total > 0, total, torch.ones_like(total))  # an allowed row sums to >= 1
