"""attnkit: token-level attention methods on Hugging Face causal LMs, measured side by side.

Importing attnkit changes nothing in transformers: methods are registered and installed only inside
``attnkit.apply(...)`` blocks.
"""

from attnkit.cache_io import CacheState, chat_turn, followup_text, load_cache, save_cache
from attnkit.inference import Generation, generate, perplexity
from attnkit.methods.driver import infiniretri
from attnkit.models import load_model, load_tokenizer
from attnkit.reference import dense_attention
from attnkit.registry import make_method, methods
from attnkit.session import Run, apply

__version__ = "0.1.0"
__all__ = [
    "CacheState",
    "Generation",
    "chat_turn",
    "followup_text",
    "load_cache",
    "save_cache",
    "Run",
    "apply",
    "dense_attention",
    "generate",
    "infiniretri",
    "load_model",
    "load_tokenizer",
    "make_method",
    "methods",
    "perplexity",
]
