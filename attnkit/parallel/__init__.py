"""Context-parallel prefill: one prompt's tokens split over the GPUs of a host (or CPU processes with gloo).

- :mod:`~attnkit.parallel.layout`: which positions each rank holds (load-balanced ``zigzag`` or ``contiguous``);
- :func:`ring_attention`: ring attention over P2P sends (portable: gloo and NCCL), log-sum-exp merge;
- :func:`ulysses_attention`: all-to-all head parallelism (DeepSpeed Ulysses);
- :func:`torch_ring_attention`: torch's ``context_parallel`` ring (CUDA), inside :func:`torch_ring_context`;
- :func:`cp_prefill`: a Hugging Face causal LM's prefill through any of them, for ``full``, ``window`` and
  ``dhsa`` (fixed chunks);
- ``python -m attnkit.parallel.run --nproc 2 ...``: the torchrun entry (checks against one process).

Nothing here runs at import; transformers is touched only inside ``cp_prefill`` (``AttentionInterface``).
"""

from attnkit.parallel.layout import LAYOUTS, SeqLayout
from attnkit.parallel.masks import BlockLists, WindowMask, dhsa_mask
from attnkit.parallel.prefill import METHODS, STRATEGIES, cp_prefill, make_layout
from attnkit.parallel.ring import ring_attention
from attnkit.parallel.torch_ring import torch_ring_attention, torch_ring_context
from attnkit.parallel.ulysses import check_heads, ulysses_attention

__all__ = [
    "LAYOUTS",
    "METHODS",
    "STRATEGIES",
    "BlockLists",
    "SeqLayout",
    "WindowMask",
    "check_heads",
    "cp_prefill",
    "dhsa_mask",
    "make_layout",
    "ring_attention",
    "torch_ring_attention",
    "torch_ring_context",
    "ulysses_attention",
]
