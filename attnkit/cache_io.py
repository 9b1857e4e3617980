"""Reuse a method's cache: continue an earlier generation, save it (safetensors, never pickle) and load it back.

A :class:`CacheState` is what ``attnkit.generate`` leaves in ``Generation.state``: the cache (every layer as the
method left it: evicted, compressed, with its page summaries, scores and shared cross-layer state) and the last
sampled token, which has not gone through the model yet. ``generate(model, tok, more, cache=state)`` appends that
token and ``more`` and decodes on: several questions about one compressed document, or the next turn of a chat
(:func:`followup_text`).

:func:`save_cache` writes one ``.safetensors`` file: every tensor of every layer and of ``run.shared``, and in its
metadata a JSON description of the rest (host counters, flags, the method and its settings, the model's shape).
:func:`load_cache` rebuilds the layers with the active method's ``make_layer`` and restores that state in place,
refusing a file made by another method, other settings or another model shape.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SKIP = {"run", "device", "cfg"}  # references the fresh layer already holds (its run, device and method)
FORMAT = "attnkit-cache/1"


@dataclass
class CacheState:
    """A cache to continue from. cache: the run's AttnkitCache; pending: sampled tokens not yet fed; past_eos:
    tokens fed after an EOS (a continuation would see them; refused); turns: generate calls that built it."""

    cache: Any
    pending: list[int]
    past_eos: int = 0
    turns: int = 1


def continue_ids(state: CacheState, run, rows: list[torch.Tensor], device) -> torch.Tensor:
    """(1, q) ids to feed for a continuation: the pending tokens then the new prompt's."""
    if not isinstance(state, CacheState):
        raise ValueError(f"cache={type(state).__name__} is invalid; accepted: gen.state or attnkit.load_cache(...)")
    if run is None or state.cache.run is not run:
        raise ValueError("this cache belongs to another attnkit.apply block (or none is active); save it with "
                         "attnkit.save_cache and load it inside this block with attnkit.load_cache")
    if len(rows) != 1:
        raise ValueError(f"a continuation takes one prompt; got {len(rows)}")
    if state.past_eos:
        raise ValueError(f"this cache holds {state.past_eos} tokens generated after an EOS; generate the earlier turn "
                         "with eos_check_every=1 to continue from it")
    pending = torch.tensor([state.pending], dtype=torch.long, device=device)
    return torch.cat([pending, rows[0]], dim=1)


def followup_text(tokenizer, messages: list[dict], answer: str, question: str) -> str:
    """The text that follows a generated ``answer`` to ``messages`` in the chat template, up to the next
    assistant turn for ``question``: what ``generate(..., cache=state)`` appends for the next turn.

    The answer's own tokens are already in the cache, and so is its end-of-turn token when generation stopped at
    EOS: the returned text starts after the answer, so feed it as is when generation ran out of tokens, and drop
    its first token (the EOS, which is the state's pending token) otherwise; :func:`chat_turn` does that.
    """
    done = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer}], tokenize=False)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": answer},
                                                     {"role": "user", "content": question}],
                                         add_generation_prompt=True, tokenize=False)
    cut = done.rfind(answer) + len(answer) if answer else len(done)
    if not full.startswith(done[:cut]):
        raise ValueError("the chat template renders the earlier turns differently once a turn is added; "
                         "continue with explicit text instead")
    return full[cut:]


def chat_turn(model, tokenizer, state: CacheState, messages: list[dict], answer_tokens: list[int], question: str,
              **generate_kwargs):
    """Ask ``question`` as the next user turn over ``state`` (the cache after ``answer_tokens`` answered
    ``messages``); returns the new Generation."""
    from attnkit.inference import generate

    answer = tokenizer.decode(answer_tokens, skip_special_tokens=True)
    text = followup_text(tokenizer, messages, answer, question)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    eos = tokenizer.eos_token_id
    if ids and eos is not None and state.pending == [eos] and ids[0] == eos:
        ids = ids[1:]  # the EOS the answer ended with is the pending token
    generate_kwargs.setdefault("eos_check_every", 1)
    return generate(model, tokenizer, ids, cache=state, **generate_kwargs)


