"""Methods by name: a lazy ``"module:Class"`` registry with did-you-mean errors."""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from typing import Any

from attnkit.methods.base import Method

_REGISTRY: dict[str, str] = {
    "full": "attnkit.methods.stored.full:Full",
    "window": "attnkit.methods.stored.window:Window",
    "streaming_llm": "attnkit.methods.stored.streaming_llm:StreamingLLM",
    "h2o": "attnkit.methods.stored.h2o:H2O",
    "snapkv": "attnkit.methods.stored.snapkv:SnapKV",
    "pyramidkv": "attnkit.methods.stored.pyramidkv:PyramidKV",
    "spatten": "attnkit.methods.stored.spatten:SpAtten",
    "tokenselect": "attnkit.methods.read.tokenselect:TokenSelect",
    "quest": "attnkit.methods.read.quest:Quest",
    "tidaldecode": "attnkit.methods.read.tidaldecode:TidalDecode",
    "recycled_attention": "attnkit.methods.read.recycled_attention:RecycledAttention",
    "fasa": "attnkit.methods.read.fasa:FASA",
    "zerotuning": "attnkit.methods.read.zerotuning:ZeroTuning",
    "act": "attnkit.methods.read.act:ACT",
    "infiniretri": "attnkit.methods.driver.infiniretri:InfiniRetri",
    "razorattention": "attnkit.methods.stored.razorattention:RazorAttention",
    "token_sparse": "attnkit.methods.read.token_sparse:TokenSparse",
    "dhsa": "attnkit.methods.read.dhsa:DHSA",
    "rectified": "attnkit.methods.read.rectified:Rectified",
    "tca": "attnkit.methods.stored.tca:TCA",
}


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def method_class(name: str) -> type[Method]:
    """The class registered under ``name``; ValueError with a suggestion for unknown names."""
    key = name.strip().lower().replace("-", "_")
    if key not in _REGISTRY:
        raise ValueError(f"unknown method '{name}'{_suggest(key, list(_REGISTRY))}; available: {', '.join(_REGISTRY)}")
    module, attr = _REGISTRY[key].split(":")
    return getattr(importlib.import_module(module), attr)


def make_method(method: str | Method, **settings: Any) -> Method:
    """A method instance from a name and settings (or an instance, returned as is)."""
    if isinstance(method, Method):
        if settings:
            raise ValueError("pass settings either in the method instance or as keywords, not both")
        return method
    cls = method_class(method)
    fields = [f.name for f in dataclasses.fields(cls)]
    for key in settings:
        if key not in fields:
            listed = ", ".join(fields) or "none"
            raise ValueError(f"{cls.name}: unknown setting '{key}'{_suggest(key, fields)}; settings: {listed}")
    return cls(**settings)


def methods() -> list[dict[str, Any]]:
    """One entry per registered method: name, kind, one-line summary, paper and default settings."""
    out = []
    for name in _REGISTRY:
        cls = method_class(name)
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        out.append({"name": name, "kind": cls.kind, "summary": cls.summary, "paper": cls.paper, "defaults": defaults})
    return out


def register(name: str, target: str) -> None:
    """Register a third-party method as ``"package.module:Class"`` (imported on first use)."""
    _REGISTRY[name] = target
