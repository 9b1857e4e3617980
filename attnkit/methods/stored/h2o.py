"""H2O: heavy-hitter eviction by accumulated attention, plus a recent window."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit import kernels
from attnkit.hf.cache import KVLayer
from attnkit.reference import dense_attention
from attnkit.methods.base import LayerContext, Method, check_int


class H2OLayer(KVLayer):
    """Per KV head: the ``recent`` newest slots plus the ``heavy`` slots with the most accumulated attention.

    acc: (B, Hkv, capacity) float32, attention each slot has received so far, summed over queries and over the
    query heads of its GQA group.
    """

    wants_probs = "all"
    shared_layout = False
    slot_buffers = ("keys", "values", "pos", "acc")

    def __init__(self, heavy: int, recent: int, layer_idx: int, run) -> None:
        super().__init__(layer_idx, run)
        self.heavy, self.recent = heavy, recent

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.acc = torch.zeros(self.pos.shape, dtype=torch.float32, device=self.device)

    def observe(self, probs: torch.Tensor, rows: slice | None = None) -> None:  # a sum over queries: blocks add up
        b, h, _, n = probs.shape
        per_kv = probs.sum(2).view(b, self.keys.shape[1], -1, n).sum(2)  # (B, Hkv, n)
        self.acc[:, :, :n] += per_kv

    def initial_capacity(self, tokens: int) -> int:
        return min(tokens, self.heavy + self.recent + max(self.chunk_hint, 1) + 1)

    def static_span(self, steps: int) -> int:
        return min(self.n + steps, self.heavy + self.recent + 1)

    def static_attend(self, query: torch.Tensor, scaling: float, softcap: float | None) -> torch.Tensor:
        """Attend over the span, score, and pick the slot to evict (written by the next token): in place."""
        span = self.span
        pos = self.pos[:, :, :span]
        keys, values = self.keys[:, :, :span], self.values[:, :, :span]
        if softcap is None:  # the attention and each slot's received probability, no probabilities written
            out, mass = kernels.decode_attention_mass(query, keys, values, pos, span, scaling)
            self.acc[:, :, :span] += mass
        else:
            out, probs, _ = dense_attention(query, keys, values, (pos >= 0).unsqueeze(2), scaling, softcap)
            self.observe(probs)
        newest = self.count.view(-1, 1, 1) - self.recent
        priority = self.acc[:, :, :span].masked_fill(pos >= newest, float("inf")).masked_fill(pos < 0, float("-inf"))
        # Before the budget is reached the lowest priority is an empty slot (-inf), and "evicting" it is a no-op.
        self.evict = priority.argmin(-1, keepdim=True)  # (B, Hkv, 1)
        return out.to(query.dtype)

    def static_after(self) -> None:
        self.pos.scatter_(2, self.evict, -1)
        self.acc.scatter_(2, self.evict, 0.0)
        self.wslot.copy_(self.evict)

    def end_static(self) -> None:
        """Valid slots to the front (in slot order), as :meth:`keep_slots` leaves them."""
        super().end_static()
        valid = self.pos[:, :, : self.n] >= 0
        keep = int(valid.sum(-1).max())
        order = (~valid).to(torch.int8).argsort(dim=-1, stable=True)[..., :keep].sort(dim=-1).values
        self.keep_slots(order)
        self.padded = self.padded or bool((self.pos[:, :, :keep] < 0).any())

    def compact(self) -> None:
        budget = self.heavy + self.recent
        if self.n <= budget:
            return
        self.keep_recent_and_top(self.acc[:, :, : self.n], budget, self.recent)


@dataclass
class H2O(Method):
    """Heavy-Hitter Oracle: keep the tokens that have received the most attention, plus the newest ones.

    Paper: H2O, Zhang et al., NeurIPS 2023 (https://arxiv.org/abs/2306.14048). A few tokens collect most of the
    attention mass; accumulated attention identifies them, and a greedy eviction of the lowest-scored token per
    step keeps the KV cache at a fixed budget.

    Per KV head (query heads of a GQA group add their scores), every forward: attention probabilities of all
    queries are added to each slot's score; then, if more than ``heavy + recent`` tokens are held, the ``recent``
    newest are kept and the ``heavy`` best-scored among the rest. During decoding this evicts one token per step,
    as in the paper; a prefill chunk is scored as a whole and evicted at its end (the paper scores the whole
    prompt at once, which equals one chunk). Needs probabilities: attention on these layers runs eagerly in
    float32. Shapes: keys/values (B, Hkv, heavy + recent + q, D) during a forward.
    """

    name = "h2o"
    summary = "heavy hitters by accumulated attention + recent window, evicted every step"
    paper = "https://arxiv.org/abs/2306.14048"

    heavy: int = 512
    recent: int = 512

    def __post_init__(self) -> None:
        check_int(self.name, "heavy", self.heavy, 0)
        check_int(self.name, "recent", self.recent, 1)

    @classmethod
    def for_budget(cls, tokens: int) -> "H2O":
        # The paper's split: half heavy hitters, half recent tokens.
        return cls(heavy=tokens // 2, recent=tokens - tokens // 2)

    def kv_budget(self) -> int:
        return self.heavy + self.recent

    def make_layer(self, ctx: LayerContext) -> KVLayer:
        return H2OLayer(self.heavy, self.recent, ctx.layer_idx, ctx.run)