# -- save / load ----------------------------------------------------------------------------------------------
def _describe(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> dict:
    """A JSON spec of ``value``; its tensors go into ``tensors`` under keys starting with ``key``."""
    if torch.is_tensor(value):
        tensors[key] = value.detach().contiguous().clone()
        return {"t": "tensor", "key": key}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"t": "v", "v": value}
    if isinstance(value, (list, tuple)):
        return {"t": "list", "tuple": isinstance(value, tuple),
                "items": [_describe(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, dict) and all(isinstance(k, (str, int)) for k in value):
        return {"t": "dict", "items": [[k, _describe(v, f"{key}.{k}", tensors)] for k, v in value.items()]}
    if hasattr(value, "__dict__"):
        on_device = isinstance(getattr(value, "device", None), torch.device)
        return {"t": "obj", "class": type(value).__name__, "device": on_device,
                "attrs": {k: _describe(v, f"{key}.{k}", tensors) for k, v in vars(value).items() if k not in SKIP}}
    raise ValueError(f"cannot save cache state {key} of type {type(value).__name__}")


def _restore(spec: dict, tensors: dict[str, torch.Tensor], current: Any, where: str, device) -> Any:
    kind = spec["t"]
    if kind == "tensor":
        return tensors[spec["key"]].to(device)
    if kind == "v":
        return spec["v"]
    if kind == "list":  # items restored into the fresh value's items (e.g. a layer's sub-layers) where it has them
        have = list(current) if isinstance(current, (list, tuple)) and len(current) == len(spec["items"]) else None
        items = [_restore(s, tensors, None if have is None else have[i], f"{where}.{i}", device)
                 for i, s in enumerate(spec["items"])]
        return tuple(items) if spec.get("tuple") else items
    if kind == "dict":
        return {k: _restore(s, tensors, current.get(k) if isinstance(current, dict) else None, f"{where}.{k}", device)
                for k, s in spec["items"]}
    if current is None or type(current).__name__ != spec["class"]:
        raise ValueError(f"{where}: the file holds a {spec['class']}, the active method has "
                         f"{type(current).__name__ if current is not None else 'nothing'} here")
    if spec.get("device"):  # a sub-layer: its storage lives where the model does
        current.device = device
    _restore_attrs(current, spec["attrs"], tensors, where, device)  # in place: objects shared by layers stay shared
    return current


def _restore_attrs(obj: Any, attrs: dict, tensors, where: str, device) -> None:
    for name, spec in attrs.items():
        setattr(obj, name, _restore(spec, tensors, getattr(obj, name, None), f"{where}.{name}", device))


def _model_shape(run) -> dict:
    cfg = run.config
    return {k: getattr(cfg, k, None) for k in ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads",
                                               "num_key_value_heads", "vocab_size")}


def save_cache(state, path: str | Path) -> Path:
    """Write ``state`` (a CacheState or a Generation holding one) to ``path`` (.safetensors)."""
    from safetensors.torch import save_file

    state = getattr(state, "state", state)
    if not isinstance(state, CacheState):
        raise ValueError("nothing to save: pass gen.state (or a Generation) from attnkit.generate inside attnkit.apply")
    run = state.cache.run
    tensors: dict[str, torch.Tensor] = {}
    layers = [{"class": type(layer).__name__,
               "state": {k: _describe(v, f"layer{i}.{k}", tensors) for k, v in vars(layer).items() if k not in SKIP}}
              for i, layer in enumerate(state.cache.layers)]
    shared = {k: _describe(v, f"shared.{k}", tensors) for k, v in run.shared.items()}
    meta = {"format": FORMAT, "method": run.method.name, "settings": run.method.settings(), "model": _model_shape(run),
            "layers": layers, "shared": shared, "pending": state.pending, "past_eos": state.past_eos,
            "turns": state.turns}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.cpu() for k, v in tensors.items()}, str(path), metadata={"attnkit": json.dumps(meta, default=str)})
    return path


def load_cache(model, path: str | Path) -> CacheState:
    """The cache saved at ``path``, rebuilt for the active ``attnkit.apply`` block on ``model``."""
    from safetensors import safe_open

    from attnkit.hf.attention import ACTIVE_RUNS
    from attnkit.session import text_config

    run = ACTIVE_RUNS.get(id(text_config(model)))
    if run is None:
        raise ValueError("load_cache needs an active attnkit.apply block with the method the cache was saved with")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("attnkit", "null"))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise ValueError(f"cache file {str(path)!r} not found") from None
    except Exception as exc:  # safetensors raises its own error types for truncated or foreign files
        raise ValueError(f"{str(path)!r} is not a readable attnkit cache file ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not an attnkit cache file (format {FORMAT})")
    settings = json.loads(json.dumps(run.method.settings(), default=str))
    if meta["method"] != run.method.name or meta["settings"] != settings:
        raise ValueError(f"{str(path)!r} was saved with {meta['method']}({meta['settings']}); the active method is "
                         f"{run.method.name}({settings})")
    if meta["model"] != _model_shape(run):
        raise ValueError(f"{str(path)!r} was saved for a model of shape {meta['model']}; this one is "
                         f"{_model_shape(run)}")
    device = next(model.parameters()).device
    cache = run.new_cache()
    for key, spec in meta["shared"].items():
        run.shared[key] = _restore(spec, tensors, run.shared.get(key), f"shared.{key}", device)
    for i, (layer, saved) in enumerate(zip(cache.layers, meta["layers"])):
        if type(layer).__name__ != saved["class"]:
            raise ValueError(f"layer {i}: the file holds a {saved['class']}, the active method builds "
                             f"{type(layer).__name__}")
        layer.device = device
        _restore_attrs(layer, saved["state"], tensors, f"layer{i}", device)
    return CacheState(cache, list(meta["pending"]), int(meta["past_eos"]), int(meta["turns"]))
