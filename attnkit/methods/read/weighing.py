"""What the methods that reweigh attention (ZeroTuning, ACT) share: attention with its log-sum-exp, the initial
token's slot per row, and the exact output correction for a logit bias on one key.

A logit bias ``b`` on one key ``k0`` (probability ``p0`` before the bias) changes the output of a softmax attention
to ``o' = (o + (e^b - 1) p0 v0) / (1 + (e^b - 1) p0)`` with ``p0 = exp(q.k0 * scale - lse)``: any kernel that
returns the log-sum-exp gives the biased output without a bias tensor.
"""

from __future__ import annotations

import warnings

import torch

from attnkit.hf.attention import _FLASH_OK
from attnkit.reference import dense_attention, per_head

ROWS = 1024  # query rows per float32 block: bounds the (B, H, rows, n) probabilities of a long prefill


def attention_lse(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    softcap: float | None,
    causal_prefix: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention output and log-sum-exp.

    query (B, H, q, D); key/value (B, Hkv, n, D); mask bool broadcastable to (B, Hkv|1, q, n) or None.
    ``causal_prefix``: the mask is plain bottom-right causal (the layer holds every earlier token in order), which
    lets CUDA half precision take the flash kernel, whose log-sum-exp comes with it.
    Returns out (B, H, q, D) float32 and lse (B, H, q) float32.
    """
    q = query.shape[2]
    if (causal_prefix and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and softcap is None
            and query.shape[-1] <= 256 and _FLASH_OK[0]):
        try:
            res = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, True, False, scale=scaling)
            return res[0].float(), res[1].float()
        except RuntimeError:
            pass  # a layout the flash kernel refuses: the float32 path below
    if mask is not None and query.is_cuda and softcap is None and _EFFICIENT_OK[0]:
        try:
            return _efficient_lse(query, key, value, mask, scaling)
        except RuntimeError as err:  # a shape or arch the kernel refuses: the float32 path from now on, said once
            _EFFICIENT_OK[0] = False
            warnings.warn(f"attnkit: the memory-efficient kernel refused a masked attention_lse "
                          f"({str(err).splitlines()[0][:120]}); using the float32 path", stacklevel=2)
    if causal_prefix and mask is None:  # plain bottom-right causal, for the float32 path
        n = key.shape[2]
        qpos = torch.arange(n - q, n, device=query.device)
        mask = (torch.arange(n, device=query.device)[None, :] <= qpos[:, None]).view(1, 1, q, n)
    outs, lses = [], []
    for s in range(0, q, ROWS):
        m = None if mask is None else (mask if mask.shape[2] == 1 else mask[:, :, s : s + ROWS])
        out, _, lse = dense_attention(query[:, :, s : s + ROWS], key, value, m, scaling, softcap)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, 2), torch.cat(lses, 2)


_EFFICIENT_OK = [True]


def _efficient_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                   scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``attention_lse`` under a bool mask (B, Hkv|1, q|1, n) from SDPA's memory-efficient kernel, which returns
    its log-sum-exp: padded batches (ZeroTuning and ACT calibrate on them) no longer take the float32 dense path.
    The mask becomes an additive bias in ``ROWS``-query blocks, its rows 16-aligned as the kernel wants; rows with
    nothing visible come out zero with lse -inf, as ``dense_attention`` gives them."""
    b, h, q, d = query.shape
    n = key.shape[2]
    k, v = per_head(key, h), per_head(value, h)
    outs, lses = [], []
    for s in range(0, q, ROWS):
        qs = query[:, :, s : s + ROWS]
        m = mask if mask.shape[2] == 1 else mask[:, :, s : s + ROWS]
        m = m.expand(b, m.shape[1], qs.shape[2], n)  # (B, 1 or Hkv, rows, n): one head broadcasts as a view
        if m.shape[1] != 1:  # a per-KV-head mask: the bias is built at the query heads' count, its rows padded
            m = per_head(m, h)  # (repeating a padded bias copies it unpadded, which the kernel refused on the H200)
        empty = ~m.any(-1, keepdim=True)
        bias = torch.zeros(*m.shape[:3], n + (-n % 16), dtype=query.dtype, device=query.device)[..., :n]
        bias.masked_fill_(~(m | empty), float("-inf"))
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            qs, k, v, per_head(bias, h), True, scale=scaling)[:2]
        empty = per_head(empty, h)  # (B, H, rows, 1)
        outs.append(out.float().masked_fill(empty, 0.0))
        lses.append(lse[:, :, : qs.shape[2]].float().masked_fill(empty.squeeze(-1), float("-inf")))
    return torch.cat(outs, 2), torch.cat(lses, 2)


