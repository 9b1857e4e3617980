"""Zoo mixers by name: a lazy ``"module:Class"`` registry with did-you-mean errors."""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from typing import Any

from attnkit.zoo.base import Mixer

_MIXERS: dict[str, str] = {
    "softmax": "attnkit.zoo.softmax:SoftmaxAttention",
    "sliding_window": "attnkit.zoo.sliding_window:SlidingWindowAttention",
    "linear_attention": "attnkit.zoo.linear_attention:LinearAttention",
    "based": "attnkit.zoo.based:Based",
    "base_conv": "attnkit.zoo.base_conv:BaseConv",
    "delta_rule": "attnkit.zoo.delta_rule:DeltaRule",
    "rls": "attnkit.zoo.rls:RLSMemory",
    "selective": "attnkit.zoo.selective:SelectiveAttention",
    "deconstructed": "attnkit.zoo.deconstructed:DeconstructedAttention",
    "meta_tokens": "attnkit.zoo.meta_tokens:MetaTokenAttention",
    "landmark": "attnkit.zoo.landmark:LandmarkAttention",
    "cca": "attnkit.zoo.cca:CCAAttention",
    "superlinear": "attnkit.zoo.superlinear:SuperlinearAttention",
}


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def mixer_class(name: str) -> type[Mixer]:
    """The class registered under ``name``; ValueError with a suggestion for unknown names."""
    key = name.strip().lower().replace("-", "_")
    if key not in _MIXERS:
        raise ValueError(f"unknown mixer '{name}'{_suggest(key, list(_MIXERS))}; available: {', '.join(_MIXERS)}")
    module, attr = _MIXERS[key].split(":")
    return getattr(importlib.import_module(module), attr)


def build_mixer(name: str, d_model: int, **settings: Any) -> Mixer:
    """A mixer of width ``d_model`` from its name and config settings (unknown settings: ValueError)."""
    cls = mixer_class(name)
    fields = [f.name for f in dataclasses.fields(cls.config_class)]
    for key in settings:
        if key not in fields:
            listed = ", ".join(fields) or "none"
            raise ValueError(f"{cls.name}: unknown setting '{key}'{_suggest(key, fields)}; settings: {listed}")
    return cls(d_model, cls.config_class(**settings))


def mixers() -> list[dict[str, Any]]:
    """One entry per registered mixer: name, paper and default settings."""
    out = []
    for name in _MIXERS:
        cls = mixer_class(name)
        defaults = {f.name: f.default for f in dataclasses.fields(cls.config_class)}
        out.append({"name": name, "paper": cls.paper, "defaults": defaults})
    return out


def register(name: str, target: str) -> None:
    """Register a third-party mixer as ``"package.module:Class"`` (imported on first use)."""
    _MIXERS[name] = target

