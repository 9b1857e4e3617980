"""RazorAttention's storage: per layer, the retrieval KV heads in a full buffer, the others in sinks + a ring window
with one compensation token, each group with its own slot buffers and positions (see razorattention.py).

Shapes (per layer): retrieval group keys / values / pos (B, Hr, n_r, D) / (B, Hr, n_r); local group
(B, Hl, n_l, D) with n_l <= sinks + window + 2 after the prefill; compensation sums (B, Hl, D) float32 and counts
(B, Hl) float32. Hr + Hl = Hkv.
"""

from __future__ import annotations

import math

import torch

from attnkit.hf.attention import attend_layer
from attnkit.hf.cache import KVLayer, WindowLayer
from attnkit.reference import dense_attention


class CompensatedWindowLayer(WindowLayer):
    """Non-retrieval KV heads: dense during a prefill, then ``sinks`` + ``window`` recent tokens + one
    compensation token whose key / value are the means of every token evicted so far (keys as stored, rotated).

    A multi-token forward keeps every token (the paper compresses after the prefill); the next single-token
    forward (or :meth:`begin_static`) first evicts down to sinks + window into the compensation sums and shrinks
    the buffers to sinks + window + 2 slots, so the memory is really freed. Decode steps then slide the window
    (WindowLayer's compaction, or its ring in fixed-shape steps), each evicted token joining the sums.

    ``window=None`` applies the paper's rule at each compression: L_h = max(S0, ceil(N / C)) with N the longest
    row's real tokens so far (in a padded batch rows differ only past N = C * S0).
    """

    def __init__(self, window: int | None, sinks: int, compensation: bool, rule: tuple[int, int],
                 layer_idx: int, run) -> None:
        super().__init__(rule[0] if window is None else window, sinks, layer_idx, run)
        self.fixed_window = window
        self.rule = rule
        self.compensation = compensation
        self.prefilled = False  # a multi-token forward appended since the last compression
        self.has_comp = False  # host flag: the compensation token may hold tokens (its count decides per row)
        self.comp_keys = self.comp_values = self.comp_count = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        b, h, _, d = key_states.shape
        self.comp_keys = torch.zeros((b, h, d), dtype=torch.float32, device=self.device)
        self.comp_values = torch.zeros((b, h, value_states.shape[-1]), dtype=torch.float32, device=self.device)
        self.comp_count = torch.zeros((b, h), dtype=torch.float32, device=self.device)

    def initial_capacity(self, tokens: int) -> int:
        return tokens  # the prefill is dense: the whole prompt is held until the compression

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if key_states.shape[-2] == 1 and self.prefilled and not self.static:
            self.compress()  # the prompt ended with the previous forward
        out = super().update(key_states, value_states, *args, **kwargs)
        if key_states.shape[-2] > 1:
            self.prefilled = True
        return out

    def visible(self, qpos: torch.Tensor, kpos: torch.Tensor) -> None:
        return None  # prefill chunks are dense; after a compression every held slot is in the window

    def holds_prefix(self) -> bool:
        return self.n == self.seen and not self.padded

    def compact(self) -> None:
        if self.qpos.shape[1] == 1:  # decode step: slide the window (a prefill stays whole until decoding)
            self.evict_to_window()

    def compress(self) -> None:
        """End of a prefill: evict down to sinks + window (into the sums), then free the surplus slots."""
        if self.fixed_window is None:  # one host sync per prompt
            longest = int(self.count.max())
            self.window = max(self.rule[0], math.ceil(longest / self.rule[1]))
        self.evict_to_window()
        self.prefilled = False
        target = self.sinks + self.window + 2  # one decode token + the spare slot of a fixed-shape step
        if self.capacity > target and self.n <= target:
            for name in self.slot_buffers:
                setattr(self, name, getattr(self, name)[:, :, :target].clone())

    def evict_to_window(self) -> None:
        """WindowLayer's compaction, after adding the leaving tokens (slots before the window region whose
        position is >= sinks: padding and sinks stay out) to the compensation sums."""
        s, w, n = self.sinks, self.window, self.n
        if n <= s + w:
            return
        if self.compensation:
            leaving = (self.pos[:, :, : n - w] >= s).float()  # (B, Hl, n - w)
            self.comp_keys += torch.einsum("bhn,bhnd->bhd", leaving, self.keys[:, :, : n - w].float())
            self.comp_values += torch.einsum("bhn,bhnd->bhd", leaving, self.values[:, :, : n - w].float())
            self.comp_count += leaving.sum(-1)
            self.has_comp = True
        super().compact()

    def compensation_token(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(key (B, Hl, D), value (B, Hl, D), logit bias (B, Hl) = log(count), valid (B, Hl) bool: count > 0)."""
        count = self.comp_count.clamp_min(1.0)
        return (self.comp_keys / count.unsqueeze(-1), self.comp_values / count.unsqueeze(-1), count.log(),
                self.comp_count > 0)

    def held_bytes(self) -> int:
        if self.comp_keys is None:
            return super().held_bytes()
        return super().held_bytes() + self.comp_keys.nbytes + self.comp_values.nbytes + self.comp_count.nbytes

    def reset(self) -> None:
        super().reset()
        self.prefilled = self.has_comp = False
        self.comp_keys = self.comp_values = self.comp_count = None

    # -- fixed-shape decode: WindowLayer's ring, plus the leaving token joins the sums --------------------------
    def begin_static(self, steps: int) -> None:
        if self.prefilled:
            self.compress()
        super().begin_static(steps)
        self.has_comp = self.compensation  # evictions now happen on the device: let the counts decide

    def static_attend(self, query: torch.Tensor, scaling: float, softcap: float | None) -> torch.Tensor:
        if not self.has_comp:
            return super().static_attend(query, scaling, softcap)
        valid = (self.pos[:, :, : self.span] >= 0).unsqueeze(2)  # (B, Hl, 1, span)
        out, _ = attend_compensated(self, query, self.keys[:, :, : self.span], self.values[:, :, : self.span], valid,
                                    scaling, softcap)
        return out

    def static_after(self) -> None:
        if self.compensation:
            nxt = self.wslot + 1
            nxt = torch.where(nxt >= self.sinks + self.window + 1, self.sinks, nxt)  # (B, Hl, 1): the slot that leaves
            leaving = (self.pos.gather(2, nxt) >= self.sinks).float()  # (B, Hl, 1); a short row's sink moves instead
            for buf, acc in ((self.keys, self.comp_keys), (self.values, self.comp_values)):
                old = buf.gather(2, nxt.unsqueeze(-1).expand(*nxt.shape, buf.shape[-1])).squeeze(2)
                acc.add_(old.float() * leaving)
            self.comp_count.add_(leaving.squeeze(-1))
        super().static_after()


def attend_compensated(layer: CompensatedWindowLayer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       mask: torch.Tensor | None, scaling: float, softcap: float | None) -> tuple[torch.Tensor, dict]:
    """Attention of query (B, Hq, q, D) over key / value (B, Hl, n, D) under mask (B', 1 | Hl, q, n) or None, plus
    the layer's compensation token as an extra key with logit bias log(count) (eq. 5); float32 eager.

    Returns (out (B, Hq, q, D) in the query's dtype, the record: key / value (B, Hl, n + 1, D), mask
    (B, Hl, q, n + 1), bias (B, Hq, 1, n + 1)), the exact inputs of :func:`attnkit.reference.dense_attention`.
    """
    b, hl, n = key.shape[0], key.shape[1], key.shape[2]
    q, group = query.shape[2], query.shape[1] // hl
    ck, cv, cbias, cvalid = layer.compensation_token()
    key_ext = torch.cat([key.float(), ck.unsqueeze(2)], dim=2)
    value_ext = torch.cat([value.float(), cv.unsqueeze(2)], dim=2)
    base = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=key.device) if mask is None else mask
    base = base.expand(b, hl, q, n)
    mask_ext = torch.cat([base, cvalid.view(b, hl, 1, 1).expand(b, hl, q, 1)], dim=-1)  # (B, Hl, q, n + 1)
    bias = torch.cat([cbias.new_zeros((b, hl, n)), cbias.unsqueeze(-1)], dim=-1)  # (B, Hl, n + 1)
    bias = bias.repeat_interleave(group, dim=1).unsqueeze(2)  # (B, Hq, 1, n + 1): query head h reads KV head h // G
    out, _, _ = dense_attention(query, key_ext, value_ext, mask_ext, scaling, softcap, bias)
    return out.to(query.dtype), dict(key=key_ext, value=value_ext, mask=mask_ext, bias=bias)


def attend_local(run, layer: CompensatedWindowLayer, query: torch.Tensor, scaling: float,
                 softcap: float | None) -> torch.Tensor:
    """The local group's attention: plain :func:`attend_layer` until something was evicted (and in fixed-shape
    steps, whose ``static_attend`` adds the token itself), then with the compensation token."""
    key, value = layer.keys[:, :, : layer.n], layer.values[:, :, : layer.n]
    if layer.static or not layer.has_comp:
        return attend_layer(run, layer, query, key, value, scaling, softcap)
    mask = layer.mask()
    out, record = attend_compensated(layer, query, key, value, mask, scaling, softcap)
    if run.recorder is not None:
        run.recorder(dict(layer=layer.layer_idx, query=query, scaling=scaling, out=out, **record))
    layer.compact()
    return out


def attend_full(run, layer: KVLayer, query: torch.Tensor, scaling: float, softcap: float | None) -> torch.Tensor:
    """The retrieval group's attention: the dense path over everything it holds."""
    return attend_layer(run, layer, query, layer.keys[:, :, : layer.n], layer.values[:, :, : layer.n], scaling, softcap)


class RazorLayer(KVLayer):
    """One decoder layer's cache as two groups of KV heads: ``full`` (retrieval heads, a plain :class:`KVLayer`)
    and ``local`` (the others, a :class:`CompensatedWindowLayer`); either may be absent.

    The storage lives in the groups: ``keys`` / ``values`` name the first group's buffers (batch and device only),
    ``stored_pos()`` merges both groups' positions in KV-head order, -1 padded (B, Hkv, max n).
    """

    shared_layout = False

    def __init__(self, retrieval: list[int], n_kv: int, n_heads: int, local: CompensatedWindowLayer | None,
                 layer_idx: int, run) -> None:
        super().__init__(layer_idx, run)
        self.retrieval = sorted(retrieval)
        self.others = [h for h in range(n_kv) if h not in self.retrieval]
        self.n_kv, self.group_size = n_kv, n_heads // n_kv
        self.full = KVLayer(layer_idx, run) if self.retrieval else None
        self.local = local if self.others else None
        pairs = ((self.full, self.retrieval), (self.local, self.others))
        self.groups = [(g, heads) for g, heads in pairs if g is not None]
        self.index: list[tuple[torch.Tensor, torch.Tensor]] = []  # per group: (KV heads, query heads) on the device

    # the storage is the groups': these names exist for code that reads a layer's batch size or device
    keys = property(lambda self: self.groups[0][0].keys, lambda self, v: None)
    values = property(lambda self: self.groups[0][0].values, lambda self, v: None)
    pos = property(lambda self: self.stored_pos() if self.is_initialized else None, lambda self, v: None)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Split (B, Hkv, q, D) by group and append to each; returns the new states (``attend`` reads the groups)."""
        if not self.is_initialized:
            self.device, self.is_initialized = key_states.device, True
            g = self.group_size
            for _, heads in self.groups:
                kv = torch.tensor(heads, dtype=torch.long, device=self.device)
                self.index.append((kv, (kv.view(-1, 1) * g + torch.arange(g, device=self.device)).view(-1)))
        split = len(self.groups) > 1
        for (group, _), (kv, _) in zip(self.groups, self.index):
            group.update(key_states.index_select(1, kv) if split else key_states,
                         value_states.index_select(1, kv) if split else value_states)
        if not self.static:  # a fixed-shape step's host counters are synced after it (advance_host)
            self._sync()
        if self.run is not None:
            self.run.current[self.layer_idx] = self
        return key_states, value_states

    def attend(self, run, query: torch.Tensor, scaling: float, softcap: float | None) -> torch.Tensor:
        """query (B, H, q, D) -> (B, H, q, D): each group's query heads over that group's storage, put back in
        head order (query head h reads KV head h // G)."""
        attend = lambda g, q: attend_full(run, g, q, scaling, softcap) if g is self.full else \
            attend_local(run, g, q, scaling, softcap)  # noqa: E731
        if len(self.groups) == 1:
            out = attend(self.groups[0][0], query)
        else:
            outs = [(qi, attend(g, query.index_select(1, qi))) for (g, _), (_, qi) in zip(self.groups, self.index)]
            out = query.new_empty((*query.shape[:3], outs[0][1].shape[-1]))
            for qi, part in outs:
                out.index_copy_(1, qi, part)
        if not self.static:
            self._sync()
        return out

    def _sync(self) -> None:
        first = self.groups[0][0]
        self.n = max(g.n for g, _ in self.groups)
        self.seen, self.qpos, self.count, self.count_before = first.seen, first.qpos, first.count, first.count_before
        self.padded = any(g.padded for g, _ in self.groups)

    def stored_pos(self) -> torch.Tensor:
        parts = [g.stored_pos() for g, _ in self.groups]
        first = parts[0]
        out = first.new_full((first.shape[0], self.n_kv, max(p.shape[-1] for p in parts)), -1)
        for part, (_, heads) in zip(parts, self.groups):
            out[:, heads, : part.shape[-1]] = part
        return out

    def held_bytes(self) -> int:
        return sum(g.held_bytes() for g, _ in self.groups)

    def reset(self) -> None:
        for g, _ in self.groups:
            g.reset()
        super().reset()
        self.index = []

    # -- fixed-shape decode: each group runs its own (append for full, ring + compensation for local) ----------
    def static_unsupported(self) -> str | None:
        if not self.is_initialized:
            return "the cache is empty (no prefill ran)"
        return next((r for r in (g.static_unsupported() for g, _ in self.groups) if r), None)

    def begin_static(self, steps: int) -> None:
        for g, _ in self.groups:
            g.begin_static(steps)
        self.static = True
        self._sync()
        self.span = max(g.span for g, _ in self.groups)
        self.static_seen = self.seen

    def advance_host(self) -> None:
        for g, _ in self.groups:
            g.advance_host()
        self._sync()

    def host_state(self) -> tuple:
        return tuple(g.host_state() for g, _ in self.groups)

    def set_host_state(self, state: tuple) -> None:
        for (g, _), s in zip(self.groups, state):
            g.set_host_state(s)
        self._sync()

    def end_static(self) -> None:
        for g, _ in self.groups:
            g.end_static()
        self.static = False
        self._sync()
