"""RazorAttention: retrieval heads keep the whole cache; every other KV head keeps sinks + a recent window + one
compensation token for what it dropped."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from attnkit.hf.attention import attend_layer
from attnkit.hf.cache import KVLayer
from attnkit.methods.base import LayerContext, Method, check_float, check_int
from attnkit.methods.stored.razorattention_cache import CompensatedWindowLayer, RazorLayer

if TYPE_CHECKING:
    from attnkit.analysis.heads import HeadScores
    from attnkit.session import Run

#: the paper's local window rule L_h = max(S0, N / C) (S0 = 4000, C = 5)
LOCAL_MIN, LOCAL_RATIO = 4000, 5
#: head scores computed at apply time (``profile=None``), once per model object in this process
_SCORES: "weakref.WeakKeyDictionary[torch.nn.Module, HeadScores]" = weakref.WeakKeyDictionary()


@dataclass
class RazorAttention(Method):
    """Full cache for the retrieval heads, sinks + window + a compensation token for the others.

    Paper: RazorAttention: Efficient KV Cache Compression Through Retrieval Heads, Tang et al., ICLR 2025
    (https://arxiv.org/abs/2407.15891). Only retrieval heads (echo and induction heads, found once offline on a
    repeated random sequence) read distant context, so the other heads can drop it without attention scores at
    inference: they keep ``sinks`` initial tokens, the last ``window`` tokens and one token summarising the rest.

    Heads: ``heads`` (explicit (layer, kv_head) pairs), else ``profile`` (a head-scores JSON from
    ``attnkit calibrate razorattention``), else scores computed on the model at apply time
    (:func:`attnkit.analysis.heads.head_scores`, defaults, cached per model). Retrieval heads = top
    ``induction_frac`` of all global (layer, KV head) pairs by induction score united with the top ``echo_frac`` by
    echo score (GQA: a KV head scores the max over its query heads).

    Compensation token (paper sec. 3.3, eq. 5): per non-retrieval KV head, running float32 sums of the keys (as
    stored, i.e. rotated at their own positions) and values evicted from the window, and their count; it attends
    as one extra key whose key / value are the means and whose logit gets + log(count), i.e. it weighs as much
    as ``count`` tokens with that mean key would. Sinks and window count from each row's first real token.

    Window: ``window=None`` is the paper's rule L_h = max(4000, ceil(N / 5)), N = the prompt's tokens at the end
    of the prefill (the longest row of a padded batch); an integer fixes it (sweeps).

    Differences from the paper: the prefill is dense and the non-retrieval heads are compressed when decoding
    starts (as the paper: no memory saving during the prefill itself, peak KV = full); later decode steps slide
    the window, every evicted token joining the compensation token (the paper describes the post-prefill cut
    only); a prefill chunk after decoding is again dense over what is held. As in SnapKV, the compression runs at
    the first single-token forward, so a 1-token last prefill chunk already reads the compressed cache. Keys keep
    their absolute positions (no re-numbering). Scores computed at apply time draw random tokens from the whole
    vocabulary minus the config's special ids (no tokenizer there; the calibrate command passes one). The model's
    own sliding-window layers (Gemma-3) keep their window: ``heads`` entries there are ignored.

    Shapes: retrieval group (B, Hr, n, D); local group (B, Hl, sinks + window + 2, D) after the prefill plus the
    float32 compensation sums (B, Hl, D) x 2 and counts (B, Hl); ``run.kv_bytes()`` counts all of them. Fixed-shape
    (CUDA-graph) decode: the retrieval group appends, the local group runs WindowLayer's ring and adds the slot
    that leaves to the sums on the device.
    """

    name = "razorattention"
    summary = "retrieval heads keep all KV; other heads sinks + window + one compensation token"
    paper = "https://arxiv.org/abs/2407.15891"

    profile: str | None = None
    induction_frac: float = 0.14
    echo_frac: float = 0.01
    sinks: int = 4
    window: int | None = None
    compensation: bool = True
    heads: tuple | None = None

    def __post_init__(self) -> None:
        if isinstance(self.profile, Path):
            self.profile = str(self.profile)
        if self.profile is not None and not isinstance(self.profile, str):
            raise ValueError(f"{self.name}: profile={self.profile!r} is invalid; accepted: a JSON path or None")
        check_float(self.name, "induction_frac", self.induction_frac, 0.0, 1.0)
        check_float(self.name, "echo_frac", self.echo_frac, 0.0, 1.0)
        check_int(self.name, "sinks", self.sinks, 0)
        if self.window is not None:
            check_int(self.name, "window", self.window, 1)
        if not isinstance(self.compensation, bool):
            raise ValueError(f"{self.name}: compensation={self.compensation!r} is invalid; accepted: True, False")
        if self.heads is not None:
            self.heads = parse_heads(self.name, self.heads)
        self._resolved: tuple[int, dict[int, list[int]]] | None = None

    @classmethod
    def for_budget(cls, tokens: int) -> "RazorAttention":
        """Non-retrieval heads hold ``tokens`` entries: sinks + window + the compensation token."""
        sinks = min(4, max(tokens - 2, 0))
        return cls(sinks=sinks, window=max(1, tokens - sinks - 1))

    def check_model(self, model: torch.nn.Module, max_positions: int | None) -> None:
        super().check_model(model, max_positions)
        self.layer_heads(model)

    def layer_heads(self, model: torch.nn.Module) -> dict[int, list[int]]:
        """{layer: retrieval KV heads} for this model (resolved once per model)."""
        if self._resolved is not None and self._resolved[0] == id(model):
            return self._resolved[1]
        from attnkit.session import text_config

        cfg = text_config(model)
        n_layers, n_kv = cfg.num_hidden_layers, cfg.num_key_value_heads
        if self.heads is not None:
            pairs = list(self.heads)
        else:
            scores = self.scores(model)
            if tuple(scores.echo.shape) != (n_layers, cfg.num_attention_heads) or scores.num_key_value_heads != n_kv:
                raise ValueError(f"{self.name}: profile {self.profile} scores {tuple(scores.echo.shape)} heads over "
                                 f"{scores.num_key_value_heads} KV heads; the model has ({n_layers}, "
                                 f"{cfg.num_attention_heads}) over {n_kv}")
            pairs = scores.retrieval_heads(self.induction_frac, self.echo_frac)
        for layer, head in pairs:
            if layer >= n_layers or head >= n_kv:
                raise ValueError(f"{self.name}: heads entry ({layer}, {head}) is invalid; accepted: layer in "
                                 f"[0, {n_layers - 1}], kv_head in [0, {n_kv - 1}]")
        out: dict[int, list[int]] = {i: [] for i in range(n_layers)}
        for layer, head in pairs:
            out[layer].append(head)
        self._resolved = (id(model), out)
        return out

    def scores(self, model: torch.nn.Module) -> "HeadScores":
        from attnkit.analysis.heads import HeadScores, head_scores

        if self.profile is not None:
            if not Path(self.profile).is_file():
                raise ValueError(f"{self.name}: profile={self.profile!r} is invalid; accepted: an existing head-scores "
                                 "JSON (attnkit calibrate razorattention -o FILE) or None")
            return HeadScores.from_json(self.profile)
        if model not in _SCORES:
            _SCORES[model] = head_scores(model)
        return _SCORES[model]

    def make_layer(self, ctx: LayerContext) -> KVLayer:
        from attnkit.session import text_config

        cfg = text_config(ctx.model)
        local = CompensatedWindowLayer(self.window, self.sinks, self.compensation, (LOCAL_MIN, LOCAL_RATIO),
                                       ctx.layer_idx, ctx.run)
        return RazorLayer(self.layer_heads(ctx.model)[ctx.layer_idx], cfg.num_key_value_heads,
                          cfg.num_attention_heads, local, ctx.layer_idx, ctx.run)

    def attend(self, run: "Run", module, layer: KVLayer, query, key, value, scaling: float, softcap) -> torch.Tensor:
        if isinstance(layer, RazorLayer):
            return layer.attend(run, query, scaling, softcap)
        return attend_layer(run, layer, query, key, value, scaling, softcap)

    def extra_stats(self, run: "Run") -> dict[str, Any]:
        layers = [l for l in (run.cache.layers if run.cache is not None else []) if isinstance(l, RazorLayer)]
        locals_ = [l.local for l in layers if l.local is not None and l.local.comp_count is not None]
        return {"razorattention": {
            "retrieval_heads": sum(len(l.retrieval) for l in layers),
            "kv_heads": sum(l.n_kv for l in layers),
            "window": max((l.window for l in locals_), default=None),
            "compensated_tokens": int(max((float(l.comp_count.max()) for l in locals_), default=0)),
        }}


def parse_heads(method: str, heads: Any) -> tuple[tuple[int, int], ...]:
    """[(layer, kv_head), ...] -> sorted unique tuple of int pairs; ValueError naming a bad entry."""
    if isinstance(heads, (str, bytes)) or not hasattr(heads, "__iter__"):
        raise ValueError(f"{method}: heads={heads!r} is invalid; accepted: a list of (layer, kv_head) pairs or None")
    out = set()
    for pair in heads:
        ok = isinstance(pair, (list, tuple)) and len(pair) == 2 and all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in pair)
        if not ok:
            raise ValueError(f"{method}: heads entry {pair!r} is invalid; accepted: a (layer, kv_head) pair of "
                             "integers >= 0")
        out.add((int(pair[0]), int(pair[1])))
    return tuple(sorted(out))


def calibrate(model: torch.nn.Module, tokenizer, out: str | Path, length: int = 2500, repeats: int = 4,
              model_name: str = "") -> str:
    """`attnkit calibrate razorattention`: head scores on the repeated random input -> JSON profile; returns the
    one-line summary the command prints (retrieval heads at the default fractions)."""
    from attnkit.analysis.heads import head_scores

    scores = head_scores(model, length, repeats, progress=True, tokenizer=tokenizer)
    path = scores.to_json(out, model=model_name)
    heads = scores.retrieval_heads()
    layers = sorted({layer for layer, _ in heads})
    return (f"razorattention head scores for {model_name or type(model).__name__} ({scores.length} tokens x "
            f"{scores.repeats}): {len(heads)} retrieval KV heads at induction 0.14 / echo 0.01, layers {layers} -> "
            f"{path}; use it as --set razorattention.profile={path}")
