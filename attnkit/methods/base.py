"""The method contract: one dataclass per method, with validated settings and two optional seams.

- ``make_layer`` returns the cache layer a (global-attention) decoder layer stores its KV in: methods that change
  what is stored (eviction, compression, per-head budgets) return their own :class:`~attnkit.hf.cache.KVLayer`.
- ``attend`` computes attention for that layer: methods that change what is read or how it is weighed
  (query-aware selection, calibration) override it.
The model's own sliding-window layers (Gemma-3) always get a plain window layer; methods act on the others.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from attnkit.hf.attention import attend_layer
from attnkit.hf.cache import KVLayer

if TYPE_CHECKING:
    from attnkit.session import Run


@dataclass
class LayerContext:
    """What a method may need to build one layer's cache."""

    layer_idx: int
    run: "Run"
    model: torch.nn.Module
    layer_type: str | None  # e.g. "full_attention" / "sliding_attention" (Gemma-3), None if the model has none


def check_int(method: str, name: str, value: Any, lo: int, hi: int | None = None) -> None:
    """Raise ValueError naming the method, field, value and accepted range unless lo <= value <= hi."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= lo and (hi is None or value <= hi)
    if not ok:
        accepted = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"
        raise ValueError(f"{method}: {name}={value!r} is invalid; accepted: {accepted}")


def check_float(method: str, name: str, value: Any, lo: float, hi: float) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and lo <= value <= hi
    if not ok:
        raise ValueError(f"{method}: {name}={value!r} is invalid; accepted: a number in [{lo}, {hi}]")


def check_choice(method: str, name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{method}: {name}={value!r} is invalid; accepted: {', '.join(map(repr, choices))}")


def load_json_profile(method: str, path: str, need: tuple[str, ...], make: str = "") -> dict:
    """A calibration profile (JSON) with fields ``need``; one clear ValueError for a missing, unreadable or
    foreign file. ``make`` is the command that writes one (default: `attnkit calibrate METHOD ...`)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        make = make or f"attnkit calibrate {method} --model ... -o profile.json"
        raise ValueError(f"{method}: profile {path!r} not found; make one with `{make}`") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{method}: profile {path!r} is not a readable JSON profile ({exc})") from None
    if not isinstance(data, dict) or any(k not in data for k in need):
        raise ValueError(f"{method}: {path!r} is not a {method} profile; accepted: JSON with fields {', '.join(need)}")
    return data


@dataclass
class Method:
    """Base of every attnkit method. Subclasses are dataclasses whose fields are the method's settings."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    #: "stored" (changes what the cache keeps), "read" (changes what attention reads) or "weigh" (changes how it
    #: weighs what it reads: calibration methods, which record their logit bias for the generic tests)
    kind: ClassVar[str] = "stored"
    needs_rope: ClassVar[bool] = False
    #: True for methods that only change how attention is weighed (ZeroTuning, ACT): their ``attend`` also runs on
    #: the model's own sliding-window layers, whose storage stays the model's window
    weighs_sliding_layers: ClassVar[bool] = False
    #: True for generation drivers (InfiniRetri): ``drive`` answers a question about a document through the method's
    #: own loop of forwards; as a cache and attention method a driver is ``full``
    driver: ClassVar[bool] = False

    def settings(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def for_budget(cls, tokens: int) -> "Method":
        """An instance holding about ``tokens`` KV entries per layer and head, for budget sweeps.

        The default (methods without a budget, e.g. ``full``) ignores ``tokens`` and returns the defaults.
        """
        return cls()

    def kv_budget(self) -> int | None:
        """Tokens kept per layer and KV head between forwards (None: unbounded)."""
        return None

    def check_model(self, model: torch.nn.Module, max_positions: int | None) -> None:
        """Raise ValueError if the method cannot run on this model (called by ``attnkit.apply``)."""
        budget = self.kv_budget()
        if budget is not None and max_positions is not None and budget > max_positions:
            raise ValueError(
                f"{self.name}: KV budget {budget} exceeds the model's context of {max_positions} tokens; "
                f"accepted: a budget <= {max_positions}"
            )

    def make_layer(self, ctx: LayerContext) -> KVLayer:
        return KVLayer(ctx.layer_idx, ctx.run)

    def extra_stats(self, run: "Run") -> dict[str, Any]:
        """Method-specific counters merged into ``run.stats()`` (e.g. SpAtten's heads alive); sparse prefill
        methods report the share of the causal (query, key) pairs their prefill attention read."""
        tally = run.shared.get(f"{self.name}:read")
        if tally is None:
            return {}
        return {"prefill_read_share": tally[0] / tally[1] if tally[1] else 1.0, "sparse_prefill_calls": tally[2]}

    def note_read(self, run: "Run", read: float, causal: float) -> None:
        """Count one sparse prefill call: ``read`` (query, key) pairs attended out of ``causal`` visible ones."""
        tally = run.shared.setdefault(f"{self.name}:read", [0.0, 0.0, 0])
        tally[0] += float(read)
        tally[1] += float(causal)
        tally[2] += 1

    def attend(self, run: "Run", module, layer: KVLayer, query, key, value, scaling: float, softcap) -> torch.Tensor:
        """query (B, H, q, D); key/value (B, Hkv, n, D) as stored by ``layer`` -> (B, H, q, D)."""
        return attend_layer(run, layer, query, key, value, scaling, softcap)

    def drive(self, model, tokenizer, document, question, **kwargs):
        """Generation drivers only: answer ``question`` about ``document`` -> Generation (see ``driver``)."""
        raise NotImplementedError(f"{self.name} is not a generation driver; generate with attnkit.generate")

    def __str__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.settings().items())
        return f"{self.name}({args})"
