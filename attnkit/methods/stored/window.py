"""Window attention: keep only the most recent tokens (the baseline StreamingLLM beats)."""

from __future__ import annotations

from dataclasses import dataclass

from attnkit.hf.cache import KVLayer, WindowLayer
from attnkit.methods.base import LayerContext, Method, check_int


@dataclass
class Window(Method):
    """Keep the ``window`` most recent tokens; everything older is evicted for good.

    Paper: the window-attention baseline of StreamingLLM (https://arxiv.org/abs/2309.17453), which collapses once
    the first tokens leave the cache. Each query attends to itself and the ``window`` tokens before it, also
    inside a prefill chunk, so chunked prefill equals feeding tokens one at a time. Positions stay absolute
    (no re-numbering), as in the paper's baseline. Shapes: keys/values (B, Hkv, window + q, D) during a forward,
    (B, Hkv, window, D) held between forwards.
    """

    name = "window"
    summary = "keep only the most recent `window` tokens"
    paper = "https://arxiv.org/abs/2309.17453"

    window: int = 1024

    def __post_init__(self) -> None:
        check_int(self.name, "window", self.window, 1)

    @classmethod
    def for_budget(cls, tokens: int) -> "Window":
        return cls(window=tokens)

    def kv_budget(self) -> int:
        return self.window

    def make_layer(self, ctx: LayerContext) -> KVLayer:
        return WindowLayer(self.window, 0, ctx.layer_idx, ctx.run)
