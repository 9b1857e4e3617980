"""Attention probability maps of chosen layers and heads, for plots."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit.analysis.capture import layer_probs, record_prefill, softcap_of
from attnkit.analysis.inputs import token_strings
from attnkit.session import text_config


@dataclass
class AttentionMaps:
    """probs (len(layers), len(heads), T, T) float32 causal probabilities; tokens: the T input pieces."""

    probs: torch.Tensor
    layers: list[int]
    heads: list[int]
    tokens: list[str]

    def to_dict(self) -> dict:
        return {"layers": self.layers, "heads": self.heads, "tokens": self.tokens, "probs": self.probs.tolist()}


def check_indices(name: str, values, n: int) -> list[int]:
    out = [int(v) for v in values]
    if not out or min(out) < 0 or max(out) >= n:
        raise ValueError(f"{name}={list(values)!r} is invalid; accepted: indices in [0, {n - 1}]")
    return out


@torch.inference_mode()
def attention_maps(model, tokenizer, text_or_ids: str | list[int] | torch.Tensor, layers, heads) -> AttentionMaps:
    """Float32 attention probabilities of query heads ``heads`` in layers ``layers`` on one input.

    ``text_or_ids``: a string (tokenised with the tokenizer's default special tokens), a list of ids or a (T,) /
    (1, T) id tensor. Keep T small (a few hundred): every map is T x T.
    """
    cfg = text_config(model)
    layers = check_indices("layers", layers, cfg.num_hidden_layers)
    heads = check_indices("heads", heads, cfg.num_attention_heads)
    if isinstance(text_or_ids, str):
        ids = torch.tensor([tokenizer(text_or_ids).input_ids])
    else:
        ids = torch.as_tensor(text_or_ids, dtype=torch.long).reshape(1, -1)
    if ids.shape[1] == 0:
        raise ValueError("attention_maps: the input is empty")
    out = torch.zeros(len(layers), len(heads), ids.shape[1], ids.shape[1])
    softcap = softcap_of(model)

    def on_layer(layer: int, query, key, mask, scaling: float) -> None:
        if layer in layers:
            p = layer_probs(query, key, mask, scaling, softcap)[0]  # (H, T, T)
            out[layers.index(layer)] = p[heads].cpu()

    record_prefill(model, ids, on_layer)
    return AttentionMaps(out, layers, heads, token_strings(tokenizer, ids[0]))
