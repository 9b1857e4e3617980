"""Prefill chunks over a left-padded or sliding-window cache without a mask: one varlen flash call per layer.

A cache layer whose rows each hold, after their left padding, a contiguous run of their newest tokens in position
order (``KVLayer.band``) attends a prefill chunk under a per-row bottom-right causal band: query i of row b sees
key slots ``pads[b] <= j <= n - q + i`` and, with a window w, only ``j >= n - q + i - w``. That is FlashAttention's
varlen problem with ``seqused_k``: each row's keys start at its first real slot, read in place from the cache's
buffer. The masked path it replaces built (rows, n) masks and ran SDPA's memory-efficient kernel over every column
up to the chunk's last, for Gemma-3's sliding layers 3-4x the band's work (notes/gpu.md, twentieth session).

CUDA in half precision only (the flash kernel's); :func:`reference_kernel` runs the same varlen problem in float32
on any device, for tests of the layout arithmetic on CPU.
"""

from __future__ import annotations

import os
import warnings

import torch

from attnkit.reference import expand_kv

_failed = False  # the flash varlen op refused once (an older torch or an unsupported card): masked path from then


def enabled() -> bool:
    """``ATTNKIT_BAND_PREFILL`` = 1 (default) or 0 (the masked path everywhere: comparisons, a suspected kernel bug)."""
    text = os.environ.get("ATTNKIT_BAND_PREFILL", "1")
    if text not in ("0", "1"):
        raise ValueError(f"ATTNKIT_BAND_PREFILL={text!r} is invalid; accepted: 0 or 1")
    return text == "1"


def usable(query: torch.Tensor) -> bool:
    """Whether the flash varlen kernel can take this chunk's queries (B, H, q, D)."""
    return (not _failed and enabled() and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)
            and query.shape[-1] <= 256 and query.shape[-1] % 8 == 0)


def flat_tokens(x: torch.Tensor, in_place: bool = True) -> tuple[torch.Tensor, int]:
    """(B, Hkv, n, D) -> ((T, Hkv, D) tokens of all rows, the row stride in tokens). One KV head whose rows are
    slices of a (B, 1, capacity, D) buffer is viewed in place (row b starts at token b * capacity); otherwise, or
    with ``in_place=False``, the rows are copied back to back (row stride n)."""
    b, h, n, d = x.shape
    if in_place and h == 1 and x.stride(3) == 1 and x.stride(2) == d and x.stride(0) % d == 0:
        rs = x.stride(0) // d
        return x.as_strided(((b - 1) * rs + n, 1, d), (d, x.stride(1), 1)), rs
    return x.transpose(1, 2).reshape(b * n, h, d), n


def band_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, pads: torch.Tensor, scaling: float,
                   window: int | None = None, kernel=None) -> torch.Tensor:
    """Per-row bottom-right causal attention of a prefill chunk, optionally within a window, in one call.

    query (B, H, q, D); key/value (B, Hkv, n, D) whose row b holds ``pads[b]`` padding slots, then real tokens in
    position order; pads (B,) integer on the device (no host sync). -> (B, H, q, D). Rows of pad queries are
    whatever the kernel gives (zero or finite): the caller zeroes them.
    """
    b, h, q, d = query.shape
    n = key.shape[2]
    kf, rs = flat_tokens(key)
    vf, rs_v = flat_tokens(value)
    if rs_v != rs:  # one viewed in place, the other not (attnkit layers lay them out alike): copy both
        (kf, rs), (vf, _) = flat_tokens(key, in_place=False), flat_tokens(value, in_place=False)
    qf = query.transpose(1, 2).reshape(b * q, h, d)
    dev = query.device
    rows = torch.arange(b + 1, device=dev, dtype=torch.int32)
    cu_q = rows * q
    starts = rows[:b] * rs + pads.to(torch.int32)
    cu_k = torch.cat([starts, rows[b:] * rs]).to(torch.int32)
    used = (n - pads).to(torch.int32)
    out = (kernel or flash_kernel)(qf, kf, vf, cu_q, cu_k, used, q, n, scaling, window)
    return out.view(b, q, h, d).transpose(1, 2)


def flash_kernel(qf, kf, vf, cu_q, cu_k, used, max_q: int, max_k: int, scaling: float, window: int | None):
    """torch's FlashAttention-2 varlen forward: qf (Tq, H, D), kf/vf (Tk, Hkv, D) -> (Tq, H, D)."""
    extra = {} if window is None else {"window_size_left": window, "window_size_right": 0}
    return torch.ops.aten._flash_attention_forward(qf, kf, vf, cu_q, cu_k, max_q, max_k, 0.0, True, False,
                                                   scale=scaling, seqused_k=used, **extra)[0]


def reference_kernel(qf, kf, vf, cu_q, cu_k, used, max_q: int, max_k: int, scaling: float, window: int | None):
    """The varlen problem of :func:`flash_kernel` in float32, row by row (tests; any device). A query with no
    visible key gives zeros, as the flash kernel does."""
    out = torch.zeros(qf.shape, dtype=qf.dtype, device=qf.device)
    for r in range(cu_q.numel() - 1):
        q0, q1, k0 = int(cu_q[r]), int(cu_q[r + 1]), int(cu_k[r])
        nk = int(used[r])
        qs, ks, vs = qf[q0:q1].float(), kf[k0 : k0 + nk].float(), vf[k0 : k0 + nk].float()
        nq = q1 - q0
        i = torch.arange(nq, device=qf.device).view(-1, 1)
        j = torch.arange(nk, device=qf.device).view(1, -1)
        see = j <= i + nk - nq
        if window is not None:
            see = see & (j >= i + nk - nq - window)
        qh = qs.transpose(0, 1)  # (H, q, D)
        kh, vh = (expand_kv(x.transpose(0, 1).unsqueeze(0), qh.shape[0])[0] for x in (ks, vs))  # (H or 1, nk, D)
        scores = (qh @ kh.transpose(1, 2) * scaling).masked_fill(~see, float("-inf"))
        probs = torch.softmax(scores, -1).nan_to_num(0.0)  # rows with no key: all -inf -> zeros
        out[q0:q1] = (probs @ vh).transpose(0, 1).to(qf.dtype)
    return out


def run_flash(query, key, value, pads, scaling: float, window: int | None) -> torch.Tensor | None:
    """:func:`band_attention` with the flash kernel; None (and a one-time warning) where this torch or card
    refuses it, after which the caller's masked path serves every chunk."""
    global _failed
    try:
        return band_attention(query, key, value, pads, scaling, window)
    except (RuntimeError, TypeError) as err:
        _failed = True
        warnings.warn(f"attnkit: flash varlen prefill refused ({str(err).splitlines()[0][:120]}); using the "
                      "masked kernel", stacklevel=3)
        return None
