"""Decode-attention kernels over fixed-capacity slot buffers, with Quest-style page selection.

``decode_attention`` and ``sparse_decode_attention`` dispatch per call: the Triton kernels
(:mod:`attnkit.kernels.triton_decode`) when the tensors are on CUDA and triton imports, else the pure-torch path
(:mod:`attnkit.kernels.torch_ref`, also the reference the kernels are tested against). ``ATTNKIT_KERNELS=torch``
forces the torch path. Page summaries, Quest scores and top-k are plain torch ops on either device;
``select_pages`` fuses scoring and masking into one Triton kernel on CUDA (:mod:`attnkit.kernels.triton_select`).
"""

from __future__ import annotations

import functools
import os
from types import ModuleType

import torch

from attnkit.kernels import torch_ref
from attnkit.kernels.torch_ref import page_summaries, quest_scores, take_rows, topk_pages, update_page_summary

__all__ = [
    "backend",
    "decode_attention",
    "decode_attention_mass",
    "head_scores",
    "page_summaries",
    "quest_attention",
    "quest_scores",
    "select_pages",
    "sparse_decode_attention",
    "take_rows",
    "tokenselect_votes",
    "topk_pages",
    "uses_triton",
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


@functools.cache
def _select_module() -> ModuleType | None:
    """The Triton page-scoring module, or None where triton is missing or broken (imported once, lazily)."""
    try:
        from attnkit.kernels import triton_select
    except Exception:
        return None
    return triton_select


def backend(device: torch.device | str) -> str:
    """``"triton"`` or ``"torch"``: the path ``decode_attention`` takes for bf16/fp16 tensors on ``device``."""
    if os.environ.get("ATTNKIT_KERNELS", "").lower() == "torch":
        return "torch"
    if torch.device(device).type == "cuda" and _triton_module() is not None:
        return "triton"
    return "torch"


def _impl(q: torch.Tensor) -> ModuleType:
    # float32 stays on the torch path: tl.dot would round fp32 inputs to tf32 on the GPU; the kernels are built
    # for head dims 64 / 128 / 256 (tiny test models use 16).
    if q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] in (64, 128, 256) and backend(q.device) == "triton":
        return _triton_module()
    return torch_ref


def uses_triton(q: torch.Tensor) -> bool:
    """Whether :func:`decode_attention` and :func:`sparse_decode_attention` run the Triton kernels for ``q``
    (CUDA, bf16/fp16, D in 64 / 128 / 256), rather than the torch path."""
    return _impl(q) is not torch_ref


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


