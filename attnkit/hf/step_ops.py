"""Opaque custom ops for compiled decode steps: attnkit's cache write and attention as two calls torch.compile
does not look inside.

``attnkit.generate(..., compile=True)`` runs each fixed-shape decode step through ``torch.compile``. The compiler
should fuse the model's own ops (norms, RoPE, residual adds, the MLP's activation), not attnkit's: those already
run as fused kernels, write cache buffers in place (which the compiler would functionalise, possibly as copies of
a whole buffer per step) and read host-side method state (phases, flags) that must not become guards. So inside
a trace the cache's ``update`` and the attention function call :func:`step_write` and :func:`step_attend`, which
run the same eager code the uncompiled step runs. The step's tensors carry the order: ``step_write`` returns an
empty token that ``step_attend`` takes. A cache takes this route only while registered (:func:`register`), i.e.
while a compiled :class:`~attnkit.graphs.StaticDecoder` owns it; the objects are found by ``id`` (ints are what
a custom op's schema can carry).
"""

from __future__ import annotations

import torch

#: id(cache) -> cache, for the caches of compiled decoders alive now
_LIVE: dict[int, object] = {}


def register(cache) -> int:
    """Let ``cache`` take the opaque route inside traces; returns its handle (also set as ``cache.step_handle``)."""
    handle = id(cache)
    _LIVE[handle] = cache
    cache.step_handle = handle
    cache.step_kv = {}
    return handle


def unregister(cache) -> None:
    _LIVE.pop(getattr(cache, "step_handle", None), None)
    cache.step_handle = None


def _cache(handle: int):
    cache = _LIVE.get(handle)
    if cache is None:
        raise RuntimeError("attnkit: a compiled step ran over a cache no compiled decoder owns; compile decode steps "
                           "through attnkit.generate(..., compile=True)")
    return cache


@torch.library.custom_op("attnkit::step_write", mutates_args=())
def step_write(key_states: torch.Tensor, value_states: torch.Tensor, handle: int, layer_idx: int) -> torch.Tensor:
    """The cache's update of layer ``layer_idx`` (B, Hkv, 1, D) -> an empty token that orders the attention after
    it (the stored states wait in ``cache.step_kv``)."""
    from transformers.cache_utils import Cache

    cache = _cache(handle)
    cache.step_kv[layer_idx] = Cache.update(cache, key_states, value_states, layer_idx)
    return key_states.new_empty(0)


@step_write.register_fake
def _(key_states, value_states, handle, layer_idx):
    return key_states.new_empty(0)


@torch.library.custom_op("attnkit::step_attend", mutates_args=())
def step_attend(
    query: torch.Tensor, token: torch.Tensor, handle: int, layer_idx: int, scaling: float, softcap: float | None
) -> torch.Tensor:
    """The active method's attention of layer ``layer_idx``: query (B, H, 1, D) -> (B, H, 1, D)."""
    cache = _cache(handle)
    run = cache.run
    layer = run.current.pop(layer_idx)
    key, value = cache.step_kv.pop(layer_idx)
    out = run.attend(None, layer, query, key, value, scaling, softcap)
    # a custom op's output may not alias its inputs
    return out.clone() if out.untyped_storage().data_ptr() == query.untyped_storage().data_ptr() else out


@step_attend.register_fake
def _(query, token, handle, layer_idx, scaling, softcap):
    return torch.empty_like(query)
