"""FASA: score tokens on each head's dominant RoPE frequency chunks only, attend exactly to the top ones."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from attnkit import kernels
from attnkit.hf.attention import attend_layer
from attnkit.hf.cache import KVLayer
from attnkit.methods.base import LayerContext, Method, check_choice, check_int
from attnkit.methods.read.tidaldecode import attend_slots, head_read_mask

NEG_INF = float("-inf")
PAIRINGS = ("rope", "code")


def chunk_dims(chunks: torch.Tensor, head_dim: int, pairing: str) -> torch.Tensor:
    """(..., F) frequency-chunk ids -> (..., 2F) dims. "rope": HF's rotate-half layout pairs dims (f, f + D/2),
    the paper's frequency chunk; "code": the official code's adjacent pairs (2f, 2f + 1)."""
    if pairing == "rope":
        return torch.cat([chunks, chunks + head_dim // 2], dim=-1)
    return torch.stack([2 * chunks, 2 * chunks + 1], dim=-1).flatten(-2)


def chunk_scores(q: torch.Tensor, k: torch.Tensor, pairing: str) -> torch.Tensor:
    """Per-chunk partial q.k: q (B, H, D), k (B, H, n, D) -> (B, H, D/2, n) float32 (they sum to q.k)."""
    d = q.shape[-1]
    prod = q.float().unsqueeze(-2) * k.float()  # (B, H, n, D)
    if pairing == "rope":
        per = prod[..., : d // 2] + prod[..., d // 2 :]
    else:
        per = prod[..., 0::2] + prod[..., 1::2]
    return per.transpose(-1, -2)


def load_profile(path: str | Path) -> dict:
    """A FASA calibration profile (JSON from ``attnkit calibrate fasa``), checked for its fields."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"fasa: profile {str(path)!r} not found; make one with `attnkit calibrate fasa --model ... "
                         "-o profile.json`") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"fasa: profile {str(path)!r} is not a readable JSON profile ({exc})") from None
    need = ("method", "head_dim", "pairing", "budgets", "layers", "agreement")
    if not isinstance(data, dict) or data.get("method") != "fasa" or any(k not in data for k in need):
        raise ValueError(f"fasa: {str(path)!r} is not a FASA profile; accepted: JSON with fields {', '.join(need)}")
    return data


class FASALayer(KVLayer):
    """The full cache plus, per query head, the frequency chunks its scores use: chunks (H, F) long from a
    profile, or (B, H, F) per row from the prompt (fallback)."""

    def __init__(self, layer_idx: int, run, chunks: torch.Tensor | None) -> None:
        super().__init__(layer_idx, run)
        self.chunks = chunks  # None: chosen from the prompt (uncalibrated fallback)


