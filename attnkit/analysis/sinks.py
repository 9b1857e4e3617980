"""The attention-sink metric of "When Attention Sink Emerges in Language Models" (arXiv 2410.10781, ICLR 2025).

Official code: sail-sg/Attention-Sink ``eval_sink_open_source.py``. Per sample, layer and query head, with A the
(T, T) causal attention probabilities of a T-token prefill:

    alpha_k = sum_{i >= k} A[i, k] / (T - k)      (mean attention key k receives from the queries that see it)
    Sink_k^eps = % of (sample, layer, query head) with alpha_k > eps

The paper indexes tokens from 1 and reports Sink_1 (the first token); here indices are 0-based, so the headline is
``sink_pct[0]``. Index 0 is BOS where the tokenizer prepends one (Gemma); SmolLM2's tokenizer adds none, so there
index 0 is an ordinary essay token and the number measures a first-position sink, not a BOS sink
(:attr:`SinkMetric.first_is_bos` says which).

How this differs from the official code: probabilities are recomputed in float32 from the rotated q and k of a
dense prefill (:mod:`attnkit.analysis.capture`), not read from ``output_attentions``; inputs are T-token windows of
the bundled Paul Graham essays at seeded offsets (the paper: 100 text samples, each truncated to 64 tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit.analysis.capture import is_sliding, layer_probs, progress_bar, record_prefill, softcap_of
from attnkit.analysis.inputs import essay_windows, prepends_bos
from attnkit.session import text_config


@dataclass
class SinkMetric:
    """Result of :func:`sink_metric`.

    Attributes
    ----------
    alpha : (S, L, H, K) alpha_k of every sample, layer and query head for the key indices :attr:`ks`
    alpha_mean : (L, H, T) alpha_k for every key index, averaged over samples
    ks : the key indices (0-based) of ``alpha``
    eps : the threshold
    first_is_bos : True when index 0 is the tokenizer's BOS token
    sliding : per layer, True for the model's own sliding-window layers
    """

    alpha: torch.Tensor
    alpha_mean: torch.Tensor
    ks: tuple[int, ...]
    eps: float
    first_is_bos: bool
    sliding: list[bool]

    @property
    def sink_pct(self) -> dict[int, float]:
        """k -> Sink_k^eps in percent of (sample, layer, query head)."""
        return {k: 100 * float((self.alpha[..., j] > self.eps).float().mean()) for j, k in enumerate(self.ks)}

    def per_layer_pct(self) -> torch.Tensor:
        """(L, K): Sink_k^eps within each layer (percent of samples x heads)."""
        return 100 * (self.alpha > self.eps).float().mean((0, 2))

    def per_head_alpha(self, k: int = 0) -> torch.Tensor:
        """(L, H): alpha_k averaged over samples."""
        return self.alpha_mean[:, :, k]

    def to_dict(self) -> dict:
        return {"eps": self.eps, "ks": list(self.ks), "first_is_bos": self.first_is_bos,
                "samples": self.alpha.shape[0], "tokens": self.alpha_mean.shape[-1],
                "sink_pct": {str(k): v for k, v in self.sink_pct.items()},
                "per_layer_pct": self.per_layer_pct().tolist(), "alpha0_per_head": self.per_head_alpha(0).tolist(),
                "alpha_mean_by_key": self.alpha_mean.mean((0, 1)).tolist(), "sliding_layers": self.sliding}


def alpha_from_probs(probs: torch.Tensor) -> torch.Tensor:
    """(..., T, T) causal probabilities -> (..., T): alpha_k = sum_i A[i, k] / (T - k)."""
    t = probs.shape[-1]
    return probs.sum(-2) / torch.arange(t, 0, -1, device=probs.device, dtype=probs.dtype)


@torch.inference_mode()
def sink_metric(
    model: torch.nn.Module,
    tokenizer=None,
    samples: int = 100,
    tokens: int = 64,
    eps: float = 0.3,
    k: tuple[int, ...] = (0, 1, 2, 3),
    *,
    seed: int = 0,
    batch: int = 20,
    ids: torch.Tensor | None = None,
    progress: bool = False,
) -> SinkMetric:
    """Sink_k^eps and alpha_k per (layer, query head) over essay windows (or the given ``ids`` (S, T)).

    Parameters
    ----------
    model, tokenizer : the model and its tokenizer (the tokenizer is only needed when ``ids`` is None)
    samples, tokens : S windows of T tokens (the paper: 100 x 64)
    eps : the threshold on alpha_k (the paper: 0.3)
    k : 0-based key indices to count sinks at (0 = first token)
    seed : seed of the window offsets
    batch : windows per forward
    ids : (S, T) inputs to use instead of essay windows (no padding)
    """
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 <= eps <= 1:
        raise ValueError(f"eps={eps!r} is invalid; accepted: a number in [0, 1]")
    if ids is None:
        if tokenizer is None:
            raise ValueError("sink_metric needs a tokenizer (or ids=)")
        ids = essay_windows(tokenizer, samples, tokens, seed)
    n_samples, t = ids.shape
    ks = tuple(int(x) for x in k)
    if not ks or min(ks) < 0 or max(ks) >= t:
        raise ValueError(f"k={k!r} is invalid; accepted: key indices in [0, {t - 1}]")
    cfg = text_config(model)
    n_layers, n_heads = cfg.num_hidden_layers, cfg.num_attention_heads
    alpha = torch.zeros(n_samples, n_layers, n_heads, len(ks))
    alpha_sum = torch.zeros(n_layers, n_heads, t, dtype=torch.float64)
    softcap = softcap_of(model)
    chunks = list(torch.arange(n_samples).split(batch))
    bar = progress_bar(len(chunks) * n_layers, f"sink metric ({n_samples} x {t} tokens)", progress)
    try:
        for rows in chunks:
            def on_layer(layer: int, query, key, mask, scaling: float, rows=rows) -> None:
                a = alpha_from_probs(layer_probs(query, key, mask, scaling, softcap)).cpu()  # (B, H, T)
                alpha[rows, layer] = a[:, :, list(ks)]
                alpha_sum[layer] += a.sum(0).double()
                if bar is not None:
                    bar.update(1)

            record_prefill(model, ids[rows], on_layer)
    finally:
        if bar is not None:
            bar.close()
    first_is_bos = tokenizer is not None and prepends_bos(tokenizer) and int(ids[0, 0]) == tokenizer.bos_token_id
    return SinkMetric(alpha, (alpha_sum / n_samples).float(), ks, float(eps), bool(first_is_bos), is_sliding(model))
