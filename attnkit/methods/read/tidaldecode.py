"""TidalDecode: a few token-selection layers pick each query head's top tokens; the layers after them reuse them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit import kernels
from attnkit.hf.attention import attend_layer
from attnkit.hf.cache import KVLayer
from attnkit.kernels import take_rows
from attnkit.methods.base import Method, check_int

NEG_INF = float("-inf")
STATE = "tidaldecode"  # key of the per-forward selection in run.shared


def head_slots(query: torch.Tensor, layer: KVLayer, k: int, scaling: float) -> torch.Tensor:
    """(B, H, k) slots each query head reads: its top k - 1 past slots by q.k (the current token excluded), then
    the current token's slot; -1 where a row has fewer valid past slots. query (B, H, 1, D). ``scaling`` does not
    change the order (q.k is ranked unscaled)."""
    span = layer.span if layer.static else layer.n
    b, h = query.shape[:2]
    cur = layer.wslot[:, :1, :] if layer.static else torch.full((b, 1, 1), layer.n - 1, device=query.device)
    # past tokens: positions below the current token's (qpos, (B, 1), on the device in either mode)
    scores = kernels.head_scores(query, layer.keys, layer.pos, 0, layer.qpos, span)  # (B, H, span) fp32
    best, top = scores.topk(min(k - 1, span), dim=-1, sorted=False)  # the read needs no order
    top = top.masked_fill(best == NEG_INF, -1)
    return torch.cat([top, cur.expand(b, h, 1)], dim=-1)


def attend_slots(query: torch.Tensor, layer: KVLayer, idx: torch.Tensor, scaling: float) -> torch.Tensor:
    """Exact attention of each query head (B, H, 1, D) over its slots idx (B, H, k) (-1: none), reading keys of
    its KV head -> (B, H, 1, D) in the query's dtype. On the Triton path the rows are read in place (one program
    per query head); the torch path gathers them, or scores the whole span once per KV head under a mask when the
    group's G * k picks are no fewer than the span (the same softmax over the same set)."""
    b, h, k = idx.shape
    hkv = layer.keys.shape[1]
    g = h // hkv
    span = layer.span if layer.static else layer.n
    if kernels.uses_triton(query) or k * g < span:
        return kernels.sparse_decode_attention(query, layer.keys, layer.values, layer.pos, idx, 1, scaling)
    mask = head_read_mask(idx, layer, span).view(b, hkv, g, span)
    # Matmuls in the cache's dtype (fp32 accumulation), softmax in fp32: no fp32 copy of the whole span.
    qg = query.reshape(b, hkv, g, -1).to(layer.keys.dtype)
    scores = torch.matmul(qg, layer.keys[:, :, :span].transpose(-1, -2)).float() * scaling
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1).nan_to_num(0.0)
    out = torch.matmul(probs.to(layer.values.dtype), layer.values[:, :, :span])  # (B, Hkv, G, D)
    return out.reshape(b, h, 1, -1).to(query.dtype)


def head_read_mask(idx: torch.Tensor, layer: KVLayer, n: int) -> torch.Tensor:
    """(B, H, 1, n) bool: the valid slots among each query head's picks idx (B, H, k) (-1: none)."""
    b, h, k = idx.shape
    hkv = layer.pos.shape[1]
    slot_pos = take_rows(layer.pos, idx.clamp_min(0).reshape(b, hkv, -1)).view(b, h, k)
    read = idx.masked_fill((idx < 0) | (slot_pos < 0) | (idx >= n), n)
    mask = torch.zeros((b, h, n + 1), dtype=torch.bool, device=idx.device).scatter_(2, read, True)
    return mask[..., :n].unsqueeze(2)


