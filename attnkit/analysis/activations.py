"""Massive activations (Sun et al., "Massive Activations in Large Language Models", arXiv 2402.17762, COLM 2024)
and cosine similarity to the first token (the AVSR sink diagnostics, arXiv 2510.22603).

Massive activation (Sun et al.): an entry of a layer's output hidden state with |a| > 100 and about 1000x the
median |a| of that hidden state (median over every token and feature of the windows, as the official
``main_llm.py --exp2`` takes ``torch.median`` of the whole layer output). For each flagged entry the source is the
largest of three parts of h_l = h_{l-1} + attention + MLP (:mod:`attnkit.analysis.residual`): "carried" (already
in the residual), "attention" or "mlp". Sun et al. find them at fixed feature indices, on the first token and on
delimiter tokens, created by one early layer's MLP and carried afterwards.

Cosine to first: c_l[t] = cos(h_l[:, 0], h_l[:, t]), averaged over samples; tokens t > 0 with c_l[t] above a
threshold are candidate intermediate sinks. Differences from the papers: essay windows instead of RedPajama /
their datasets; everything in float32.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnkit.analysis.inputs import essay_windows, token_strings
from attnkit.analysis.residual import record_residual

SOURCES = ("carried", "attention", "mlp")


def flag_massive(hidden: torch.Tensor, threshold: float = 100.0, ratio: float = 1000.0) -> tuple[torch.Tensor, float]:
    """Sun et al.'s criterion on one layer's hidden state (..., d): bool mask of |a| > threshold and
    |a| >= ratio * median |a| (median over all entries), and that median."""
    mag = hidden.float().abs()
    median = float(mag.median())
    return (mag > threshold) & (mag >= ratio * median), median


@dataclass
class MassiveActivations:
    """Per layer (output of decoder layer l): ``layers[l]`` holds max, median, top3, n_flagged, features
    ({feature index: count}), tokens ({token index: count}), sources ({carried|attention|mlp: count}), entries
    (the largest flagged entries: sample, token, feature, value, carried, attention, mlp, source, text) and
    residual_error (max |h_l - h_{l-1} - attention - MLP| / max |h_l|)."""

    layers: list[dict]
    threshold: float
    ratio: float

    @property
    def massive_layers(self) -> list[int]:
        return [i for i, s in enumerate(self.layers) if s["n_flagged"]]

    def feature_indices(self) -> dict[int, int]:
        """Feature index -> number of layers in which it is flagged."""
        out: Counter = Counter()
        for s in self.layers:
            out.update(s["features"].keys())
        return dict(out.most_common())

    def repeated_features(self, min_entries: int = 2) -> list[int]:
        """Features flagged at >= ``min_entries`` (sample, token) entries within some layer: fixed indices."""
        return sorted({f for s in self.layers for f, c in s["features"].items() if c >= min_entries})

    def to_dict(self) -> dict:
        return {"threshold": self.threshold, "ratio": self.ratio, "massive_layers": self.massive_layers,
                "feature_indices": {str(k): v for k, v in self.feature_indices().items()},
                "repeated_features": self.repeated_features(),
                "layers": [{**s, "features": {str(k): v for k, v in s["features"].items()},
                            "tokens": {str(k): v for k, v in s["tokens"].items()}} for s in self.layers]}


@dataclass
class CosineToFirst:
    """cos (L + 1, T): mean over samples of cos(h_l[:, 0], h_l[:, t]); row 0 is the embedding output, row l the
    output of decoder layer l - 1. ``high[l]``: the largest (sample, token, text, cos) with cos > threshold and
    t > 0; ``fraction[l]``: the share of all tokens t > 0 (over samples) above the threshold."""

    cos: torch.Tensor
    threshold: float
    high: list[list[dict]]
    fraction: list[float]

    def to_dict(self) -> dict:
        return {"threshold": self.threshold, "cos": self.cos.tolist(), "fraction": self.fraction, "high": self.high}


def _layer_stats(l_out: torch.Tensor, h_in, attn, mlp, threshold: float, ratio: float, texts, max_entries: int):
    mask, median = flag_massive(l_out, threshold, ratio)
    mag = l_out.abs()
    top3 = mag.flatten().topk(3).values.tolist()
    scale = float(mag.max()) or 1.0
    stats = {"max": float(mag.max()), "median": median, "top3": top3, "n_flagged": int(mask.sum()),
             "residual_error": float((l_out - h_in - attn - mlp).abs().max()) / scale,
             "features": {}, "tokens": {}, "sources": dict.fromkeys(SOURCES, 0), "entries": []}
    idx = mask.nonzero()  # (n, 3): sample, token, feature
    if not len(idx):
        return stats
    s, t, f = idx.unbind(1)
    parts = torch.stack([h_in[s, t, f], attn[s, t, f], mlp[s, t, f]], 1)  # (n, 3)
    src = parts.abs().argmax(1)
    stats["features"] = dict(Counter(f.tolist()).most_common())
    stats["tokens"] = dict(Counter(t.tolist()).most_common())
    stats["sources"] = {name: int((src == i).sum()) for i, name in enumerate(SOURCES)}
    order = mag[s, t, f].argsort(descending=True)[:max_entries]
    for j in order.tolist():
        si, ti, fi = int(s[j]), int(t[j]), int(f[j])
        stats["entries"].append({"sample": si, "token": ti, "feature": fi, "value": float(l_out[si, ti, fi]),
                                 "carried": float(parts[j, 0]), "attention": float(parts[j, 1]),
                                 "mlp": float(parts[j, 2]), "source": SOURCES[int(src[j])],
                                 "text": texts[si][ti] if texts else ""})
    return stats


@torch.inference_mode()
def residual_analysis(model, tokenizer=None, samples: int = 4, tokens: int = 256, *, seed: int = 0,
                      threshold: float = 100.0, ratio: float = 1000.0, cos_threshold: float = 0.5,
                      max_entries: int = 32, ids: torch.Tensor | None = None
                      ) -> tuple[MassiveActivations, CosineToFirst]:
    """Massive activations and cosine-to-first from one forward over ``samples`` essay windows of ``tokens``."""
    if ids is None:
        if tokenizer is None:
            raise ValueError("residual_analysis needs a tokenizer (or ids=)")
        ids = essay_windows(tokenizer, samples, tokens, seed + 1)
    texts = [token_strings(tokenizer, row) for row in ids] if tokenizer is not None else None
    layers: list[dict] = []
    cos_rows: list[torch.Tensor] = []
    high: list[list[dict]] = []
    fraction: list[float] = []

    def cosine(h: torch.Tensor) -> None:  # h (B, T, d)
        c = F.cosine_similarity(h[:, :1], h, dim=-1)  # (B, T)
        cos_rows.append(c.mean(0).cpu())
        above = (c[:, 1:] > cos_threshold).nonzero()
        order = c[:, 1:][above[:, 0], above[:, 1]].argsort(descending=True)[:max_entries]
        high.append([{"sample": int(above[j, 0]), "token": int(above[j, 1]) + 1,
                      "text": texts[int(above[j, 0])][int(above[j, 1]) + 1] if texts else "",
                      "cos": float(c[above[j, 0], above[j, 1] + 1])} for j in order.tolist()])
        fraction.append(len(above) / max(1, c[:, 1:].numel()))

    def on_layer(idx: int, h_in, attn, mlp, h_out) -> None:
        if idx == 0:
            cosine(h_in)
        cosine(h_out)
        layers.append(_layer_stats(h_out, h_in, attn, mlp, threshold, ratio, texts, max_entries))

    record_residual(model, ids, on_layer)
    return MassiveActivations(layers, threshold, ratio), CosineToFirst(torch.stack(cos_rows), cos_threshold, high,
                                                                        fraction)


def massive_activations(model, tokenizer=None, samples: int = 4, tokens: int = 256, **kw) -> MassiveActivations:
    """Sun et al.'s massive activations per decoder layer with their source; see :func:`residual_analysis`."""
    return residual_analysis(model, tokenizer, samples, tokens, **kw)[0]


def cosine_to_first(model, tokenizer=None, samples: int = 4, tokens: int = 256, **kw) -> CosineToFirst:
    """cos(h_l[:, 0], h_l[:, t]) per layer, mean over samples, with the high-similarity tokens."""
    return residual_analysis(model, tokenizer, samples, tokens, **kw)[1]
