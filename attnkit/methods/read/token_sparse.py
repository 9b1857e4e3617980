"""Token Sparse Attention: per-head token sets on chosen layers during prefill, attention on the compacted
sequence, output scattered back (dropped tokens live on through the residual stream)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnkit.hf.attention import attend_layer
from attnkit.hf.cache import KVLayer
from attnkit.kernels.sparse_prefill import causal_pairs, causal_visibility, compact_attention, compact_mask
from attnkit.methods.base import Method, check_float, check_int, load_json_profile
from attnkit.methods.read.zerotuning import parse_indices
from attnkit.reference import attention_probs

NEG_INF = float("-inf")


def load_drift(path: str) -> dict:
    """A drift profile (JSON from ``attnkit calibrate token_sparse``): num_layers and drift per layer."""
    p = load_json_profile("token_sparse", path, ("num_layers", "drift"))
    if not isinstance(p["drift"], list) or p["num_layers"] != len(p["drift"]):
        raise ValueError(f"token_sparse: {path!r} is not a drift profile; accepted: JSON with fields num_layers and "
                         "drift (one number per layer)")
    return p


def token_scores(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, qpos: torch.Tensor, kpos: torch.Tensor,
                 cand: torch.Tensor, window: int, kernel: int, scaling: float) -> torch.Tensor:
    """(B, H, n) importance of every candidate slot per query head: the mean softmax probability (over all keys)
    the chunk's last ``window`` queries give it, average-pooled over ``kernel`` slots with non-candidates (the
    window itself, padding) counting as zeros, as the official code pools the prefix alone. query (B, H, q, D);
    qpos (B, q), kpos (B, n) positions; cand (B, n) bool."""
    m = causal_visibility(qpos[:, -window:], kpos)  # the window's rows only: no (q, n) mask
    probs, _ = attention_probs(query[:, :, -window:], key, m, scaling)  # (B, H, w, n)
    b, h, _, n = probs.shape
    s = probs.mean(2) * cand.unsqueeze(1)
    pooled = F.avg_pool1d(s.reshape(b * h, 1, n), kernel, 1, kernel // 2, count_include_pad=True)
    return pooled.view(b, h, n)


def keep_counts(scores: torch.Tensor, candidates: torch.Tensor, tau: float, min_tokens: int) -> torch.Tensor:
    """(B,) tokens each row keeps among its candidates: the layer's head-mean scores, normalised over the
    candidates and sorted ascending; the tokens whose cumulative mass stays below ``tau`` are dropped (at least
    ``min_tokens`` kept; as in the official code one more is dropped whenever any is). scores (B, H, n);
    candidates (B, n) bool."""
    s = scores.mean(1).masked_fill(~candidates, 0.0)
    s = s / s.sum(-1, keepdim=True).clamp_min(1e-30)
    cum = s.masked_fill(~candidates, float("inf")).sort(-1).values.cumsum(-1)  # non-candidates sort last
    drop = (cum < tau).sum(-1)
    drop = drop + (drop > 0).long()
    n_cand = candidates.sum(-1)
    return torch.maximum(torch.minimum(n_cand, torch.full_like(n_cand, min_tokens)), n_cand - drop)


@dataclass
class TokenSparse(Method):
    """Token Sparse Attention: sparse prefill on chosen layers by per-head token sets.

    Paper: Jo et al. 2026, ICML (https://arxiv.org/abs/2602.03216; dongwonjo/Token-Sparse-Attention). On a
    sparse layer, a prefill chunk scores every stored token per query head by the mean softmax probability the
    chunk's last ``window`` queries give it (average-pooled, ``kernel``); the layer drops the lowest tokens
    (head-mean scores, normalised) whose cumulative mass stays below ``tau``, keeping at least ``min_tokens``;
    each query head then keeps its own top tokens plus the last ``window`` positions, gathers Q, K and V for
    them, runs causal attention on the compacted sequence and scatters the output back: a dropped token's
    attention update is zero, its hidden state survives through the residual, so later layers can select it
    again. The KV cache stores every token; decode steps are dense.

    Sparse layers: ``layers`` (indices such as "12-29") or, from a drift profile (``attnkit calibrate
    token_sparse``), the global layers whose representation drift R_l = mean over tokens of
    ||h_out - h_in|| / ||h_in|| across the decoder layer is at most its ``delta`` quantile; with neither, the
    second half of the layers (the official code's fallback).
    How we differ: the scores come from the float32 reference attention of the last ``window`` queries (the
    paper's two-pass kernel computes the same probabilities); with chunked prefill each chunk selects over
    every token stored so far, its own queries and the earlier chunks' keys. Shapes: scores (B, H, n), token
    sets (B, H, keep + window) slot ids.
    """

    name = "token_sparse"
    summary = "per-head token sets on chosen layers in prefill, compacted attention, output scattered back"
    paper = "https://arxiv.org/abs/2602.03216"
    kind = "read"

    tau: float = 0.005
    window: int = 128
    kernel: int = 7
    min_tokens: int = 1024
    layers: str = ""
    delta: float = 0.5
    profile: str = ""

    def __post_init__(self) -> None:
        check_float(self.name, "tau", self.tau, 0.0, 1.0)
        check_int(self.name, "window", self.window, 1)
        check_int(self.name, "kernel", self.kernel, 1)
        if self.kernel % 2 == 0:
            raise ValueError(f"{self.name}: kernel={self.kernel} is invalid; accepted: an odd integer >= 1")
        check_int(self.name, "min_tokens", self.min_tokens, 0)
        check_float(self.name, "delta", self.delta, 0.0, 1.0)
        self._layers = parse_indices(self.name, "layers", self.layers) if self.layers not in ("", "auto") else None
        self._drift = load_drift(self.profile) if self.profile else None

    @classmethod
    def for_budget(cls, tokens: int) -> "TokenSparse":
        """``tokens`` kept at least per sparse layer and head (min_tokens)."""
        return cls(min_tokens=max(0, tokens))

    def check_model(self, model: torch.nn.Module, max_positions: int | None) -> None:
        super().check_model(model, max_positions)
        from attnkit.session import text_config

        n = text_config(model).num_hidden_layers
        if self._drift is not None and self._drift["num_layers"] != n:
            raise ValueError(f"{self.name}: profile {self.profile!r} holds {self._drift['num_layers']} layers; this "
                             f"model has {n}")
        bad = [i for i in self._layers or [] if i >= n]
        if bad:
            raise ValueError(f"{self.name}: layers={self.layers!r} names layer {bad[0]}; accepted: indices in "
                             f"[0, {n - 1}]")

    def sparse_layers(self, run) -> list[int]:
        """Global-attention layers this run sparsifies (computed once per run)."""
        key = f"{self.name}:layers"
        if key not in run.shared:
            own = [i for i, t in enumerate(run.layer_types) if t != "sliding_attention"]
            if self._layers is not None:
                chosen = set(self._layers) & set(own)
            elif self._drift is not None:
                drift = torch.tensor([self._drift["drift"][i] for i in own], dtype=torch.float64)
                cut = torch.quantile(drift, self.delta)
                chosen = {i for i, r in zip(own, drift.tolist()) if r <= cut}
            else:
                chosen = set(own[len(own) // 2 :])
            run.shared[key] = sorted(chosen)  # a list: cache files save it as JSON
        return run.shared[key]

    def select(self, layer: KVLayer, query, key, value, scaling: float) -> tuple[torch.Tensor, int] | None:
        """(B, H, k) ascending slot ids per query head (-1 first for rows keeping fewer) and the most kept
        queries of any (row, head); None when the layer stays dense for this chunk."""
        b, h, q, _ = query.shape
        n = key.shape[2]
        w = min(self.window, q)
        kpos = layer.stored_pos()[:, 0]  # (B, n): one layout for all heads (this method evicts nothing)
        real = kpos >= 0
        n_real = real.sum(-1)
        if int(n_real.max()) <= self.min_tokens + w:
            return None
        recent = real & (kpos >= (layer.count - w))  # (B, n): each row's last w real tokens
        cand = real & ~recent
        scores = token_scores(query, key, value, layer.qpos, kpos, cand, w, self.kernel, scaling)
        keep = keep_counts(scores, cand, self.tau, self.min_tokens)  # (B,)
        if bool((keep == cand.sum(-1)).all()):
            return None
        top = int(keep.max())
        pri = scores.masked_fill(~cand.unsqueeze(1), NEG_INF)
        best, idx = pri.topk(top, dim=-1)  # (B, H, top)
        rank = torch.arange(top, device=idx.device)
        idx = idx.masked_fill((best == NEG_INF) | (rank >= keep.view(b, 1, 1)), -1)
        slots = torch.arange(n, device=idx.device).expand(b, n)
        recent_idx = slots.masked_fill(~recent, -1).sort(-1).values[:, -w:]  # (B, w), -1 first where short
        sets = torch.cat([idx, recent_idx.unsqueeze(1).expand(b, h, w)], dim=-1).sort(-1).values
        n_query = int(((sets >= n - q)).sum(-1).max())
        return sets, max(n_query, 1)

    def attend(self, run, module, layer: KVLayer, query, key, value, scaling: float, softcap) -> torch.Tensor:
        q = query.shape[2]
        if q == 1 or softcap is not None or layer.static or layer.layer_idx not in self.sparse_layers(run):
            return attend_layer(run, layer, query, key, value, scaling, softcap)
        chosen = self.select(layer, query, key, value, scaling)
        if chosen is None:
            return attend_layer(run, layer, query, key, value, scaling, softcap)
        sets, n_query = chosen
        kpos = layer.stored_pos()[:, 0]
        out, _ = compact_attention(query, key, value, kpos, sets, n_query, scaling)
        valid = sets >= 0  # read pairs: a kept query reads the kept keys up to itself (its rank in the list + 1)
        rank = valid.long().cumsum(-1)
        read = (rank * (valid & (sets >= key.shape[2] - q))).sum()
        self.note_read(run, read, causal_pairs(layer.qpos) * query.shape[1])
        if run.recorder is not None:
            read = compact_mask(sets, key.shape[2], q, kpos, layer.qpos)
            run.recorder(dict(layer=layer.layer_idx, query=query, key=key, value=value, mask=read, scaling=scaling,
                              out=out))
        layer.compact()
        return out
