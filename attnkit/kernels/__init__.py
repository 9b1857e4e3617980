"""Decode-attention kernels over fixed-capacity slot buffers, with Quest-style page selection.

``decode_attention`` and ``sparse_decode_attention`` dispatch per call: the Triton kernels
(:mod:`attnkit.kernels.triton_decode`) when the tensors are on CUDA and triton imports, else the pure-torch path
(:mod:`attnkit.kernels.torch_ref`, also the reference the kernels are tested against). ``ATTNKIT_KERNELS=torch``
forces the torch path. Page summaries, Quest scores and top-k are plain torch ops on either device.
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch

from attnkit.kernels import torch_ref
from attnkit.kernels.torch_ref import page_summaries, quest_scores, topk_pages, update_page_summary

__all__ = [
    "backend",
    "decode_attention",
    "page_summaries",
    "quest_scores",
    "sparse_decode_attention",
    "topk_pages",
    "update_page_summary",
]


@functools.cache
def _triton_module() -> ModuleType | None:
    """The Triton kernels module, or None where triton is missing or broken (imported once, lazily)."""
    try:
        from attnkit.kernels import triton_decode
    except Exception:  # ImportError, or a triton that fails to initialise on this machine
        return None
    return triton_decode


def backend(device: torch.device | str) -> str:
    """``"triton"`` or ``"torch"``: the path ``decode_attention`` takes for bf16/fp16 tensors on ``device``."""
    if os.environ.get("ATTNKIT_KERNELS", "").lower() == "torch":
        return "torch"
    if torch.device(device).type == "cuda" and _triton_module() is not None:
        return "triton"
    return "torch"


def _impl(q: torch.Tensor) -> ModuleType:
    # float32 stays on the torch path: tl.dot would round fp32 inputs to tf32 on the GPU.
    if q.dtype in (torch.bfloat16, torch.float16) and backend(q.device) == "triton":
        return _triton_module()
    return torch_ref


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos: torch.Tensor,
    n: int | torch.Tensor,
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense decode attention over the first ``n`` slots.

    Parameters
    ----------
    q : (B, H, 1, D)
    k, v : (B, Hkv, cap, D); query head h reads KV head h // (H // Hkv)
    pos : (B, Hkv, cap) int; slot valid iff pos >= 0
    n : int or 0-d/1-element device int tensor; slots >= n are ignored
    scale : multiplier of q.k (default D ** -0.5)
    out : optional (B, H, 1, D) buffer in q's dtype, written in place (static output for CUDA graphs)

    Returns
    -------
    out : (B, H, 1, D) in q's dtype, zero for rows with no valid slot
    """
    return _impl(q).decode_attention(q, k, v, pos, n, scale, out)


def sparse_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos: torch.Tensor,
    idx: torch.Tensor,
    page_size: int,
    scale: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention over the valid slots of selected pages.

    Parameters
    ----------
    q : (B, H, 1, D)
    k, v : (B, Hkv, cap, D)
    pos : (B, Hkv, cap) int; slot valid iff pos >= 0
    idx : (B, Hkv, K) unique page ids per row (-1 = unused); page p is slots [p * page_size, (p+1) * page_size)
    page_size : slots per page (1: idx are slot indices)
    scale : multiplier of q.k (default D ** -0.5)
    out : optional (B, H, 1, D) buffer in q's dtype, written in place (static output for CUDA graphs)

    Returns
    -------
    out : (B, H, 1, D) in q's dtype, zero for rows with no valid selected slot
    """
    return _impl(q).sparse_decode_attention(q, k, v, pos, idx, page_size, scale, out)
