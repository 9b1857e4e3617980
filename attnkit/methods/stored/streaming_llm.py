"""StreamingLLM: attention sinks plus a rolling window, with cache-relative positions."""

from __future__ import annotations

from dataclasses import dataclass

from attnkit.hf.cache import KVLayer, WindowLayer
from attnkit.hf.rope import inv_freq_for
from attnkit.methods.base import LayerContext, Method, check_int


@dataclass
class StreamingLLM(Method):
    """Keep the first ``sinks`` tokens forever plus the ``window`` most recent ones.

    Paper: Efficient Streaming Language Models with Attention Sinks, Xiao et al., ICLR 2024
    (https://arxiv.org/abs/2309.17453). Many heads park surplus attention on the first tokens; evicting them
    breaks window attention, keeping four of them repairs it, and the model runs far past its trained context.

    Positions. The paper numbers tokens by their slot in the cache, so the query sits at position <= S + W.
    RoPE scores depend only on position differences, so we keep queries and window keys at their absolute
    positions (their differences already equal the slot differences) and rotate the S sink keys forward by the
    number of evicted tokens each time tokens are evicted, using the model's own rotary frequencies (rope scaling
    included): the float32 originals are turned by the row's whole eviction count, angles in float64. This gives
    exactly the paper's q.k scores at every decode step while re-rotating S keys instead of the whole window. Deviation: within one prefill chunk all queries see the sinks at the shift of the chunk's
    start (feed chunk=1 for the paper's token-by-token behaviour); windows and causality inside a chunk are exact.
    RoPE types whose frequencies change with length (dynamic NTK, LongRoPE) are rejected.

    Shapes: keys/values (B, Hkv, S + W + q, D) during a forward, (B, Hkv, S + W, D) held between forwards.
    """

    name = "streaming_llm"
    summary = "attention sinks + recent window, cache-relative positions (runs past the trained context)"
    paper = "https://arxiv.org/abs/2309.17453"
    needs_rope = True

    sinks: int = 4
    window: int = 1020

    def __post_init__(self) -> None:
        check_int(self.name, "sinks", self.sinks, 0)
        check_int(self.name, "window", self.window, 1)

    @classmethod
    def for_budget(cls, tokens: int) -> "StreamingLLM":
        sinks = min(4, tokens - 1)
        return cls(sinks=sinks, window=tokens - sinks)

    def kv_budget(self) -> int:
        return self.sinks + self.window

    def make_layer(self, ctx: LayerContext) -> KVLayer:
        inv_freq = inv_freq_for(ctx.model, ctx.layer_type)
        return WindowLayer(self.window, self.sinks, ctx.layer_idx, ctx.run, rope_inv_freq=inv_freq)
