"""What every analysis reads from a dense prefill: per layer the rotated q and k and the mask each query saw.

One forward runs inside ``attnkit.apply(model, "full")`` with the run's recorder attached, so the keys are the
cache's keys (after RoPE, exactly what the model attended over), grouped-query layouts stay grouped (q has H
heads, k has Hkv), and the model's own sliding-window layers (Gemma-3) hand over their window mask. Probabilities
are recomputed in float32 with :func:`attnkit.reference.dense_attention`, never read from the model's kernel.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, Iterator

import torch

import attnkit
from attnkit.reference import dense_attention
from attnkit.session import layer_types, text_config

#: on_layer(layer_idx, query (B, H, T, D), key (B, Hkv, T, D), mask (B|1, 1|Hkv, T, T) bool or None, scaling)
LayerFn = Callable[[int, torch.Tensor, torch.Tensor, "torch.Tensor | None", float], None]
#: the attnkit method (name, settings) every analysis forward runs under; "full" unless :func:`use_method` says
_METHOD: contextvars.ContextVar[tuple[str, dict]] = contextvars.ContextVar("attnkit_analysis_method",
                                                                          default=("full", {}))


@contextlib.contextmanager
def use_method(method: str, settings: dict | None = None) -> Iterator[None]:
    """Run every analysis forward inside this block under ``attnkit.apply(model, method, **settings)``: the
    probabilities measured are then those the method lets each query see (e.g. StreamingLLM's window)."""
    token = _METHOD.set((method, dict(settings or {})))
    try:
        yield
    finally:
        _METHOD.reset(token)


def active_method() -> tuple[str, dict]:
    return _METHOD.get()


def softcap_of(model: torch.nn.Module) -> float | None:
    """The model's attention-logit soft-capping (Gemma-2), None for models without it (Llama, Gemma-3)."""
    return getattr(text_config(model), "attn_logit_softcapping", None)


def is_sliding(model: torch.nn.Module) -> list[bool]:
    """Per layer: True for the model's own sliding-window layers."""
    return [t == "sliding_attention" for t in layer_types(text_config(model))]


@torch.inference_mode()
def record_prefill(model: torch.nn.Module, ids: torch.Tensor, on_layer: LayerFn) -> None:
    """Feed ``ids`` (B, T) through ``model`` in one dense forward; ``on_layer`` sees every layer's q, k and mask.

    Runs under ``attnkit.apply(model, "full")`` (or the method of an enclosing :func:`use_method` block).
    The whole input goes in one forward (no chunking) so keys are in position order and the mask is the plain
    causal one (or the model's window). Logits are computed for the last position only: a 10K x 49K float32
    logit matrix would cost 2 GB for nothing.
    """
    ids = ids.to(next(model.parameters()).device)

    def record(r: dict) -> None:
        key = r["key"]
        if key.shape[2] != r["query"].shape[2]:  # only a cache-free single forward gives square q x k
            raise RuntimeError(f"layer {r['layer']}: expected one prefill forward, got q {tuple(r['query'].shape)} "
                               f"over k {tuple(key.shape)}")
        on_layer(r["layer"], r["query"], key, r["mask"], float(r["scaling"]))

    method, settings = active_method()
    with attnkit.apply(model, method, **settings) as run:
        run.recorder = record
        model(input_ids=ids, use_cache=True, logits_to_keep=1)


def causal_mask(rows: torch.Tensor, n: int) -> torch.Tensor:
    """(1, 1, q, n) bool: query at absolute position rows[i] sees keys 0..rows[i]."""
    return (torch.arange(n, device=rows.device)[None, :] <= rows[:, None])[None, None]


def probs_rows(
    query: torch.Tensor,
    key: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    rows: slice,
    softcap: float | None = None,
) -> torch.Tensor:
    """Float32 attention probabilities of the query rows ``rows`` over the keys they can see.

    query (B, H, T, D), key (B, Hkv, T, D), mask (B|1, 1|Hkv, T, T) or None (plain causal) -> (B, H, q, stop)
    where ``stop = rows.stop``: keys past the last row are invisible to every row under a causal mask, so they are
    left out (half the work on average when sweeping row blocks).
    """
    start, stop = rows.start or 0, rows.stop
    q = query[:, :, start:stop]
    k = key[:, :, :stop]
    if mask is None:
        m = causal_mask(torch.arange(start, stop, device=query.device), stop)
    else:
        m = mask[:, :, start:stop, :stop]
    v = k.new_zeros(k.shape[0], k.shape[1], stop, 1)  # outputs are not needed: a 1-wide value keeps p @ v free
    _, p, _ = dense_attention(q, k, v, m, scaling, softcap)
    return p


def layer_probs(query, key, mask, scaling: float, softcap: float | None = None) -> torch.Tensor:
    """(B, H, T, T) float32 probabilities of a whole (short) prefill."""
    return probs_rows(query, key, mask, scaling, slice(0, query.shape[2]), softcap)


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar, or None when progress is off."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="layer", leave=False)
