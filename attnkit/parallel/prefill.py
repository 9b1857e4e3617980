"""Context-parallel prefill of a Hugging Face causal LM: the prompt's tokens split over the ranks of one group.

Each rank embeds only its shard of the prompt (``SeqLayout``: zigzag by default for the rings, contiguous for
Ulysses) with the shard's global ``position_ids``, so RoPE is right; norms, projections and the MLP act per token
and need nothing from other ranks. Only attention does: it goes through an attention function registered in
transformers' public ``AttentionInterface`` under ``attnkit_cp`` (with a mask function that returns no mask:
masks come from global positions), selected with ``model.set_attn_implementation`` for the call and restored
after it (also after an error). Weights are replicated on every rank.

Strategies: ``ring`` (our P2P ring, :mod:`attnkit.parallel.ring`; CPU gloo and CUDA NCCL), ``ulysses``
(all-to-all over heads, :mod:`attnkit.parallel.ulysses`), ``torch_ring`` (torch's ``context_parallel``, CUDA
only, :mod:`attnkit.parallel.torch_ring`). Methods: ``full`` (causal), ``window`` (attnkit's window method in a
prefill forward: each query reads itself and ``window`` keys before it) and ``dhsa`` with
``boundaries="fixed"`` (the block-sparse prefill method; its per-query-block choice is computed from the
all-gathered head-mean keys exactly as one process computes it). ``torch_ring`` takes ``full`` only.

Unpadded rows only (no attention_mask), no cache (prefill logits; decoding from a context-parallel cache is
not implemented), and models whose attention is plain softmax attention: soft-capping, learned sinks and the
model's own sliding-window layers are refused.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from attnkit.methods.base import Method
from attnkit.parallel.layout import SeqLayout
from attnkit.parallel.masks import WindowMask, all_gather_rows, dhsa_mask
from attnkit.parallel.ring import ring_attention
from attnkit.parallel.torch_ring import torch_ring_attention, torch_ring_context
from attnkit.parallel.ulysses import check_heads, ulysses_attention
from attnkit.registry import make_method

NAME = "attnkit_cp"
STRATEGIES = ("ring", "ulysses", "torch_ring")
METHODS = ("full", "window", "dhsa")
LOGITS = ("local", "full", "last")
DEFAULT_LAYOUT = {"ring": "zigzag", "ulysses": "contiguous", "torch_ring": "zigzag"}
#: id(text config) -> the active plan, for the duration of a cp_prefill call
ACTIVE: dict[int, "Plan"] = {}
_registered = [False]


@dataclass
class Plan:
    """What the attention function needs on every layer call of one context-parallel forward."""

    strategy: str
    layout: SeqLayout
    group: object
    method: Method
    shared: dict = field(default_factory=dict)  # state shared by the layers of the forward (DHSA's chunk ids)

    def visibility(self, query: torch.Tensor, key: torch.Tensor, scale: float):
        name = self.method.name
        if name == "full":
            return None
        if name == "window":
            return WindowMask(self.method.window)
        return dhsa_mask(self.method, query, key, self.layout, scale, self.group,
                         everyone=self.strategy == "ulysses", shared=self.shared)


def check_strategy(strategy: str, method: Method) -> None:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} is invalid; accepted: {', '.join(map(repr, STRATEGIES))}")
    if method.name not in METHODS:
        raise ValueError(f"method {method.name!r} has no context-parallel prefill; accepted: "
                         f"{', '.join(map(repr, METHODS))}")
    if strategy == "torch_ring" and method.name != "full":
        raise ValueError(f"strategy='torch_ring' runs causal SDPA only, not method {method.name!r}; accepted: "
                         "method 'full', or strategy 'ring' / 'ulysses' for sparse methods")


def cp_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention function transformers calls on every layer inside :func:`cp_prefill`.

    query (B, H, n/W, D) after RoPE at global positions; key/value (B, Hkv, n/W, D) -> ((B, n/W, H, D), None).
    """
    plan = ACTIVE.get(id(module.config))
    if plan is None:
        raise RuntimeError(f"'{NAME}' attention was called outside cp_prefill; restore the model's attention "
                           "implementation")
    for name in ("softcap", "s_aux", "sliding_window"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"context-parallel prefill: attention with {name} is not supported")
    scale = module.head_dim**-0.5 if scaling is None else scaling
    vis = plan.visibility(query, key, scale)
    if plan.strategy == "torch_ring":
        out = torch_ring_attention(query, key, value, scale)
    elif plan.strategy == "ring":
        out = ring_attention(query, key, value, plan.layout, plan.group, scale, vis)
    else:
        out = ulysses_attention(query, key, value, plan.layout, plan.group, scale, vis)
    return out.transpose(1, 2).contiguous(), None


