"""attnkit's cache layers: fixed-capacity slot buffers behind the transformers ``Cache`` API.

Every attnkit cache layer stores keys and values in slots of a preallocated buffer and records, per slot, the
absolute position of the token held there. Attention masks are built from those positions, so a layer may evict
and compact freely: causality, sliding windows and "what was kept" all follow from ``pos``.

Shapes: keys / values (B, Hkv, capacity, D); pos (B, Hkv, capacity) int64, -1 in empty slots.
Host-side counters (``n``, ``seen``) are derived from tensor shapes only, so no step ever syncs with the device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

if TYPE_CHECKING:
    from attnkit.session import Run

GROWTH_ALIGN = 64


def _round_up(x: int, align: int = GROWTH_ALIGN) -> int:
    return -(-x // align) * align


class KVLayer(CacheLayerMixin):
    """Keeps every token (the dense baseline); subclasses evict in :meth:`compact`.

    Lifecycle of one forward through this layer: ``update`` appends the chunk's q tokens and returns all stored
    slots; the attention function asks :meth:`mask` what each query may see, attends, hands attention
    probabilities to :meth:`observe` if :attr:`wants_probs`, then calls :meth:`compact` so that what is held
    between forwards is the method's budget.
    """

    is_sliding = False
    is_compileable = False
    #: per-slot buffers, all (B, Hkv, capacity, ...): grown together, compacted together
    slot_buffers: tuple[str, ...] = ("keys", "values", "pos")
    is_croppable = False
    #: which queries of a chunk must deliver probabilities to ``observe``: None, "all" or "last:<w>"
    wants_probs: str | None = None

    def __init__(self, layer_idx: int = 0, run: "Run | None" = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.run = run
        self.n = 0  # valid slots (host int)
        self.seen = 0  # tokens appended so far = next absolute position
        self.pos: torch.Tensor | None = None
        self.qpos: torch.Tensor | None = None  # (q,) positions of the last chunk's queries

    # -- transformers CacheLayerMixin API -------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.device = key_states.device
        self.keys = key_states.new_empty((b, h, 0, d))
        self.values = value_states.new_empty((b, h, 0, value_states.shape[-1]))
        self.pos = torch.empty((b, h, 0), dtype=torch.long, device=self.device)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (B, Hkv, q, D) new states; return the (B, Hkv, n, D) stored states including them."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        self.reserve(self.n + q)
        new_pos = torch.arange(self.seen, self.seen + q, device=self.device)
        self.keys[:, :, self.n : self.n + q] = key_states
        self.values[:, :, self.n : self.n + q] = value_states
        self.pos[:, :, self.n : self.n + q] = new_pos
        self.n += q
        self.seen += q
        self.qpos = new_pos
        if self.run is not None:
            self.run.current[self.layer_idx] = self
        return self.keys[:, :, : self.n], self.values[:, :, : self.n]

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return self.n + query_length, 0

    def get_seq_length(self) -> int:
        # Logical length: transformers derives default position ids from it.
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.n = self.seen = 0
        self.keys = self.values = self.pos = self.qpos = None
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("attnkit caches do not support beam search yet")

    # -- storage --------------------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[-2]

    def reserve(self, need: int) -> None:
        """Grow the slot buffers to hold ``need`` tokens (rare, host-side; amortised by 1.5x growth)."""
        if need <= self.capacity:
            return
        cap = _round_up(max(need, int(self.capacity * 1.5)))
        for name in self.slot_buffers:
            old = getattr(self, name)
            fill = -1 if name == "pos" else 0
            new = old.new_full((*old.shape[:2], cap, *old.shape[3:]), fill)
            new[:, :, : self.n] = old[:, :, : self.n]
            setattr(self, name, new)

    def held_bytes(self) -> int:
        """Bytes of key/value storage this layer actually holds (allocated capacity, not just valid slots)."""
        if self.keys is None:
            return 0
        return self.keys.nbytes + self.values.nbytes

    def stored_pos(self) -> torch.Tensor:
        """(B, Hkv, n) absolute positions of the stored tokens."""
        return self.pos[:, :, : self.n]

    # -- hooks for the attention function ---------------------------------------------------------------------
    def visible(self, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor | None:
        """Extra visibility rule on top of causality: (q,) x (B, Hkv, n) -> (B, Hkv, q, n) bool, or None."""
        return None

    def mask(self) -> torch.Tensor | None:
        """(B, Hkv, q, n) bool, or (1, 1, q, n) for shared layouts: what each query of the chunk may attend to.

        None when every stored slot is visible to every query (a decode step over a compacted cache), so the
        attention call can take the unmasked fast path.
        """
        kpos = self.stored_pos()
        if self.shared_layout:  # one (1, 1, q, n) mask broadcasts over batch and heads: no L x L per head
            kpos = kpos[:1, :1]
        qpos = self.qpos
        if qpos.shape[0] == 1 and self.all_visible_in_decode:
            return None
        m = kpos.unsqueeze(-2) <= qpos.view(1, 1, -1, 1)
        extra = self.visible(qpos, kpos)
        return m if extra is None else m & extra

    #: True when every batch row and KV head holds the same positions (no per-head eviction)
    shared_layout = True
    #: True when, for a single new query, every stored slot is visible (holds after compaction for all
    #: attnkit policies; a subclass that keeps stale slots must set False).
    all_visible_in_decode = True

    def holds_prefix(self) -> bool:
        """True when the layer holds every token seen so far, in position order, with no extra visibility rule:
        its mask is then plain bottom-right causal (host ints only, no device check)."""
        return self.n == self.seen and self.shared_layout and type(self).visible is KVLayer.visible

    def observe(self, probs: torch.Tensor) -> None:
        """Receive (B, H, q', n) attention probabilities of the queries named by :attr:`wants_probs`."""

    def compact(self) -> None:
        """Evict down to the method's budget after this forward's attention (no-op: keep everything)."""

    def keep_slots(self, idx: torch.Tensor) -> None:
        """Compact to the slots ``idx`` (B, Hkv, k), ascending, moving them to the front of the buffers."""
        k = idx.shape[-1]
        for name in self.slot_buffers:
            buf = getattr(self, name)
            gather = idx.view(*idx.shape, *([1] * (buf.ndim - 3))).expand(*idx.shape, *buf.shape[3:])
            buf[:, :, :k] = torch.gather(buf[:, :, : self.n], 2, gather)
        self.pos[:, :, k : self.n] = -1
        self.n = k

    def recent_and_top(self, scores: torch.Tensor, keep: int, recent: int) -> torch.Tensor:
        """Slot indices (B, Hkv, keep), ascending: the last ``recent`` slots plus the best-scored others.

        scores: (B, Hkv, n - recent) for the older slots (slots are in position order).
        """
        top = scores.topk(keep - recent, dim=-1).indices
        tail = torch.arange(self.n - recent, self.n, device=scores.device).expand(*scores.shape[:2], recent)
        return torch.cat([top.sort(dim=-1).values, tail], dim=-1)


class WindowLayer(KVLayer):
    """Keeps the first ``sinks`` tokens and the ``window`` most recent ones (window attention, StreamingLLM,
    and the model's own sliding-window layers with ``window = sliding_window - 1``).

    Within a prefill chunk each query sees the sinks and the ``window`` tokens before it, exactly as if tokens
    had been fed one at a time. ``on_evict(layer, n_evicted)`` lets StreamingLLM re-rotate the sinks.
    """

    def __init__(
        self,
        window: int,
        sinks: int = 0,
        layer_idx: int = 0,
        run: "Run | None" = None,
        on_evict: Callable[["WindowLayer", int], None] | None = None,
    ) -> None:
        super().__init__(layer_idx, run)
        self.window = window
        self.sinks = sinks
        self.on_evict = on_evict
        self.evicted = 0  # tokens evicted so far
        self.sink_keys: torch.Tensor | None = None  # float32 running copy of the shifted sink keys (StreamingLLM)

    def held_bytes(self) -> int:
        extra = 0 if self.sink_keys is None else self.sink_keys.nbytes
        return super().held_bytes() + extra

    def reset(self) -> None:
        super().reset()
        self.evicted, self.sink_keys = 0, None

    @property
    def is_sliding(self) -> bool:  # transformers uses this to pick mask sizes for hybrid caches
        return self.sinks == 0

    def visible(self, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
        near = (qpos.view(1, 1, -1, 1) - kpos.unsqueeze(-2)) <= self.window
        return near | (kpos < self.sinks).unsqueeze(-2)

    def compact(self) -> None:
        sinks = min(self.sinks, self.seen)
        keep_recent = min(self.window, self.seen - sinks)
        drop = self.n - sinks - keep_recent
        if drop <= 0:
            return
        # Slots are in position order: sinks at the front, then a contiguous run of recent tokens.
        for buf in (self.keys, self.values, self.pos):
            buf[:, :, sinks : sinks + keep_recent] = buf[:, :, self.n - keep_recent : self.n].clone()
        self.pos[:, :, sinks + keep_recent : self.n] = -1
        self.n = sinks + keep_recent
        self.evicted += drop
        if self.on_evict is not None:
            self.on_evict(self, drop)


class AttnkitCache(Cache):
    """A transformers ``Cache`` made of attnkit layers, one per decoder layer, owned by a :class:`Run`."""

    def __init__(self, layers: list[KVLayer], run: "Run | None" = None) -> None:
        super().__init__(layers=layers)
        self.run = run

    def held_bytes(self) -> int:
        return sum(layer.held_bytes() for layer in self.layers)
