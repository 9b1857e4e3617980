"""The shared list of methods x settings every generic test runs over.

``roomy`` settings hold at least the whole test context (the method must then equal the dense model);
``tight`` settings force eviction or selection on the test context (the method must then equal the dense
reference under the mask of what it kept).
"""

from __future__ import annotations

# name -> (roomy settings, tight settings) for tiny models with contexts of ~40-70 tokens
TINY = {
    "full": ({}, {}),
    "window": ({"window": 128}, {"window": 12}),
    "streaming_llm": ({"sinks": 4, "window": 124}, {"sinks": 3, "window": 10}),
    "h2o": ({"heavy": 64, "recent": 64}, {"heavy": 8, "recent": 6}),
    "snapkv": ({"budget": 128, "window": 8}, {"budget": 16, "window": 4, "kernel": 3}),
    "pyramidkv": ({"budget": 128, "window": 8}, {"budget": 16, "window": 4, "kernel": 3, "beta": 4}),
    "spatten": ({"budget": 128, "value_threshold": 0.0}, {"budget": 16, "value_threshold": 0.0, "recent": 2}),
    "tokenselect": ({"top_k": 128, "sinks": 4, "local": 8}, {"top_k": 8, "sinks": 2, "local": 4}),
    "quest": ({"budget": 128, "page": 4, "dense_layers": 0}, {"budget": 16, "page": 4, "dense_layers": 1}),
    # tight: 4 of 8 frequency chunks (2 chunks made bf16 near-ties flip a padded row's selection on the H200)
    "fasa": ({"budget": 128, "chunks": 4, "dense_layers": 0}, {"budget": 8, "chunks": 4, "dense_layers": 0}),
    "recycled_attention": ({"recycled": 128, "stride": 3}, {"recycled": 8, "stride": 3, "threshold": 0.5}),
    "tidaldecode": ({"top_k": 128, "dense_layers": 0, "reselect_layer": -1},
                    {"top_k": 8, "dense_layers": 0, "reselect_layer": -1}),
    "zerotuning": ({"gamma": 1.0}, {"gamma": 3.0}),
    "act": ({"tau": 1.0, "heads": "all"}, {"tau": 0.05, "heads": "all"}),
    "infiniretri": ({}, {"chunk": 16, "topk": 4}),  # a generation driver: as a cache method it is full
    "razorattention": ({"window": 124, "heads": [[1, 0]]}, {"sinks": 3, "window": 10, "heads": []}),  # tight: all evict
    # sparse prefill: roomy keeps everything (min_tokens above the context); tight drops on every layer
    "token_sparse": ({"min_tokens": 128, "window": 4, "layers": "0-2"},
                     {"min_tokens": 4, "window": 3, "tau": 0.3, "kernel": 3, "layers": "0-2"}),
    "dhsa": ({"budget": 128, "recent": 8, "sinks": 2},
             {"budget": 12, "block": 4, "chunk": 4, "recent": 3, "sinks": 2, "dense_tail": 2}),
    "rectified": ({"block": 128}, {"block": 4, "local": 0}),
    "tca": ({"window": 128}, {"block": 4, "window": 6, "configs": 4, "fallback": 1}),
}

# the same for SmolLM2 on a ~400-token prompt
REAL = {
    "full": ({}, {}),
    "window": ({"window": 1024}, {"window": 96}),
    "streaming_llm": ({"sinks": 4, "window": 1020}, {"sinks": 4, "window": 92}),
    "h2o": ({"heavy": 512, "recent": 512}, {"heavy": 48, "recent": 48}),
    "snapkv": ({"budget": 1024, "window": 32}, {"budget": 96, "window": 16}),
    "pyramidkv": ({"budget": 1024, "window": 32}, {"budget": 96, "window": 16}),
    "spatten": ({"budget": 1024, "value_threshold": 0.0}, {"budget": 96, "value_threshold": 0.0}),
    "tokenselect": ({"top_k": 1024, "sinks": 16, "local": 64}, {"top_k": 32, "sinks": 8, "local": 32}),
    "quest": ({"budget": 1024, "page": 16}, {"budget": 96, "page": 16}),
    "tidaldecode": ({"top_k": 1024}, {"top_k": 32}),
    "recycled_attention": ({"recycled": 1024}, {"recycled": 48, "stride": 3}),
    "fasa": ({"budget": 1024}, {"budget": 48}),
    "zerotuning": ({"gamma": 1.0}, {"gamma": 2.0, "layers": "0-5"}),
    "act": ({"tau": 1.0}, {"tau": 0.1}),
    "infiniretri": ({}, {"chunk": 128, "topk": 32}),
    "razorattention": ({"window": 1020, "heads": [[1, 0], [5, 2], [20, 1]]}, {"window": 92, "heads": []}),
    "token_sparse": ({"min_tokens": 1024, "window": 32}, {"min_tokens": 32, "window": 16, "tau": 0.2}),
    "dhsa": ({"budget": 1024}, {"budget": 96, "block": 32, "chunk": 16, "recent": 32, "sinks": 8, "dense_tail": 16}),
    "rectified": ({"block": 1024}, {"block": 32}),
    "tca": ({"window": 1024}, {"block": 16, "window": 64, "fallback": 5}),
}

METHODS = list(TINY)