def no_mask(*args, **kwargs) -> None:
    """Mask function paired with :func:`cp_attention`: masks come from global positions."""
    return None


def register() -> None:
    """Register the attention and mask functions under ``attnkit_cp`` (once, on first use; never at import)."""
    if _registered[0]:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, cp_attention)
    AttentionMaskInterface.register(NAME, no_mask)
    _registered[0] = True


@contextlib.contextmanager
def activated(model: torch.nn.Module, plan: Plan):
    """Select ``attnkit_cp`` on ``model`` for the block; restore the previous implementation on exit."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if id(config) in ACTIVE:
        raise RuntimeError("cp_prefill is already running on this model")
    register()
    saved = config._attn_implementation
    model.set_attn_implementation(NAME)
    ACTIVE[id(config)] = plan
    try:
        yield
    finally:
        ACTIVE.pop(id(config), None)
        model.set_attn_implementation(saved)


def make_layout(n: int, strategy: str = "ring", group=None, layout: str | None = None) -> SeqLayout:
    """The layout cp_prefill uses for ``n`` tokens over ``group`` (this process's rank in it)."""
    return SeqLayout(n, dist.get_world_size(group), dist.get_rank(group), layout or DEFAULT_LAYOUT[strategy])


@torch.no_grad()
def cp_prefill(
    model: torch.nn.Module, input_ids: torch.Tensor, strategy: str = "ring", group=None,
    method: str | Method = "full", layout: str | None = None, logits: str = "local", **settings,
) -> torch.Tensor:
    """Prefill ``input_ids`` with the sequence split over the ranks of ``group`` (every rank calls it).

    Parameters
    ----------
    model : a causal LM on this rank's device (weights replicated on every rank)
    input_ids : (B, n) the whole prompt, the same on every rank (ids are small); each rank embeds its shard
    strategy : "ring" | "ulysses" | "torch_ring" (CUDA only)
    method : "full" | "window" | "dhsa" (``boundaries="fixed"``) or such a Method; ``settings`` go to it
    layout : "zigzag" | "contiguous"; default zigzag for the rings, contiguous for Ulysses
    logits : "local" -> (B, n/W, V) this rank's tokens in layout order (positions ``make_layout(...)
        .positions()``); "full" -> (B, n, V) every token in order, on every rank; "last" -> (B, V) the last
        token's logits, on every rank (only its owner runs the LM head on it)
    """
    method = make_method(method, **settings)
    check_strategy(strategy, method)
    if logits not in LOGITS:
        raise ValueError(f"logits={logits!r} is invalid; accepted: {', '.join(map(repr, LOGITS))}")
    b, n = input_ids.shape
    lay = make_layout(n, strategy, group, layout)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if strategy == "ulysses":
        check_heads(config.num_attention_heads, config.num_key_value_heads, lay.world)
    device = input_ids.device
    ids = lay.shard(input_ids, 1)
    pos = lay.positions(device=device).expand(b, -1)
    keep: int | torch.Tensor = 0
    owner, at = lay.owner(n - 1)
    if logits == "last":
        keep = torch.tensor([at if lay.rank == owner else 0], device=device)
    plan = Plan(strategy, lay, group, method)
    ring_ctx = torch_ring_context(lay, group, device) if strategy == "torch_ring" else contextlib.nullcontext()
    with activated(model, plan), ring_ctx:
        out = model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=keep).logits
    if logits == "local":
        return out
    if logits == "last":
        out = out[:, 0].contiguous()
        src = dist.get_global_rank(group, owner) if group is not None else owner
        dist.broadcast(out, src=src, group=group)
        return out
    gathered = out.new_empty((lay.world * out.shape[1], b, out.shape[2]))
    all_gather_rows(gathered, out.transpose(0, 1).contiguous(), group)
    return lay.unshard(gathered, 0).transpose(0, 1)
