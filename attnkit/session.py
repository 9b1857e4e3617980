"""``attnkit.apply``: activate a method on a model for a ``with`` block, and restore it on exit."""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from transformers.cache_utils import Cache

from attnkit.hf import attention
from attnkit.hf.cache import AttnkitCache, KVLayer, WindowLayer
from attnkit.hf.rope import DYNAMIC_ROPE_TYPES, find_rotary, rope_types
from attnkit.methods.base import LayerContext, Method
from attnkit.registry import make_method
from attnkit.timing import AttentionTimer


def text_config(model: torch.nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def layer_types(config) -> list[str | None]:
    types = getattr(config, "layer_types", None)
    return list(types) if types else [None] * config.num_hidden_layers


class Run:
    """One activation of a method on a model: builds its caches and reports what it kept.

    Attributes
    ----------
    method : the active method instance
    cache : the most recent cache this run built (the one ``model.generate`` or ``attnkit.generate`` used)
    peak_kv_bytes : the largest KV storage any of this run's caches held after a forward
    recorder : optional callback receiving, per layer call, a dict (layer, query, key, value, mask, scaling, out):
        what was attended and the explicit (B, Hkv|1, q, n) mask of what the method let each query see (None: all)
    attention_timer : set by :meth:`time_attention`: seconds spent in attention from then on
    """

    def __init__(self, model: torch.nn.Module, method: Method) -> None:
        self.model = model
        self.method = method
        self.config = text_config(model)
        self.layer_types = layer_types(self.config)
        self.current: dict[int, KVLayer] = {}
        self.cache: AttnkitCache | None = None
        self.peak_kv_bytes = 0
        self.recorder: Callable | None = None
        self.attention_timer: AttentionTimer | None = None
        #: tokens a generation will hold (prompt + new), set by attnkit.generate: caches allocate once
        self.capacity_hint = 0
        #: state a method shares across layers and steps (e.g. a selection made on one layer, reused by later ones)
        self.shared: dict[str, Any] = {}
        #: tokens per prefill forward of that generation (attnkit.generate's prefill_chunk; 0: unknown)
        self.chunk_hint = 0
        #: (B, L) bool, the current forward's 2D attention mask when it holds padding (else None)
        self.pad_mask: torch.Tensor | None = None

    def chunk_flags(self, q: int) -> torch.Tensor | None:
        """(B, q) bool: which of the current chunk's tokens are real (None: all of them)."""
        return None if self.pad_mask is None else self.pad_mask[:, -q:]

    def note_attention_mask(self, mask: torch.Tensor | None) -> None:
        """Take the forward's 2D attention mask: padding gets position -1 in every cache layer.

        Only left padding is supported (a row's real tokens are contiguous and end at the last column); anything
        else is refused, since eviction counts on each row's newest tokens being the last slots.
        """
        if mask is None or mask.ndim != 2 or bool(mask.all()):
            self.pad_mask = None
            return
        m = mask.bool()
        # a row may have no real token yet (its padding is longer than the first prefill chunk)
        if bool((m.any(1) & ~m[:, -1]).any()) or bool((m[:, 1:] < m[:, :-1]).any()):
            raise ValueError(
                "attnkit supports left-padded batches only (each row's real tokens contiguous and last); "
                "use tokenizer.padding_side = 'left'"
            )
        self.pad_mask = m

    # -- caches ---------------------------------------------------------------------------------------------
    def new_layer(self, layer_idx: int) -> KVLayer:
        layer_type = self.layer_types[layer_idx]
        window = getattr(self.config, "sliding_window", None)
        if layer_type == "sliding_attention" and window:
            # HF semantics: a query sees itself and the sliding_window - 1 tokens before it.
            return WindowLayer(window - 1, 0, layer_idx, self)
        return self.method.make_layer(LayerContext(layer_idx, self, self.model, layer_type))

    def new_cache(self) -> AttnkitCache:
        """A fresh cache for this run; pass it as ``past_key_values=`` or let the block inject it."""
        self.cache = AttnkitCache([self.new_layer(i) for i in range(self.config.num_hidden_layers)], self)
        return self.cache

    def time_attention(self) -> AttentionTimer:
        """Time every attention call from now on (prefill chunks and decode steps apart, the method's scoring and
        selection included); ``timer.seconds()`` reads the sums. Calls inside CUDA graphs are not timed."""
        self.attention_timer = AttentionTimer()
        return self.attention_timer

    def attend(self, module, layer: KVLayer, query, key, value, scaling: float, softcap) -> torch.Tensor:
        timer = self.attention_timer
        mark = None if timer is None else timer.begin(query)
        sliding = self.layer_types[layer.layer_idx] == "sliding_attention"
        if sliding and not self.method.weighs_sliding_layers:  # the model's own window, not the method
            out = attention.attend_layer(self, layer, query, key, value, scaling, softcap)
        else:
            out = self.method.attend(self, module, layer, query, key, value, scaling, softcap)
        if mark is not None:
            timer.end(mark)
        # (a fixed-shape step holds what the prefill left: a compiled one need not trace this host bookkeeping)
        last = layer.layer_idx == self.config.num_hidden_layers - 1
        if last and self.cache is not None and not torch.compiler.is_compiling():
            self.peak_kv_bytes = max(self.peak_kv_bytes, self.cache.held_bytes())
        return out

    # -- reporting ------------------------------------------------------------------------------------------
    def kv_bytes(self) -> int:
        """Bytes of key/value storage the current cache holds (allocated buffers)."""
        return 0 if self.cache is None else self.cache.held_bytes()

    def kept_tokens(self) -> list[torch.Tensor]:
        """Per layer, a (B, Hkv) tensor of tokens held (valid slots)."""
        if self.cache is None:
            return []
        out = []
        for layer in self.cache.layers:
            if layer.pos is None:
                out.append(torch.zeros(0, dtype=torch.long))
            else:
                out.append((layer.stored_pos() >= 0).sum(-1).cpu())
        return out

    def kept_positions(self, layer_idx: int) -> torch.Tensor:
        """(B, Hkv, n) absolute positions of the tokens held by one layer."""
        return self.cache.layers[layer_idx].stored_pos()

    def stats(self) -> dict[str, Any]:
        kept = self.kept_tokens()
        return {
            "method": self.method.name,
            "settings": self.method.settings(),
            "kv_bytes": self.kv_bytes(),
            "peak_kv_bytes": self.peak_kv_bytes,
            "tokens_seen": 0 if self.cache is None else self.cache.layers[0].seen,
            "kept_tokens_per_layer": [int(k.float().mean()) if k.numel() else 0 for k in kept],
            **self.method.extra_stats(self),
        }


class apply:  # noqa: N801 - used as a function-like context manager
    """Activate a method on ``model`` inside a ``with`` block.

    >>> with attnkit.apply(model, "streaming_llm", sinks=4, window=1020) as run:
    ...     model.generate(**inputs, max_new_tokens=32)
    ...     print(run.stats())

    Inside the block every forward and ``generate`` call goes through the method: attnkit's attention function
    is selected (``model.set_attn_implementation``) and a forward pre-hook gives each call without an attnkit
    cache a fresh one. On exit, also after an exception, the attention implementation is restored and the hook
    removed.
    """

    def __init__(self, model: torch.nn.Module, method: str | Method = "full", **settings: Any) -> None:
        if not (hasattr(model, "config") and hasattr(model, "set_attn_implementation")):
            raise TypeError(f"attnkit.apply: model is a {type(model).__name__}; accepted: a Hugging Face transformers "
                            "model (PreTrainedModel, e.g. from attnkit.load_model or AutoModelForCausalLM)")
        self.model = model
        self.method = make_method(method, **settings)
        config = text_config(model)
        max_pos = getattr(config, "max_position_embeddings", None)
        if self.method.needs_rope:
            check_rope(model, self.method.name)
        self.method.check_model(model, max_pos)
        self.run = Run(model, self.method)
        self._saved: str | None = None
        self._hook = None

    def __enter__(self) -> Run:
        key = id(self.run.config)
        if key in attention.ACTIVE_RUNS:
            raise RuntimeError("an attnkit method is already active on this model; nest blocks on different models")
        attention.register()
        self._saved = self.run.config._attn_implementation
        self.model.set_attn_implementation(attention.NAME)
        attention.ACTIVE_RUNS[key] = self.run
        self._hook = self.model.register_forward_pre_hook(self._inject_cache, with_kwargs=True)
        return self.run

    def __exit__(self, *exc) -> None:
        attention.ACTIVE_RUNS.pop(id(self.run.config), None)
        if self._hook is not None:
            self._hook.remove()
        if self._saved is not None:
            self.model.set_attn_implementation(self._saved)

    def _inject_cache(self, module, args, kwargs):
        self.run.note_attention_mask(kwargs.get("attention_mask"))
        name = cache_argument(module)
        cache = kwargs.get(name, kwargs.get("past_key_values"))
        if isinstance(cache, AttnkitCache):
            if cache.run is not self.run:
                raise ValueError("this cache belongs to another attnkit.apply block; build one with run.new_cache()")
            return None
        if isinstance(cache, Cache) and cache.get_seq_length() > 0:
            raise ValueError(
                "the cache passed in already holds tokens computed without attnkit; start inside the block or pass "
                "run.new_cache()"
            )
        kwargs.pop("past_key_values", None)
        kwargs[name] = self.run.new_cache()
        return args, kwargs


def cache_argument(model: torch.nn.Module) -> str:
    """Name of the forward's cache argument: ``cache`` (transformers >= 5.24) or ``past_key_values``."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def check_rope(model: torch.nn.Module, method: str) -> None:
    """Raise ValueError unless the model uses a RoPE whose shifts are pure rotations."""
    if find_rotary(model) is None:
        raise ValueError(f"{method} needs a model with rotary position embeddings (RoPE); {type(model).__name__} has none")
    for layer_type, rope_type in rope_types(text_config(model)).items():
        if rope_type in DYNAMIC_ROPE_TYPES:
            raise ValueError(
                f"{method} re-rotates cached keys, which needs position-independent RoPE frequencies; "
                f"rope_type '{rope_type}' ({layer_type}) changes them with the sequence length"
            )
