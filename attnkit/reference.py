"""Dense float32 reference attention: the yardstick every method is tested against."""

from __future__ import annotations

import torch


def expand_kv(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Repeat KV heads for grouped-query attention: query head h reads KV head h // G.

    x: (B, Hkv, n, D) or a mask/score tensor (B, Hkv, q, n) -> (B, H, ..., ...).
    A size-1 head dimension broadcasts and is returned as is.
    """
    heads = x.shape[1]
    if heads == n_heads or heads == 1:
        return x
    if n_heads % heads:
        raise ValueError(f"{n_heads} query heads cannot share {heads} KV heads evenly")
    return x.repeat_interleave(n_heads // heads, dim=1)


def dense_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None = None,
    scaling: float | None = None,
    softcap: float | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eager attention in float32, GQA-aware.

    Parameters
    ----------
    query : (B, H, q, D)
    key, value : (B, Hkv, n, D), with H a multiple of Hkv
    mask : bool, broadcastable to (B, H, q, n) with the head dim 1, Hkv or H; True = may attend.
    scaling : multiplier of q.k (default D ** -0.5)
    softcap : Gemma-2 style logit soft-capping, ``cap * tanh(s / cap)``
    bias : float, broadcastable to (B, H, q, n): added to the scores after soft-capping (methods that reweigh
        attention, e.g. ZeroTuning's log(gamma) on the initial token, record theirs for the generic tests)

    Returns
    -------
    out : (B, H, q, D) float32; rows with nothing to attend to are zero
    probs : (B, H, q, n) float32
    lse : (B, H, q) float32 log-sum-exp of the scaled scores (-inf for empty rows)
    """
    n_heads, head_dim = query.shape[1], query.shape[-1]
    scale = head_dim**-0.5 if scaling is None else scaling
    k = expand_kv(key.float(), n_heads)
    v = expand_kv(value.float(), n_heads)
    scores = torch.matmul(query.float(), k.transpose(-1, -2)) * scale  # (B, H, q, n)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if bias is not None:
        scores = scores + bias.float()
    if mask is not None:
        scores = scores.masked_fill(~expand_kv(mask, n_heads), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, q)
    probs = torch.exp(scores - lse.unsqueeze(-1).clamp_min(-1e30))
    probs = torch.nan_to_num(probs, nan=0.0)
    out = torch.matmul(probs, v)
    return out, probs, lse


def recorded_reference(record: dict) -> torch.Tensor:
    """The float32 reference output of one recorded layer call (``run.recorder``): attention under the
    record's mask (and logit bias), then, for methods that rectify a sparse output (Rectified SpaAttn), the
    record's ``scale`` (B, H, q, 1) and ``addend`` (B, H, q, D): out = scale * attention + addend."""
    r = record
    out, _, _ = dense_attention(r["query"], r["key"], r["value"], r["mask"], r["scaling"], bias=r.get("bias"))
    if r.get("scale") is not None:
        out = out * r["scale"].float() + r["addend"].float()
    return out
