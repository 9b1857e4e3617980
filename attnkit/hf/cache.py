"""attnkit's cache layers: fixed-capacity slot buffers behind the transformers ``Cache`` API.

Every attnkit cache layer stores keys and values in slots of a preallocated buffer and records, per slot, the
absolute position of the token held there. Attention masks are built from those positions, so a layer may evict
and compact freely: causality, sliding windows and "what was kept" all follow from ``pos``.

Shapes: keys / values (B, Hkv, capacity, D); pos (B, Hkv, capacity) int64, -1 in empty slots and padding.

Padded batches (left padding): every row streams the same number of slots, pads included; a pad slot gets
position -1 and is never visible, and positions count real tokens per row (``count``, (B, 1) on the device), so
sinks, windows and budgets count from each row's first real token. Pad queries attend to every stored slot (their
outputs are discarded; this keeps their hidden states finite so that no NaN reaches real rows).
Host-side counters (``n``, ``seen``) are derived from tensor shapes only, so no step ever syncs with the device.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from attnkit import kernels

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
        self.qpos: torch.Tensor | None = None  # (B, q) positions of the last chunk's queries (-1: padding)
        self.count: torch.Tensor | None = None  # (B, 1) real tokens seen per row (device)
        self.count_before: torch.Tensor | None = None  # (B, 1) real tokens before the last chunk
        self.padded = False  # some stored slot is padding (host flag, set from the run's attention mask)
        # tokens the generation this cache is built for will hold (0: unknown); read now, the run resets it
        self.capacity_hint = 0 if run is None else run.capacity_hint
        self.chunk_hint = 512 if run is None or not run.chunk_hint else run.chunk_hint  # largest forward expected

    # -- transformers CacheLayerMixin API -------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.device = key_states.device
        self.keys = key_states.new_empty((b, h, 0, d))
        self.values = value_states.new_empty((b, h, 0, value_states.shape[-1]))
        self.pos = torch.empty((b, h, 0), dtype=torch.long, device=self.device)
        self.count = torch.zeros((b, 1), dtype=torch.long, device=self.device)
        self.is_initialized = True
        hint = self.capacity_hint
        if hint:  # one allocation for the whole generation (prompt + new tokens), not 1.5x growth steps
            self.reserve(self.initial_capacity(hint))

    def initial_capacity(self, tokens: int) -> int:
        """Slots to allocate up front for a generation of ``tokens`` tokens (methods with a budget hold less)."""
        return tokens

    def new_positions(self, q: int) -> torch.Tensor:
        """(B, q) positions of the chunk's tokens counted from each row's first real token (-1 for padding)."""
        flags = None if self.run is None else self.run.chunk_flags(q)
        self.count_before = self.count
        if flags is None:
            new_pos = self.count + torch.arange(q, device=self.device)
            self.count = self.count + q
        else:
            self.padded = True
            real = flags.long().cumsum(1)
            new_pos = torch.where(flags, self.count + real - 1, -1)
            self.count = self.count + real[:, -1:]
        return new_pos

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (B, Hkv, q, D) new states; return the (B, Hkv, n, D) stored states including them."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.static:
            return self.static_write(key_states, value_states)
        q = key_states.shape[-2]
        self.reserve(self.n + q)
        new_pos = self.new_positions(q)
        self.keys[:, :, self.n : self.n + q] = key_states
        self.values[:, :, self.n : self.n + q] = value_states
        self.pos[:, :, self.n : self.n + q] = new_pos.unsqueeze(1)
        self.n += q
        self.seen += q
        self.qpos = new_pos
        if self.run is not None:
            self.run.current[self.layer_idx] = self
        return self.keys[:, :, : self.n], self.values[:, :, : self.n]

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        if self.static and torch.compiler.is_compiling():
            return self.span, 0  # see get_seq_length
        return self.n + query_length, 0

    def get_seq_length(self) -> int:
        # Logical length: transformers derives default position ids from it. A compiled fixed-shape step gets the
        # length at the decode's start instead, so its trace does not specialise on a count that changes every
        # step: nothing in such a step uses it (positions come from the decoder, masks from ``pos``).
        if self.static and torch.compiler.is_compiling():
            return self.static_seen
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.n = self.seen = 0
        self.keys = self.values = self.pos = self.qpos = self.count = self.count_before = None
        self.padded = self.static = False
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
        self.resize(_round_up(max(need, int(self.capacity * 1.5))))

    def shrink(self) -> None:
        """Reallocate the slot buffers to what the generation can still need (the valid slots plus the tokens
        ``capacity_hint`` leaves to come, at least one; a later append grows them as usual), freeing the rest:
        after a one-time compression (SnapKV at the prompt's end, TCA's) the prompt-sized buffers would otherwise
        stay held."""
        cap = _round_up(self.n + max(1, self.capacity_hint - self.seen))
        if cap < self.capacity:
            self.resize(cap)

    def resize(self, cap: int) -> None:
        """New slot buffers of ``cap`` slots holding the first ``n`` (empty slots: pos -1, other buffers 0)."""
        for name in self.slot_buffers:
            old = getattr(self, name, None)
            if old is None:  # a subclass buffer not created yet (it is sized from ``pos`` when it is)
                continue
            new = old.new_full((*old.shape[:2], cap, *old.shape[3:]), -1 if name == "pos" else 0)
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

    # -- fixed-shape decode (CUDA graphs) ---------------------------------------------------------------------
    #: True between :meth:`begin_static` and :meth:`end_static`: single-token steps write at a device-held slot
    static = False

    def static_unsupported(self) -> str | None:
        """Why this layer cannot take fixed-shape decode steps (None: it can)."""
        if not self.is_initialized:
            return "the cache is empty (no prefill ran)"
        return None

    def static_span(self, steps: int) -> int:
        """Slots a static decode of ``steps`` tokens may use (the attention reads exactly these)."""
        return self.n + steps

    def begin_static(self, steps: int) -> None:
        """Prepare up to ``steps`` single-token decode steps with no shape change and no host sync.

        Buffers are sized once here (one spare slot past the span); the slot each step writes is ``wslot``
        (B, Hkv, 1) on the device; ``qpos``, ``count`` and ``count_before`` become private buffers updated in
        place. Host counters advance by :meth:`advance_host` (the graph runner calls it after each replay).
        """
        self.span = self.static_span(steps)
        self.reserve(self.span + 1)
        b, h = self.keys.shape[:2]
        self.count = self.count.clone()
        self.count_before = self.count.clone()
        self.qpos = self.count.clone()
        self.wslot = torch.full((b, h, 1), self.n, dtype=torch.long, device=self.device)
        self.pad_static = self.seen - self.count  # (B, 1): constant while decoding
        self.static_seen = self.seen
        self.static = True

    def row_pad(self) -> torch.Tensor:
        """(B, 1) pad slots before each row's first real token (left padding; slot = pad + position)."""
        return self.pad_static if self.static else self.seen - self.count

    def static_write(self, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one token per row (B, Hkv, 1, D) at ``wslot``; returns the whole (B, Hkv, cap, D) buffers."""
        if key_states.shape[-2] != 1 or self.pad_mask_active():
            raise RuntimeError("a static (fixed-shape) decode step takes one unpadded token per row")
        self.count_before.copy_(self.count)
        self.qpos.copy_(self.count)
        self.count.add_(1)
        fused = kernels.fused_cache(self.keys, key_states) if value_states.stride(-1) == 1 else None
        summary, page = self.summary_store()
        if fused is not None:  # one launch instead of three scatters (and the sink original's two, Quest's fold)
            sink_keys, sinks = self.sink_store()
            fused.append(self.keys, self.values, self.pos, key_states, value_states, self.wslot, self.qpos,
                         sink_keys, sinks, summary, page)
            self.sinks_stored = sink_keys is not None
            self.summary_folded = summary is not None
        else:
            b, h, _, d = key_states.shape
            self.keys.scatter_(2, self.wslot.unsqueeze(-1).expand(b, h, 1, d), key_states)
            self.values.scatter_(2, self.wslot.unsqueeze(-1).expand(b, h, 1, value_states.shape[-1]), value_states)
            self.pos.scatter_(2, self.wslot, self.qpos.view(b, 1, 1).expand(b, h, 1))
            self.sinks_stored = self.summary_folded = False
        if self.run is not None:
            self.run.current[self.layer_idx] = self
        return self.keys, self.values

    def sink_store(self) -> tuple[torch.Tensor | None, int]:
        """(float32 sink originals, sinks) a fused append also fills (StreamingLLM), or (None, 0)."""
        return None, 0

    def summary_store(self) -> tuple[torch.Tensor | None, int]:
        """(page summary, page size) a fused append also folds the key into (Quest), or (None, 0)."""
        return None, 0

    def pad_mask_active(self) -> bool:
        return self.run is not None and self.run.pad_mask is not None

    def advance_host(self) -> None:
        """Host counters after one static step (what the step did on the device). The decoder calls it after every
        step, eager or replayed, never the step itself: a step's traced or captured code reads no host counter."""
        self.n = min(self.n + 1, self.span)
        self.seen += 1

    def static_phase(self) -> str:
        """Which kind of fixed-shape step comes next ("" if every step is the same); steps of different kinds are
        captured in different CUDA graphs (e.g. Recycled Attention's drift checks)."""
        return ""

    def host_state(self) -> tuple:
        return self.n, self.seen

    def set_host_state(self, state: tuple) -> None:
        self.n, self.seen = state

    def static_attend(self, query: torch.Tensor, scaling: float, softcap: float | None) -> torch.Tensor:
        """(B, H, 1, D) decode query over the valid slots of the span -> (B, H, 1, D)."""
        if softcap is None:
            return kernels.decode_attention(query, self.keys, self.values, self.pos, self.span, scaling)
        from attnkit.reference import dense_attention

        span = self.span
        mask = (self.pos[:, :, :span] >= 0).unsqueeze(2)
        out, _, _ = dense_attention(query, self.keys[:, :, :span], self.values[:, :, :span], mask, scaling, softcap)
        return out.to(query.dtype)

    def static_after(self) -> None:
        """End of a static step's attention: advance the write slot (append-only layers)."""
        self.wslot.add_(1)

    def end_static(self) -> None:
        """Back to the dynamic layout (append-only layers already hold it)."""
        self.static = False

    # -- hooks for the attention function ---------------------------------------------------------------------
    def visible(self, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor | None:
        """Extra visibility rule on top of causality: (B', 1, q, 1) x (B', H', 1, n) -> (B', H', q, n) bool, or
        None."""
        return None

    def mask(self, rows: slice | None = None) -> torch.Tensor | None:
        """(B, Hkv, q, n) bool, or (1 or B, 1, q, n) for shared layouts: what each query of the chunk may see;
        ``rows`` builds only those queries' rows (a long masked chunk is attended in pieces, each with its own
        rows, so no (q, n) mask is ever whole).

        None when every stored slot is visible to every query (a decode step over a compacted, unpadded cache),
        so the attention call can take the unmasked fast path.
        """
        kpos = self.stored_pos()
        qpos = self.qpos if rows is None else self.qpos[:, rows]
        if self.shared_layout:  # one mask broadcasts over heads (and over rows when unpadded): no L x L per head
            kpos = kpos[:, :1] if self.padded else kpos[:1, :1]
            qpos = qpos if self.padded else qpos[:1]
        if rows is None and qpos.shape[1] == 1 and self.all_visible_in_decode and not self.padded:
            return None
        k = kpos.unsqueeze(-2)  # (B', H', 1, n)
        qq = qpos.view(qpos.shape[0], 1, -1, 1)  # (B', 1, q, 1)
        m = k <= qq
        if self.padded:
            m = m & (k >= 0)
        extra = self.visible(qq, k)
        m = m if extra is None else m & extra
        if self.padded:  # pad queries see everything: finite garbage instead of NaN rows
            m = m | (qq < 0)
        return m

    def real_queries(self, last: int | None = None, rows: slice | None = None) -> torch.Tensor | None:
        """(B, 1, q', 1) float 1/0 weights of the chunk's queries (its last ``last``, or its ``rows``), None when
        none is padding."""
        if not self.padded:
            return None
        qpos = self.qpos if last is None else self.qpos[:, -last:]
        qpos = qpos if rows is None else qpos[:, rows]
        return (qpos >= 0).to(torch.float32).view(qpos.shape[0], 1, -1, 1)

    #: True when every batch row and KV head holds the same positions (no per-head eviction)
    shared_layout = True
    #: True when, for a single new query, every stored slot is visible (holds after compaction for all
    #: attnkit policies; a subclass that keeps stale slots must set False).
    all_visible_in_decode = True

    def holds_prefix(self) -> bool:
        """True when the layer holds every token seen so far, in position order, with no extra visibility rule:
        its mask is then plain bottom-right causal (host ints only, no device check)."""
        return (
            self.n == self.seen and self.shared_layout and not self.padded and type(self).visible is KVLayer.visible
        )

    def band(self) -> tuple[bool, int | None]:
        """(True, w) when each row holds, after its left padding, a contiguous run of its newest tokens in position
        order and a query sees exactly the held real tokens at most ``w`` positions before it (w None: every one
        before it). The mask is then a per-row bottom-right causal band that a flash kernel applies without one
        (attnkit.hf.band; host ints only). Layers that evict, add a visibility rule or store positions their own
        way say False; one that has evicted nothing holds the same slots in every head."""
        plain = all(getattr(type(self), f) is getattr(KVLayer, f) for f in ("visible", "mask", "stored_pos"))
        return plain and self.n == self.seen, None

    def observe(self, probs: torch.Tensor, rows: slice | None = None) -> None:
        """Receive (B, H, q', n) attention probabilities of the queries named by :attr:`wants_probs`. With "all",
        a long chunk comes in query-row blocks (``rows``: which of the chunk's queries; one call per block, so
        no (B, H, q, n) tensor is ever whole): what a layer accumulates must not depend on the blocking."""

    def compact(self) -> None:
        """Evict down to the method's budget after this forward's attention (no-op: keep everything)."""

    def keep_slots(self, idx: torch.Tensor) -> None:
        """Compact to the slots ``idx`` (B, Hkv, k), ascending, moving them to the front of the buffers."""
        k = idx.shape[-1]
        for name in self.slot_buffers:
            buf = getattr(self, name)
            gather = idx.view(*idx.shape, *([1] * (buf.ndim - 3))).expand(*idx.shape, *buf.shape[3:])
            buf[:, :, :k] = torch.gather(buf[:, :, : self.n], 2, gather)
            if name not in ("keys", "values"):  # freed slots must not hand stale state (e.g. scores) to new tokens
                buf[:, :, k : self.n] = -1 if name == "pos" else 0
        self.n = k

    def keep_recent_and_top(self, scores: torch.Tensor, keep: int, recent: int) -> None:
        """Compact to each row's ``recent`` newest real tokens plus the best-scored others, ``keep`` slots in all.

        scores: (B, Hkv, n) float for the stored slots. Recency counts real tokens per row, so a padded row
        keeps the same tokens as that prompt alone; padding is dropped first (it may fill a short row's keep).
        """
        pos = self.stored_pos()
        newest = self.count.view(-1, 1, 1) - recent  # (B, 1, 1): a row's recent tokens have pos >= newest
        priority = scores.float().masked_fill(pos >= newest, float("inf")).masked_fill(pos < 0, float("-inf"))
        self.keep_slots(priority.topk(keep, dim=-1).indices.sort(dim=-1).values)


class WindowLayer(KVLayer):
    """Keeps the first ``sinks`` tokens and the ``window`` most recent ones (window attention, StreamingLLM,
    and the model's own sliding-window layers with ``window = sliding_window - 1``).

    Within a prefill chunk each query sees the sinks and the ``window`` tokens before it, exactly as if tokens
    had been fed one at a time. With ``rope_inv_freq`` (StreamingLLM) the sink keys sit at cache-relative
    positions: after each eviction they are the float32 originals turned by the row's eviction count (angles in
    float64), so no rounding accumulates however long the stream runs.

    Layout between forwards: slots [0, sinks) hold each row's tokens at positions 0..sinks-1 (a row's sink slot
    is empty while that token is still inside the window region), then the window region, right-aligned: all
    rows append in lockstep, so a row's newest tokens are the last slots whatever its padding.
    """

    def __init__(
        self,
        window: int,
        sinks: int = 0,
        layer_idx: int = 0,
        run: "Run | None" = None,
        rope_inv_freq: torch.Tensor | None = None,
    ) -> None:
        super().__init__(layer_idx, run)
        self.window = window
        self.sinks = sinks
        self.rope_inv_freq = rope_inv_freq
        self.evicted = 0  # slots evicted so far (= tokens, unpadded)
        self.sink_keys: torch.Tensor | None = None  # (B, Hkv, sinks, D) float32 unrotated sink keys (StreamingLLM)

    def initial_capacity(self, tokens: int) -> int:
        # budget + one prefill chunk (the chunk is attended before eviction) + the spare slot of a static step
        return min(tokens, self.sinks + self.window + max(self.chunk_hint, 1) + 1)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n_before = self.n
        out = super().update(key_states, value_states, *args, **kwargs)
        stored = self.static and self.sinks_stored  # the fused append wrote them
        if self.rope_inv_freq is not None and self.sinks and not stored and (
            self.static or self.padded or n_before < self.sinks
        ):
            self._store_sink_originals(key_states)
        return out

    def sink_store(self) -> tuple[torch.Tensor | None, int]:
        if self.rope_inv_freq is None or not self.sinks or self.sink_keys is None:
            return None, 0
        return self.sink_keys, self.sinks

    # -- fixed-shape decode: the window region becomes a ring of window + 1 slots -----------------------------
    def static_span(self, steps: int) -> int:
        return self.sinks + self.window + 1

    def begin_static(self, steps: int) -> None:
        super().begin_static(steps)
        if self.rope_inv_freq is not None:  # the fused ring kernel reads float32 frequencies on the device
            self._freq32 = self.rope_inv_freq.to(device=self.device, dtype=torch.float32).contiguous()
        end = self._region_end()
        self._relayout(end)
        self.n = self.span
        self.wslot.fill_(end)

    def end_static(self) -> None:
        super().end_static()
        end = self._region_end()
        self._relayout(end)
        self.n = end

    def _region_end(self) -> int:
        """Slot after the window region in the dynamic layout (one host sync: at the start or end of a decode)."""
        longest = int(self.count.max())
        return self.sinks + min(self.window, max(longest - self.sinks, 0))

    def _relayout(self, end: int) -> None:
        """Per row: the token at position p < sinks to slot p, the newest ``end - sinks`` others right-aligned
        to end at slot ``end``; everything else (padding, tokens already out of the window) is dropped."""
        s, n, cap = self.sinks, self.n, self.capacity
        pos = self.pos[:, :, :n]
        cnt = self.count.view(-1, 1, 1)
        recent = (pos >= s) & (pos >= cnt - (end - s))
        dest = torch.where((pos >= 0) & (pos < s), pos, torch.where(recent, end - cnt + pos, cap))
        for name in ("keys", "values", "pos"):
            buf = getattr(self, name)
            fresh = buf.new_full((*buf.shape[:2], cap + 1, *buf.shape[3:]), -1 if name == "pos" else 0)
            index = dest.view(*dest.shape, *([1] * (buf.ndim - 3))).expand(*dest.shape, *buf.shape[3:])
            fresh.scatter_(2, index, buf[:, :, :n])
            buf.copy_(fresh[:, :, :cap])

    def static_after(self) -> None:
        """Advance the ring; the slot written next holds the oldest window token, which leaves now (as
        :meth:`compact` evicts it), unless it is a sink of a row shorter than the sinks: that one moves to its
        slot in the sink region."""
        s = self.sinks
        fused = kernels.fused_cache(self.keys, self.keys)
        sink_keys, _ = self.sink_store()
        if fused is not None and (sink_keys is None or self.rope_inv_freq.shape[-1] in (8, 16, 32, 64, 128)):
            fused.ring_after(self.keys, self.values, self.pos, self.wslot, self.count, s, self.window, sink_keys,
                             self._freq32 if sink_keys is not None else None)
            return
        nxt = self.wslot + 1
        nxt = torch.where(nxt >= s + self.window + 1, s, nxt)  # (B, Hkv, 1)
        if s:
            old = self.pos.gather(2, nxt)
            dest = torch.where((old >= 0) & (old < s), old, nxt)
            for buf in (self.keys, self.values):
                shape = (*nxt.shape, buf.shape[-1])
                buf.scatter_(2, dest.unsqueeze(-1).expand(shape), buf.gather(2, nxt.unsqueeze(-1).expand(shape)))
            self.pos.scatter_(2, dest, old)
        self.pos.scatter_(2, nxt, -1)
        self.wslot.copy_(nxt)
        self._turn_sinks()

    def _store_sink_originals(self, key_states: torch.Tensor) -> None:
        """Keep float32 copies of the chunk's keys at positions < sinks (per row: padding shifts them)."""
        b, h, q, d = key_states.shape
        s = self.sinks
        if self.sink_keys is None:  # one spare row past the sinks takes every other token's write
            self._sink_scratch = torch.zeros((b, h, s + 1, d), dtype=torch.float32, device=key_states.device)
            self.sink_keys = self._sink_scratch[:, :, :s]
        target = torch.where((self.qpos >= 0) & (self.qpos < s), self.qpos, s)  # (B, q); s = discard slot
        index = target.view(b, 1, q, 1).expand(b, h, q, d)
        # scatter_ picks one writer per target: only the discard slot receives several
        self._sink_scratch.scatter_(2, index, key_states.float())

    def held_bytes(self) -> int:
        extra = 0 if self.sink_keys is None else self._sink_scratch.nbytes
        return super().held_bytes() + extra

    def reset(self) -> None:
        super().reset()
        self.evicted, self.sink_keys = 0, None

    @property
    def is_sliding(self) -> bool:  # transformers uses this to pick mask sizes for hybrid caches
        return self.sinks == 0

    def band(self) -> tuple[bool, int | None]:
        # without sinks the held tokens stay one contiguous run per row (compaction keeps the newest)
        plain = all(getattr(type(self), f) is getattr(WindowLayer, f) for f in ("visible", "mask", "stored_pos"))
        return plain and self.sinks == 0 and self.shared_layout, self.window

    def visible(self, qpos: torch.Tensor, kpos: torch.Tensor) -> torch.Tensor:
        near = kpos >= qpos - self.window  # (qpos - kpos) would build an int64 (B, 1, q, n): 20 GiB at 16K x 10 rows
        return near | (kpos < self.sinks)

    def compact(self) -> None:
        if self.padded:
            return self._compact_padded()
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
        self._turn_sinks()

    def _compact_padded(self) -> None:
        """Per row: the sink region gathers the tokens at positions < sinks found before the window region."""
        s, w, n = self.sinks, self.window, self.n
        if n <= s + w:
            return
        head = self.pos[:, :, : n - w]  # (B, Hkv, n - w) slots that leave the window region
        sink_bufs = None
        if s:
            match = head.unsqueeze(-1) == torch.arange(s, device=self.device)  # (B, Hkv, n - w, s)
            found = match.any(2)  # (B, Hkv, s)
            slot = match.to(torch.int8).argmax(2)  # (B, Hkv, s)
            sink_bufs = []
            for buf in (self.keys, self.values):
                sink_bufs.append(torch.gather(buf, 2, slot.unsqueeze(-1).expand(*slot.shape, buf.shape[-1])))
            sink_pos = torch.where(found, torch.arange(s, device=self.device), -1)
        for buf in (self.keys, self.values, self.pos):
            buf[:, :, s : s + w] = buf[:, :, n - w : n].clone()
        if s:
            self.keys[:, :, :s], self.values[:, :, :s] = sink_bufs
            self.pos[:, :, :s] = sink_pos
        self.pos[:, :, s + w : n] = -1
        self.n = s + w
        self.evicted += n - s - w
        self._turn_sinks()

    def _turn_sinks(self) -> None:
        """StreamingLLM: sinks sit at cache-relative positions, i.e. turned by each row's eviction count."""
        if self.rope_inv_freq is None or not self.sinks or self.sink_keys is None:
            return
        from attnkit.hf.rope import apply_rotation, rotation_rows

        shift = (self.count - self.sinks - self.window).clamp_min(0).view(-1)  # (B,) real tokens evicted
        cos, sin = rotation_rows(shift, self.rope_inv_freq)  # (B, D_rot) each
        turned = apply_rotation(self.sink_keys, cos.view(-1, 1, 1, cos.shape[-1]), sin.view(-1, 1, 1, sin.shape[-1]))
        self.keys[:, :, : self.sinks] = turned.to(self.keys.dtype)


class AttnkitCache(Cache):
    """A transformers ``Cache`` made of attnkit layers, one per decoder layer, owned by a :class:`Run`."""

    #: set while a compiled decoder owns this cache (:mod:`attnkit.hf.step_ops`)
    step_handle: int | None = None

    def __init__(self, layers: list[KVLayer], run: "Run | None" = None) -> None:
        super().__init__(layers=layers)
        self.run = run

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.step_handle is not None and torch.compiler.is_compiling():
            # a compiled decode step: the layer's write is an opaque op; the attention takes its token for order
            token = torch.ops.attnkit.step_write(key_states, value_states, self.step_handle, layer_idx)
            return token, token
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def held_bytes(self) -> int:
        return sum(layer.held_bytes() for layer in self.layers)
