"""attnkit: token-level attention methods on Hugging Face causal LMs, measured side by side.

Importing attnkit changes nothing in transformers: methods are registered and installed only inside
``attnkit.apply(...)`` blocks.
"""

from attnkit.inference import Generation, generate, perplexity
from attnkit.models import load_model
from attnkit.reference import dense_attention
from attnkit.registry import make_method, methods
from attnkit.session import Run, apply

__version__ = "0.1.0"
__all__ = [
    "Generation",
    "Run",
    "apply",
    "dense_attention",
    "generate",
    "load_model",
    "make_method",
    "methods",
    "perplexity",
]
