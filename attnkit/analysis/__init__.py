"""Analyses of how a model attends: attention sinks, massive activations, cosine to the first token, echo /
induction (retrieval) heads, streaming heads and attention maps; ``analyze`` writes them all as JSON + HTML.

Every attention probability here is recomputed in float32 from the rotated q and k that a dense prefill inside
``attnkit.apply(model, "full")`` hands its recorder (:mod:`attnkit.analysis.capture`), so grouped-query heads and
the model's own sliding-window layers are measured as the model attends. See ``attnkit analyze --help``.
"""

from attnkit.analysis.activations import (CosineToFirst, MassiveActivations, cosine_to_first, flag_massive,
                                          massive_activations, residual_analysis)
from attnkit.analysis.capture import use_method
from attnkit.analysis.heads import HeadScores, head_scores, repeated_input, top_heads
from attnkit.analysis.inputs import essay_windows
from attnkit.analysis.maps import AttentionMaps, attention_maps
from attnkit.analysis.run import analyze, analyze_compare, compute, load, write
from attnkit.analysis.sinks import SinkMetric, alpha_from_probs, sink_metric
from attnkit.analysis.streaming import StreamingHeads, streaming_heads

__all__ = [
    "AttentionMaps", "CosineToFirst", "HeadScores", "MassiveActivations", "SinkMetric", "StreamingHeads",
    "alpha_from_probs", "analyze", "analyze_compare", "attention_maps", "compute", "cosine_to_first",
    "essay_windows", "flag_massive", "head_scores", "load", "massive_activations", "repeated_input",
    "residual_analysis", "sink_metric", "streaming_heads", "top_heads", "use_method", "write",
]
