"""Zoo mixers by name: a lazy ``"module:Class"`` registry with did-you-mean errors."""

from __future__ import annotations

import dataclasses
from typing import Any

from attnkit.registry import check_settings, resolve
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


def mixer_class(name: str) -> type[Mixer]:
    """The class registered under ``name``; ValueError with a suggestion for unknown names."""
    return resolve(_MIXERS, name, "mixer")


def build_mixer(name: str, d_model: int, **settings: Any) -> Mixer:
    """A mixer of width ``d_model`` from its name and config settings (unknown settings: ValueError)."""
    cls = mixer_class(name)
    check_settings(cls.name, [f.name for f in dataclasses.fields(cls.config_class)], settings)
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

