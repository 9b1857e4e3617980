"""StreamingLLM: attention sinks plus a rolling window, with cache-relative positions."""

from __future__ import annotations

from dataclasses import dataclass

from attnkit.hf.cache import KVLayer, WindowLayer
from attnkit.hf.rope import apply_rotation, inv_freq_for, rotation
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
    included). This gives exactly the paper's q.k scores at every decode step while re-rotating S keys instead of
    the whole window. Deviation: within one prefill chunk all queries see the sinks at the shift of the chunk's
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
        shifts: dict[int, tuple] = {}  # eviction size -> (cos, sin): decode always evicts 1, prefill one chunk

        def rotate_sinks(layer: WindowLayer, n_evicted: int) -> None:
            # The running sink keys stay in float32 and turn by each eviction's shift: a few kernels per step,
            # and no bf16 rounding accumulates however long the stream runs.
            s = layer.sinks
            if layer.sink_keys is None:
                layer.sink_keys = layer.keys[:, :, :s].float()
            if n_evicted not in shifts:
                shifts[n_evicted] = rotation(n_evicted, inv_freq, layer.keys.device)
            layer.sink_keys = apply_rotation(layer.sink_keys, *shifts[n_evicted])
            layer.keys[:, :, :s] = layer.sink_keys

        return WindowLayer(self.window, self.sinks, ctx.layer_idx, ctx.run, on_evict=rotate_sinks)