@dataclass
class TidalDecode(Method):
    """Select tokens on a few layers, reuse the selection on the layers after them.

    Paper: TidalDecode, Yang et al. 2024 (https://arxiv.org/abs/2410.05076; DerrickYLJ/TidalDecode). Tokens
    that receive high attention in one layer keep receiving it in the next ones ("spatial coherence"), so a
    token-selection layer can choose for the layers that follow it.

    Decode steps only (prefill is dense, as in the paper), on the model's global-attention layers: layers below
    ``dense_layers`` attend densely; the first one at or above it is a token-selection layer (dense attention,
    then per query head the ``top_k - 1`` past tokens with the largest q.k / sqrt(D), plus the current token);
    every later layer attends only to those tokens, per query head, except the first layer at or above
    ``reselect_layer``, which selects again for the layers after it (-1: no re-selection). Defaults are the
    official scripts' for Llama-3-8B (sparse start 2, re-selection layer 13, top_k 256 for NIAH).
    How we differ: the selection layer computes its dense output with the decode kernel and its selection scores
    in a second q.K pass (the official code takes both from one attention-weights matrix); the sparse layers
    gather the selected K/V per query head and attend exactly (the official HF path masks logits, with no
    speed-up); the cache-correction extension for long reasoning (recomputing KV every 128 tokens) is not
    implemented. Nothing is evicted. Shapes: selection (B, H, top_k) slot ids, gathered K/V (B, H, top_k, D).
    """

    name = "tidaldecode"
    summary = "top-k tokens per query head chosen on selection layers, reused by the layers after them"
    paper = "https://arxiv.org/abs/2410.05076"
    kind = "read"

    top_k: int = 256
    dense_layers: int = 2
    reselect_layer: int = 13

    def __post_init__(self) -> None:
        check_int(self.name, "top_k", self.top_k, 2)
        check_int(self.name, "dense_layers", self.dense_layers, 0)
        check_int(self.name, "reselect_layer", self.reselect_layer, -1)

    @classmethod
    def for_budget(cls, tokens: int) -> "TidalDecode":
        """``tokens`` read per query head and step on the sparse layers (the current token included)."""
        return cls(top_k=max(2, tokens))

    def check_model(self, model: torch.nn.Module, max_positions: int | None) -> None:
        super().check_model(model, max_positions)
        from attnkit.session import text_config

        layers = text_config(model).num_hidden_layers
        for field in ("dense_layers", "reselect_layer"):
            value = getattr(self, field)
            if value >= layers:
                raise ValueError(
                    f"{self.name}: {field}={value} is invalid for a model of {layers} layers; accepted: an integer "
                    f"in [{-1 if field == 'reselect_layer' else 0}, {layers - 1}]"
                )

    def roles(self, run) -> dict[int, str]:
        """Global layer index -> "dense", "select" or "sparse" (computed once per run)."""
        cached = run.shared.get(f"{STATE}:roles")
        if cached is not None:
            return cached
        own = [i for i, t in enumerate(run.layer_types) if t != "sliding_attention"]
        roles = {i: "dense" for i in own}
        later = [i for i in own if i >= self.dense_layers]
        if later:
            roles[later[0]] = "select"
            for i in later[1:]:
                roles[i] = "sparse"
            again = [i for i in later[1:] if self.reselect_layer >= 0 and i >= self.reselect_layer]
            if again:
                roles[again[0]] = "select"
        run.shared[f"{STATE}:roles"] = roles
        return roles

    def attend(self, run, module, layer: KVLayer, query, key, value, scaling: float, softcap) -> torch.Tensor:
        role = self.roles(run)[layer.layer_idx]
        if query.shape[2] > 1 or softcap is not None or role == "dense":
            return attend_layer(run, layer, query, key, value, scaling, softcap)
        if role == "select":
            idx = head_slots(query, layer, self.top_k, scaling)  # before attend_layer: it may compact
            run.shared[STATE] = idx
            return attend_layer(run, layer, query, key, value, scaling, softcap)
        out = attend_slots(query, layer, run.shared[STATE], scaling)
        if layer.static:
            layer.static_after()
            return out
        if run.recorder is not None:
            run.recorder(dict(layer=layer.layer_idx, query=query, key=key, value=value,
                              mask=head_read_mask(run.shared[STATE], layer, layer.n), scaling=scaling, out=out))
        layer.compact()
        return out