def initial_slot(pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pos (B, Hkv, n) -> (slot of position 0 per row and KV head (B, Hkv), whether it is held (B, Hkv)).

    Positions count from each row's first real token, so position 0 is the row's initial token under left padding.
    """
    is_first = pos == 0
    return is_first.long().argmax(-1), is_first.any(-1)


def gather_slot(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, Hkv, n, D), idx (B, Hkv) -> (B, Hkv, D)."""
    return torch.gather(x, 2, idx[:, :, None, None].expand(-1, -1, 1, x.shape[-1])).squeeze(2)


def bias_initial(
    out: torch.Tensor,
    lse: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    pos: torch.Tensor,
    scaling: float,
    softcap: float | None,
    gain: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Output of the same attention with ``log(1 + gain_h)`` added to the initial token's logit, per query head.

    out (B, H, q, D) float32 and lse (B, H, q) of the unbiased attention; query (B, H, q, D); key/value
    (B, Hkv, n, D); pos (B, Hkv, n); gain (H,), or (B, H) per row, float32 = gamma - 1 (0: head untouched); mask
    (B|1, Hkv|1, q, n) bool as the attention used it (None: all visible). Queries that do not see their row's initial
    token (not held, or outside a sliding window) are left as they are. Returns (B, H, q, D) float32.
    """
    heads = query.shape[1]
    idx, has = initial_slot(pos)
    k0 = per_head(gather_slot(key, idx).float(), heads)  # (B, H, D)
    v0 = per_head(gather_slot(value, idx).float(), heads)
    s0 = torch.einsum("bhqd,bhd->bhq", query.float(), k0) * scaling
    if softcap is not None:
        s0 = softcap * torch.tanh(s0 / softcap)
    seen = has[:, :, None].float()  # (B, Hkv, 1)
    if mask is not None:
        b, hkv, q, n = query.shape[0], key.shape[1], query.shape[2], key.shape[2]
        full = mask.expand(b, mask.shape[1] if mask.shape[1] == hkv else hkv, q, n)
        seen = seen * torch.gather(full, 3, idx[:, :, None, None].expand(b, hkv, q, 1)).squeeze(3).float()
    p0 = torch.exp(s0 - lse) * per_head(seen, heads)  # (B, H, q); 0 where the initial token is not seen
    g = (gain.view(1, -1, 1) if gain.dim() == 1 else gain.unsqueeze(-1)) * p0
    return (out + g.unsqueeze(-1) * v0.unsqueeze(2)) / (1 + g).unsqueeze(-1)


def initial_bias_tensor(pos: torch.Tensor, heads: int, q: int, gain: torch.Tensor) -> torch.Tensor:
    """The (B, H, q, n) float logit bias that :func:`bias_initial` applies (for the recorder and the tests);
    gain (H,) or (B, H)."""
    idx, has = initial_slot(pos)
    b, hkv, n = pos.shape
    onehot = torch.zeros(b, hkv, n, device=pos.device)
    onehot.scatter_(2, idx.unsqueeze(-1), has.unsqueeze(-1).float())
    log_gamma = torch.log1p(gain.to(pos.device))
    log_gamma = log_gamma.view(1, -1, 1, 1) if gain.dim() == 1 else log_gamma[:, :, None, None]
    return (per_head(onehot.unsqueeze(2), heads) * log_gamma).expand(b, heads, q, n)
