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


def per_head(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, Hkv|1, ...) -> (B, H, ...): KV heads repeated for their query heads, a size-1 head dim expanded as a
    stride-0 view (``expand_kv`` keeps it as is, for masks that broadcast)."""
    return x.expand(x.shape[0], heads, *x.shape[2:]) if x.shape[1] == 1 else expand_kv(x, heads)


def attention_probs(
    query: torch.Tensor,
    key: torch.Tensor,
    mask: torch.Tensor | None = None,
    scaling: float | None = None,
    softcap: float | None = None,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention probabilities in float32, GQA-grouped: one matmul per KV head over its group's query
    rows, so the keys are never repeated per query head and the values never read (a scoring pass over a 128K
    span reads 0.5 GB of float32 keys instead of 2 GB repeated ones). Arguments as :func:`dense_attention`'s.

    Returns probs (B, H, q, n) float32 (rows with nothing to attend to are zero) and lse (B, H, q).
    """
    b, n_heads, q, head_dim = query.shape
    hkv, n = key.shape[1], key.shape[2]
    if n_heads % hkv:
        raise ValueError(f"{n_heads} query heads cannot share {hkv} KV heads evenly")
    g = n_heads // hkv
    scale = head_dim**-0.5 if scaling is None else scaling
    # (B, Hkv, G * q, n) -> (B, H, q, n): query head h = kv * G + i reads KV head h // G, as expand_kv repeats
    scores = torch.matmul(query.float().reshape(b, hkv, g * q, head_dim), key.float().transpose(-1, -2))
    scores = (scores * scale).view(b, n_heads, q, n)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if bias is not None:
        scores = scores + bias.float()
    if mask is not None:
        if mask.ndim == 4 and mask.shape[1] == hkv and g > 1:  # per KV head: broadcast over its group, no copy
            scores = scores.view(b, hkv, g, q, n).masked_fill(~mask.unsqueeze(2), float("-inf")).view(b, n_heads, q, n)
        else:
            scores = scores.masked_fill(~expand_kv(mask, n_heads), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, q)
    probs = torch.exp(scores - lse.unsqueeze(-1).clamp_min(-1e30))
    return torch.nan_to_num(probs, nan=0.0), lse


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
    probs, lse = attention_probs(query, key, mask, scaling, softcap, bias)
    b, h, q, n = probs.shape
    hkv = key.shape[1]
    out = torch.matmul(probs.view(b, hkv, h // hkv * q, n), value.float()).view(b, h, q, value.shape[-1])
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
