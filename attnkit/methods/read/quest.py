"""Quest: query-aware page selection from per-page channel-wise key bounds, at every decode step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit import kernels
from attnkit.hf.attention import attend_layer
from attnkit.hf.cache import KVLayer
from attnkit.methods.base import LayerContext, Method, check_int

NEG_INF = float("-inf")


class QuestLayer(KVLayer):
    """Keeps every token plus, per KV head, the channel-wise max and min of the keys of each page.

    Pages count positions, not slots: page j of a row holds its real tokens j * page .. (j + 1) * page - 1, so a
    left-padded row selects the same pages as that prompt alone. summary: (B, Hkv, P, 2, D) in the keys' dtype,
    ``[..., 0, :]`` = max and ``[..., 1, :]`` = min (-inf / +inf for a page without tokens); it is updated for
    the pages each forward touches (one page per decode step) and grows with the slot buffers.
    """

    def __init__(self, page: int, layer_idx: int, run) -> None:
        super().__init__(layer_idx, run)
        self.page = page
        self.summary: torch.Tensor | None = None

    def reserve(self, need: int) -> None:
        super().reserve(need)
        pages = -(-self.capacity // self.page)
        if self.summary is None or self.summary.shape[2] < pages:
            b, h, _, d = self.keys.shape
            new = self.keys.new_empty((b, h, pages, 2, d))
            new[..., 0, :], new[..., 1, :] = NEG_INF, float("inf")
            if self.summary is not None:
                new[:, :, : self.summary.shape[2]] = self.summary
            self.summary = new

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        out = super().update(key_states, value_states, *args, **kwargs)
        if not (self.static and self.summary_folded):  # the fused append folds a static step's key itself
            self._fold(key_states, self.qpos)
        return out

    def summary_store(self) -> tuple[torch.Tensor | None, int]:
        return (self.summary, self.page) if self.summary.is_contiguous() else (None, 0)

    def _fold(self, keys: torch.Tensor, qpos: torch.Tensor) -> None:
        """Fold the chunk's keys (B, Hkv, q, D) into the summaries of their pages (padding into a spare page)."""
        b, h, q, d = keys.shape
        if self.static:  # one real token per row: gather its page's bounds, fold, scatter back (no plane copies)
            page = (qpos // self.page).view(b, 1, 1, 1, 1).expand(b, h, 1, 2, d)
            cur = self.summary.gather(2, page)  # (B, Hkv, 1, 2, D)
            new = keys.to(cur.dtype)
            folded = torch.stack([torch.maximum(cur[:, :, :, 0], new), torch.minimum(cur[:, :, :, 1], new)], dim=3)
            self.summary.scatter_(2, page, folded)
            return
        spare = self.summary.shape[2]
        page = torch.where(qpos >= 0, qpos // self.page, spare)  # (B, q)
        index = page.view(b, 1, q, 1).expand(b, h, q, d)
        for which, reduce in ((0, "amax"), (1, "amin")):
            plane = torch.cat([self.summary[..., which, :], self.summary.new_zeros((b, h, 1, d))], dim=2)
            plane.scatter_reduce_(2, index, keys.to(plane.dtype), reduce=reduce, include_self=True)
            self.summary[..., which, :] = plane[:, :, :spare]

    def held_bytes(self) -> int:
        return super().held_bytes() + (0 if self.summary is None else self.summary.nbytes)

    def reset(self) -> None:
        super().reset()
        self.summary = None


@dataclass
class Quest(Method):
    """Read only the pages whose keys can score highest against the current query.

    Paper: Quest, Tang et al., ICML 2024 (https://arxiv.org/abs/2406.10774; mit-han-lab/Quest). Each page of
    ``page`` tokens keeps the channel-wise max and min of its keys; for a query q the page's upper bound on q.k
    is sum_d max(q_d * kmax_d, q_d * kmin_d); attention reads the top pages only. Nothing is evicted.

    Every decode step on layers ``>= dense_layers`` (the paper keeps the first two layers dense), once the cache
    holds more than ``budget`` tokens: bounds per page and KV head are summed over the query heads of the GQA
    group (the paper's models are MHA, where this is per head), the ``budget // page`` best pages are read, the
    page being written always among them. Prefill is dense, as in the paper. Shapes: summary (B, Hkv, P, 2, D);
    selection (B, Hkv, budget // page) page ids; attention reads (B, Hkv, budget, D) without gathering on GPU.
    """

    name = "quest"
    summary = "query-aware top pages by channel-wise key bounds (per KV head), full cache kept"
    paper = "https://arxiv.org/abs/2406.10774"
    kind = "read"

    budget: int = 2048
    page: int = 16
    dense_layers: int = 2

    def __post_init__(self) -> None:
        check_int(self.name, "page", self.page, 1, 1024)
        check_int(self.name, "budget", self.budget, self.page)
        if self.budget % self.page:
            raise ValueError(
                f"{self.name}: budget={self.budget} is invalid; accepted: a multiple of page={self.page}"
            )
        check_int(self.name, "dense_layers", self.dense_layers, 0)

    @classmethod
    def for_budget(cls, tokens: int) -> "Quest":
        page = 16 if tokens >= 64 else max(1, tokens // 4)
        return cls(budget=max(page, tokens // page * page), page=page)

    def make_layer(self, ctx: LayerContext) -> KVLayer:
        if ctx.layer_idx < self.dense_layers:
            return KVLayer(ctx.layer_idx, ctx.run)
        return QuestLayer(self.page, ctx.layer_idx, ctx.run)

    def select(self, query: torch.Tensor, layer: QuestLayer) -> tuple[torch.Tensor, int]:
        """Entries to read for a decode query (B, H, 1, D) and their page size: (B, Hkv, budget // page) page
        ids, or with padding (B, Hkv, budget) slot ids (-1: none). Device-only: also runs in a static step."""
        k = self.budget // self.page
        if not layer.padded:  # one fused scoring kernel on CUDA; the page being written is the last one
            if layer.static:
                pages = layer.wslot[:1, :1, 0] // self.page + 1  # (1, 1) on the device
            else:
                pages = -(-layer.n // self.page)
            return kernels.select_pages(query, layer.summary, k, pages, force_last=True), self.page
        pages = layer.summary.shape[2]
        scores = kernels.quest_scores(query, layer.summary)  # (B, Hkv, P)
        last = ((layer.count - 1) // self.page).view(-1, 1, 1)  # each row's page being written
        scores = scores.masked_fill(torch.arange(pages, device=scores.device) == last, float("inf"))
        idx = kernels.topk_pages(scores, k, pages, force_last=False)
        # page j of row b sits at slots pad_b + j * page ...: read it as token indices
        limit = layer.span if layer.static else layer.n
        pad = layer.row_pad().view(-1, 1, 1, 1)
        slots = pad + idx.unsqueeze(-1) * self.page + torch.arange(self.page, device=idx.device)
        return slots.masked_fill((idx.unsqueeze(-1) < 0) | (slots >= limit), -1).flatten(-2), 1

    def attend(self, run, module, layer: KVLayer, query, key, value, scaling: float, softcap) -> torch.Tensor:
        q, n = query.shape[2], key.shape[2]
        if not isinstance(layer, QuestLayer) or softcap is not None:
            return attend_layer(run, layer, query, key, value, scaling, softcap)
        if not layer.static and (q > 1 or n <= self.budget):
            return attend_layer(run, layer, query, key, value, scaling, softcap)
        # A static step always selects: with no more pages than the budget, every page is read (= dense).
        if layer.static and not layer.padded:  # selection and reading share one kernel on CUDA
            pages = layer.wslot[:1, :1, 0] // self.page + 1  # (1, 1) on the device: the page being written is last
            out = kernels.quest_attention(query, layer.keys, layer.values, layer.pos, layer.summary,
                                          self.budget // self.page, pages, self.page, scaling)
            layer.static_after()
            return out
        idx, page = self.select(query, layer)
        out = kernels.sparse_decode_attention(query, layer.keys, layer.values, layer.pos, idx, page, scaling)
        if layer.static:
            layer.static_after()
            return out
        if run.recorder is not None:
            run.recorder(dict(layer=layer.layer_idx, query=query, key=key, value=value,
                              mask=read_mask(idx, page, layer), scaling=scaling, out=out))
        layer.compact()
        return out


def read_mask(idx: torch.Tensor, page: int, layer: KVLayer) -> torch.Tensor:
    """(B, Hkv, 1, n) bool: the valid slots of the selected pages (what the decode query read)."""
    n = layer.n
    slots = (idx.unsqueeze(-1) * page + torch.arange(page, device=idx.device)).flatten(-2)
    use = (idx >= 0).unsqueeze(-1).expand(*idx.shape, page).flatten(-2) & (slots < n)
    chosen = torch.zeros((*idx.shape[:2], n + 1), dtype=torch.bool, device=idx.device)
    chosen.scatter_(2, torch.where(use, slots, n), True)
    return (chosen[..., :n] & (layer.stored_pos() >= 0)).unsqueeze(2)
