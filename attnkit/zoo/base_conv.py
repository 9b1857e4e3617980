"""BaseConv: a gated short causal depthwise convolution, decoded with a buffer of the last inputs.

Paper: the convolution layer of BASED (arXiv 2402.18668) and Zoology (arXiv 2312.04927).
Idea: y = conv(x) * (W x + b) + x, with a depthwise causal convolution of ``kernel_size`` taps (3 in BASED):
cheap local token mixing (it shifts the previous token in, which induction-style recall needs), no recall.
Shapes: x (B, T, d); conv weight (d, 1, K); decode buffer (B, K - 1, d) of the previous inputs.
Deviation: none (Zoology's BaseConv with a short kernel and no activation).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from attnkit.zoo.base import Mixer, State, check_int


@dataclass
class BaseConvConfig:
    """Settings of BaseConv: the number of convolution taps (BASED uses 3)."""

    kernel_size: int = 3

    def __post_init__(self) -> None:
        check_int("base_conv", "kernel_size", self.kernel_size, 1)


class ShortConv(nn.Module):
    """Depthwise causal convolution over time: out_t = sum_j w_j * x_{t-K+1+j} + b (zeros before the start)."""

    def __init__(self, d_model: int, kernel_size: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(d_model, d_model, kernel_size, groups=d_model, padding=kernel_size - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, d) -> (B, T, d)."""
        t = x.shape[1]
        return self.conv(x.transpose(1, 2))[..., :t].transpose(1, 2)  # left padding only: crop the tail

    def init_state(self, batch: int, factory: dict) -> torch.Tensor:
        return torch.zeros(batch, self.kernel_size - 1, self.conv.in_channels, **factory)  # (B, K-1, d)

    def step(self, x_t: torch.Tensor, buffer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t (B, d), buffer (B, K-1, d) -> out_t (B, d), the buffer shifted by one."""
        window = torch.cat([buffer, x_t[:, None]], dim=1)  # (B, K, d): x_{t-K+1} .. x_t
        out = torch.einsum("bkd,dk->bd", window, self.conv.weight[:, 0]) + self.conv.bias
        return out, window[:, 1:]


class BaseConv(Mixer):
    """Gated short convolution with a residual. ``state_size()`` counts the input buffer: d * (kernel_size - 1)."""

    name = "base_conv"
    paper = "https://arxiv.org/abs/2402.18668"
    config_class = BaseConvConfig

    def __init__(self, d_model: int, config: BaseConvConfig | None = None) -> None:
        super().__init__(d_model, config)
        self.conv = ShortConv(d_model, self.config.kernel_size)
        self.gate = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * self.gate(x) + x

    def init_state(self, batch: int) -> State:
        return {"conv": self.conv.init_state(batch, self.factory())}

    def step(self, x_t: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        out, state["conv"] = self.conv.step(x_t, state["conv"])
        return out * self.gate(x_t) + x_t, state

    def state_size(self, seq_len: int | None = None) -> int:
        return self.d_model * (self.config.kernel_size - 1)