def decode_attention_mass(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, n: int, scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense decode attention over the first ``n`` slots and the attention each slot received, summed over the
    query heads of its KV head: (out (B, H, 1, D), mass (B, Hkv, n) float32). H2O's fixed-shape step. Shapes as
    in :func:`attnkit.kernels.torch_ref.decode_attention_mass`; on CUDA three Triton launches, no probabilities
    written."""
    return _impl(q).decode_attention_mass(q, k, v, pos, n, scale)


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
    idx : (B, Hkv, K) unique page ids per row (-1 = unused), read by every query head of the KV head's group; or
        (B, H, K), each query head its own pages of its KV head; page p is slots [p * page_size, (p+1) * page_size)
    page_size : slots per page (1: idx are slot indices)
    scale : multiplier of q.k (default D ** -0.5)
    out : optional (B, H, 1, D) buffer in q's dtype, written in place (static output for CUDA graphs)

    Returns
    -------
    out : (B, H, 1, D) in q's dtype, zero for rows with no valid selected slot
    """
    return _impl(q).sparse_decode_attention(q, k, v, pos, idx, page_size, scale, out)


def select_pages(
    q: torch.Tensor,
    summary: torch.Tensor,
    k: int,
    n_valid_pages: int | torch.Tensor,
    force_last: bool = True,
) -> torch.Tensor:
    """Quest selection: ``topk_pages(quest_scores(q, summary), k, n_valid_pages, force_last)``.

    On CUDA with a bf16/fp16 summary and D in (64, 128, 256) the scores and masks are one Triton kernel
    (:func:`attnkit.kernels.triton_select.quest_scores_masked`, fp32 accumulation, no host sync) followed by
    ``torch.topk``; elsewhere the torch path. Scores may differ in the last bits between the paths (torch rounds
    its matvec to the summary dtype), so near-ties can pick different pages.

    Parameters
    ----------
    q : (B, H, 1, D)
    summary : (B, Hkv, P, 2, D)
    k : pages to select
    n_valid_pages : int or 0-d/1-element device tensor; pages ``>= n_valid_pages`` are never selected
    force_last : always select page ``n_valid_pages - 1``

    Returns
    -------
    idx : (B, Hkv, k) int64 unique page ids in no particular order, -1 padding (as :func:`topk_pages`)
    """
    if (
        summary.dtype in (torch.bfloat16, torch.float16)
        and q.shape[-1] in (64, 128, 256)
        and summary.is_contiguous()
        and backend(summary.device) == "triton"
        and _select_module() is not None
    ):
        return _select_module().select_pages(q, summary, k, n_valid_pages, force_last)
    return topk_pages(quest_scores(q, summary), k, n_valid_pages, force_last)


@functools.cache
def _quest_module() -> ModuleType | None:
    try:
        from attnkit.kernels import triton_quest
    except Exception:
        return None
    return triton_quest


def quest_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos: torch.Tensor,
    summary: torch.Tensor,
    k_pages: int,
    n_valid_pages: int | torch.Tensor,
    page_size: int,
    scale: float | None = None,
    force_last: bool = True,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quest's decode step: ``sparse_decode_attention`` over ``select_pages(q, summary, k_pages, ...)``.

    On CUDA (bf16/fp16, D in 64 / 128 / 256, pages of 16-128) the selection and the sparse attention share one
    kernel (:mod:`attnkit.kernels.triton_quest`: three launches in all, no selection written and read back);
    elsewhere the two calls above. Shapes as in :func:`select_pages` and :func:`sparse_decode_attention`.
    """
    fused = _quest_module()
    if (
        fused is not None
        and _impl(q) is not torch_ref
        and summary.is_contiguous()
        and summary.dtype == q.dtype
        and page_size in fused.PAGES
        and summary.shape[2] <= fused.MAX_PAGES
    ):
        return fused.quest_attention(q, k, v, pos, summary, k_pages, n_valid_pages, page_size, scale, force_last,
                                     out)
    idx = select_pages(q, summary, k_pages, n_valid_pages, force_last)
    return sparse_decode_attention(q, k, v, pos, idx, page_size, scale, out)


def tokenselect_votes(
    q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, lo: int, hi: torch.Tensor, span: int,
    skip: torch.Tensor | None = None,
) -> torch.Tensor:
    """TokenSelect soft votes (B, span) float32 over the candidate slots (``lo <= pos < hi[b]``), -inf elsewhere.

    ``skip`` (B,) bool marks rows whose votes the caller will not use: the Triton path reads no key for them
    (their votes are unspecified); the torch path computes every row.

    On CUDA with bf16/fp16 keys and D in (64, 128, 256): one Triton pass over the candidate keys
    (:func:`attnkit.kernels.triton_select.tokenselect_votes`, fp32 scores) and one votes kernel; elsewhere the
    torch reference (:func:`attnkit.kernels.torch_ref.tokenselect_votes`). See the latter for the shapes.
    """
    if _votes_ok(q, k):
        return _select_module().tokenselect_votes(q, k, pos, lo, hi, span, skip)
    return torch_ref.tokenselect_votes(q, k, pos, lo, hi, span)


def head_scores(
    q: torch.Tensor, k: torch.Tensor, pos: torch.Tensor, lo: int, hi: torch.Tensor, span: int
) -> torch.Tensor:
    """Per-query-head scores q_h . k_j (unscaled, fp32) over the first ``span`` slots, -inf off the candidates
    (``lo <= pos < hi[b]``, KV head 0's positions): the selection pass of TidalDecode and FASA.

    On CUDA with bf16/fp16 keys and D in (64, 128, 256): one Triton pass over the keys (TokenSelect's scoring
    kernel); elsewhere :func:`attnkit.kernels.torch_ref.head_scores`, which gives the shapes.
    """
    if _votes_ok(q, k):
        return _select_module().head_scores(q, k, pos, lo, hi, span)
    return torch_ref.head_scores(q, k, pos, lo, hi, span)


def _votes_ok(q: torch.Tensor, k: torch.Tensor) -> bool:
    return (
        k.dtype in (torch.bfloat16, torch.float16)
        and q.dtype == k.dtype
        and q.shape[-1] in (64, 128, 256)
        and k.stride(-1) == 1
        and backend(k.device) == "triton"
        and _select_module() is not None
    )


@functools.cache
def _cache_module() -> ModuleType | None:
    try:
        from attnkit.kernels import triton_cache
    except Exception:
        return None
    return triton_cache


def fused_cache(keys: torch.Tensor, k_new: torch.Tensor) -> ModuleType | None:
    """:mod:`attnkit.kernels.triton_cache` when its fused bookkeeping kernels can serve these buffers (CUDA,
    power-of-two head dim up to 256, contiguous last dims), else None: the caller runs its torch ops."""
    d = keys.shape[-1]
    if (
        keys.is_cuda
        and d in (16, 32, 64, 128, 256)
        and keys.stride(-1) == 1
        and k_new.stride(-1) == 1
        and backend(keys.device) == "triton"
    ):
        return _cache_module()
    return None
