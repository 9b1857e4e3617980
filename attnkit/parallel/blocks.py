"""Partial attention of a query block over one key block, with its log-sum-exp, and the exact merge of partials.

Ring attention computes each rank's output from W partial results (one per K/V block that passes by); they
combine exactly through their log-sum-exps: with l = logaddexp(l_a, l_b), out = out_a e^(l_a - l) + out_b e^(l_b - l),
accumulated in float32. On CUDA in half precision the unmasked blocks (full or index-causal) go to SDPA's flash
kernel, which returns the log-sum-exp and takes grouped KV heads as they are; masked blocks and CPU take the
float32 eager path (exact; memory blocked by queries).
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def attend_block(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float, causal: bool = False,
    mask: torch.Tensor | None = None, rows: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``query`` over one key block.

    query (B, H, Tq, D); key/value (B, Hkv, Tk, D), H a multiple of Hkv; ``causal``: index-causal, top-left
    aligned (Tq == Tk, both in the same ascending positions); mask: bool broadcastable to (B, 1, Tq, Tk), True =
    visible. -> (out (B, H, Tq, D): the query's dtype on the flash path, float32 otherwise, zero rows where
    nothing is visible; lse (B, H, Tq) float32, -inf where nothing is visible).
    """
    b, h, tq, d = query.shape
    hkv, tk = key.shape[1], key.shape[2]
    flash = query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and d <= 256 and mask is None
    if flash:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, causal, False,
                                                                       scale=scale)[:2]
        return out, lse
    g = h // hkv
    kf = key.float().unsqueeze(2)  # (B, Hkv, 1, Tk, D)
    vf = value.float().unsqueeze(2)
    out = torch.empty((b, hkv, g, tq, value.shape[-1]), device=query.device)
    lse = torch.empty((b, hkv, g, tq), device=query.device)
    kidx = torch.arange(tk, device=query.device)
    for s in range(0, tq, rows):
        qq = query[:, :, s : s + rows].float().view(b, hkv, g, -1, d)  # (B, Hkv, G, r, D)
        scores = torch.matmul(qq, kf.transpose(-1, -2)) * scale  # (B, Hkv, G, r, Tk)
        if causal:
            qidx = torch.arange(s, s + qq.shape[3], device=query.device)
            scores = scores.masked_fill(kidx > qidx.unsqueeze(-1), NEG_INF)
        if mask is not None:
            m = mask[:, :, s : s + rows] if mask.shape[2] > 1 else mask
            scores = scores.masked_fill(~m.unsqueeze(2), NEG_INF)  # (B|1, 1, 1, r, Tk)
        l = torch.logsumexp(scores, dim=-1)  # noqa: E741 - (B, Hkv, G, r)
        probs = torch.exp(scores - l.unsqueeze(-1)).nan_to_num(0.0)
        out[:, :, :, s : s + rows] = torch.matmul(probs, vf)
        lse[:, :, :, s : s + rows] = l
    return out.view(b, h, tq, -1), lse.view(b, h, tq)


def merge_into(acc_out: torch.Tensor, acc_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Fold one partial (out (B, H, q, D), lse (B, H, q)) into the float32 accumulators, in place (they may be
    views of a larger accumulator: a partial over some of the queries)."""
    new = torch.logaddexp(acc_lse, lse)
    w_acc = torch.exp(acc_lse - new).nan_to_num_(0.0)  # both -inf: nothing seen yet, weight 0
    w_new = torch.exp(lse - new).nan_to_num_(0.0)
    acc_out.mul_(w_acc.unsqueeze(-1)).add_(out.float() * w_new.unsqueeze(-1))
    acc_lse.copy_(new)