@dataclass
class FASA(Method):
    """Find each head's top tokens from a few frequency chunks of q.k, then attend exactly to them.

    Paper: FASA, ICLR 2026 (https://arxiv.org/abs/2602.03152; AMAP-ML/FASA-ICLR2026). RoPE splits q.k into D/2
    frequency chunks (FCs); for each head a few calibrated "dominant" chunks reproduce the top-K set of the full
    product ("contextual agreement"), so scoring with those dimensions only finds the tokens worth reading.

    Decode steps on global layers >= ``dense_layers`` (the paper: layer 0 dense; prefill dense): per query head,
    s = q_sel . K_sel over the ``chunks`` calibrated FCs (no scaling), the top ``budget`` tokens, exact attention
    over them (gathered per query head). No sink or local tokens are forced, as in the paper. The FCs come from
    ``profile``, a JSON written by ``attnkit calibrate fasa`` (per budget, layer, head and FC: the agreement
    |TopK(q.K) & TopK(q_f.K_f)| / K averaged over the decode steps of a calibration run; the run's budget takes
    the calibrated budget nearest to it). ``pairing``: "rope" pairs dims (i, i + D/2), the frequency chunks of
    HF's rotate-half layout (the paper's math); "code" pairs (2i, 2i + 1) as the official code does (it
    reproduces the reported numbers on its models, but on HF-layout models those are not frequency pairs).
    How we differ: without a profile, each head takes the chunks with the largest |q_f| * mean |k_f| at the
    prompt's last query (an uncalibrated fallback, not the paper's method); the scoring pass reads the whole
    key rows with the other dims of q zeroed (same selection, no bandwidth saving: on CUDA it is TokenSelect's
    scoring kernel, one read of every key per layer and step; a dims-gathering layout is not built).
    Shapes: chunks (H, F); selection (B, H, budget) slot ids.
    """

    name = "fasa"
    summary = "top tokens per head from calibrated dominant RoPE frequency chunks, exact attention on them"
    paper = "https://arxiv.org/abs/2602.03152"
    kind = "read"

    budget: int = 256
    chunks: int = 16
    profile: str = ""
    pairing: str = "rope"
    dense_layers: int = 1

    def __post_init__(self) -> None:
        check_int(self.name, "budget", self.budget, 1)
        check_int(self.name, "chunks", self.chunks, 1)
        check_choice(self.name, "pairing", self.pairing, PAIRINGS)
        check_int(self.name, "dense_layers", self.dense_layers, 0)
        if not isinstance(self.profile, str):
            raise ValueError(f"{self.name}: profile={self.profile!r} is invalid; accepted: a path to a JSON profile")
        self._profile = load_profile(self.profile) if self.profile else None

    @classmethod
    def for_budget(cls, tokens: int) -> "FASA":
        """``tokens`` read per query head and step (the paper's budget)."""
        return cls(budget=max(1, tokens))

    def check_model(self, model: torch.nn.Module, max_positions: int | None) -> None:
        super().check_model(model, max_positions)
        from attnkit.session import text_config

        cfg = text_config(model)
        d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        if self.chunks > d // 2:
            raise ValueError(f"{self.name}: chunks={self.chunks} is invalid for head_dim {d}; accepted: an integer "
                             f"in [1, {d // 2}]")
        p = self._profile
        if p is not None:
            if p["head_dim"] != d or p["pairing"] != self.pairing:
                raise ValueError(f"{self.name}: profile {self.profile!r} was calibrated for head_dim {p['head_dim']}, "
                                 f"pairing {p['pairing']!r}; this run has head_dim {d}, pairing {self.pairing!r}")
            heads = cfg.num_attention_heads
            shapes = {(len(layer), len(layer[0])) for per_budget in p["agreement"] for layer in per_budget}
            if shapes != {(heads, d // 2)}:
                raise ValueError(f"{self.name}: profile {self.profile!r} holds agreement tables of shape {shapes}; "
                                 f"accepted: ({heads} heads, {d // 2} chunks) per layer")

    def layer_chunks(self, layer_idx: int) -> torch.Tensor | None:
        """(H, F) chunk ids for a layer from the profile (None without a profile)."""
        p = self._profile
        if p is None:
            return None
        if layer_idx not in p["layers"]:
            raise ValueError(f"{self.name}: profile {self.profile!r} has no entry for layer {layer_idx}; "
                             f"it covers layers {p['layers']}")
        b = min(range(len(p["budgets"])), key=lambda i: abs(p["budgets"][i] - self.budget))
        table = torch.tensor(p["agreement"][b][p["layers"].index(layer_idx)])  # (H, D/2)
        return table.topk(self.chunks, dim=-1).indices.sort(dim=-1).values

    def make_layer(self, ctx: LayerContext) -> KVLayer:
        if ctx.layer_idx < self.dense_layers:
            return KVLayer(ctx.layer_idx, ctx.run)
        return FASALayer(ctx.layer_idx, ctx.run, self.layer_chunks(ctx.layer_idx))

    def attend(self, run, module, layer: KVLayer, query, key, value, scaling: float, softcap) -> torch.Tensor:
        if not isinstance(layer, FASALayer) or softcap is not None:
            return attend_layer(run, layer, query, key, value, scaling, softcap)
        if query.shape[2] > 1:
            out = attend_layer(run, layer, query, key, value, scaling, softcap)
            if self._profile is None:  # fallback: the chunks with the most |q_f| * mean |k_f| at the last query
                layer.chunks = self.fallback_chunks(query[:, :, -1], layer)
            return out
        if layer.chunks is None:  # a one-token prompt: choose from this query
            layer.chunks = self.fallback_chunks(query[:, :, -1], layer)
        idx = self.select(query, layer)
        out = attend_slots(query, layer, idx, scaling)
        if layer.static:
            layer.static_after()
            return out
        if run.recorder is not None:
            run.recorder(dict(layer=layer.layer_idx, query=query, key=key, value=value,
                              mask=head_read_mask(idx, layer, layer.n), scaling=scaling, out=out))
        layer.compact()
        return out

    def fallback_chunks(self, q: torch.Tensor, layer: FASALayer) -> torch.Tensor:
        """(B, H, F) chunks with the largest |q_f| * mean_j |k_j,f| per row (q (B, H, D): the prompt's last query)."""
        d = q.shape[-1]
        hkv = layer.keys.shape[1]
        g = q.shape[1] // hkv
        keys = layer.keys[:, :, : layer.n].float()
        valid = (layer.pos[:, :, : layer.n] >= 0).unsqueeze(-1)
        per_dim = (keys.abs() * valid).sum(2) / valid.sum(2).clamp_min(1)  # (B, Hkv, D)
        if self.pairing == "rope":
            qn = q.float()[..., : d // 2].hypot(q.float()[..., d // 2 :])
            kn = per_dim[..., : d // 2].hypot(per_dim[..., d // 2 :])
        else:
            qn = q.float()[..., 0::2].hypot(q.float()[..., 1::2])
            kn = per_dim[..., 0::2].hypot(per_dim[..., 1::2])
        weight = qn * kn.repeat_interleave(g, dim=1)  # (B, H, D/2)
        return weight.topk(self.chunks, dim=-1).indices.sort(dim=-1).values

    def select(self, query: torch.Tensor, layer: FASALayer) -> torch.Tensor:
        """(B, H, budget) slots per query head by q.k over its chunks' dims (-1 past a short row's tokens)."""
        d = query.shape[-1]
        span = layer.span if layer.static else layer.n
        chunks = layer.chunks.to(query.device)
        chunks = chunks if chunks.ndim == 3 else chunks.unsqueeze(0)  # (B or 1, H, F)
        dims = chunk_dims(chunks, d, self.pairing)  # (B or 1, H, 2F)
        keep = torch.zeros((*dims.shape[:2], d), dtype=query.dtype, device=query.device).scatter_(2, dims, 1)
        q_sel = query * keep.unsqueeze(2)  # (B, H, 1, D), other dims zeroed
        scores = kernels.head_scores(q_sel, layer.keys, layer.pos, 0, layer.count, span)  # (B, H, span) fp32
        best, top = scores.topk(min(self.budget, span), dim=-1, sorted=False)  # the read needs no order
        return top.masked_fill(best == NEG_INF, -1)
