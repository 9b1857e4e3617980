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


def resolve(table: dict[str, str], name: str, kind: str) -> Any:
    """The object a lazy ``{name: "module:attr"}`` table names (imported now); ValueError with a suggestion for an
    unknown ``kind`` name (methods here, zoo mixers in :mod:`attnkit.zoo.registry`)."""
    key = name.strip().lower().replace("-", "_")
    if key not in table:
        raise ValueError(f"unknown {kind} '{name}'{_suggest(key, list(table))}; available: {', '.join(table)}")
    module, attr = table[key].split(":")
    return getattr(importlib.import_module(module), attr)


def check_settings(owner: str, fields: list[str], settings: dict[str, Any]) -> None:
    """ValueError naming the first setting that is not one of ``fields``, with a suggestion."""
    for key in settings:
        if key not in fields:
            listed = ", ".join(fields) or "none"
            raise ValueError(f"{owner}: unknown setting '{key}'{_suggest(key, fields)}; settings: {listed}")


def method_class(name: str) -> type[Method]:
    """The class registered under ``name``; ValueError with a suggestion for unknown names."""
    return resolve(_REGISTRY, name, "method")


def make_method(method: str | Method, **settings: Any) -> Method:
    """A method instance from a name and settings (or an instance, returned as is)."""
    if isinstance(method, Method):
        if settings:
            raise ValueError("pass settings either in the method instance or as keywords, not both")
        return method
    cls = method_class(method)
    check_settings(cls.name, [f.name for f in dataclasses.fields(cls)], settings)
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
