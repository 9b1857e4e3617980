"""TokenSelect: per-step, query-aware top-k token selection by soft-voted per-head q.k scores."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit import kernels
from attnkit.hf.attention import attend_layer, sdpa
from attnkit.hf.cache import KVLayer
from attnkit.methods.base import LayerContext, Method, check_float, check_int


class TokenSelectLayer(KVLayer):
    """The full cache plus the Selection Cache's state: per batch row, the query fingerprint that made the cached
    picks, the picks themselves and hit counters (all device tensors, updated in place by fixed-shape steps).

    qfp (B, H * D) float32; picks (B, k) slot ids (-1: no pick); has (B,) bool; hits / checks (B,) int64.
    """

    def __init__(self, layer_idx: int, run) -> None:
        super().__init__(layer_idx, run)
        self.clear_selection()

    def clear_selection(self) -> None:
        self.qfp: torch.Tensor | None = None
        self.picks: torch.Tensor | None = None
        self.has: torch.Tensor | None = None
        self.hits: torch.Tensor | None = None
        self.checks: torch.Tensor | None = None

    def reset(self) -> None:
        super().reset()
        self.clear_selection()

    def reuse(self, fingerprint: torch.Tensor, k: int, theta: float) -> torch.Tensor:
        """(B,) bool: rows whose cached picks this forward reuses, cos(fingerprint, cached) >= theta.
        fingerprint (B, H * D) float32; state of another shape (a new batch or top-k) is dropped first."""
        b = fingerprint.shape[0]
        if self.picks is None or tuple(self.picks.shape) != (b, k) or self.qfp.shape != fingerprint.shape:
            dev = fingerprint.device
            self.qfp = torch.zeros_like(fingerprint)
            self.picks = torch.full((b, k), -1, dtype=torch.long, device=dev)
            self.has = torch.zeros(b, dtype=torch.bool, device=dev)
            self.hits = torch.zeros(b, dtype=torch.long, device=dev)
            self.checks = torch.zeros(b, dtype=torch.long, device=dev)
        similar = torch.nn.functional.cosine_similarity(fingerprint, self.qfp, dim=-1) >= theta
        return self.has & similar

    def remember(self, reuse: torch.Tensor, fingerprint: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
        """Picks (B, k) for this forward: the cached ones where ``reuse``, else ``top``, which is cached with its
        fingerprint. In place, so a captured step keeps updating the same buffers."""
        picks = torch.where(reuse.view(-1, 1), self.picks, top)
        self.picks.copy_(picks)
        self.qfp.copy_(torch.where(reuse.view(-1, 1), self.qfp, fingerprint))
        self.has.fill_(True)
        self.hits.add_(reuse.long())
        self.checks.add_(1)
        return picks


@dataclass
class TokenSelect(Method):
    """Attend only to the sinks, the local window and the ``top_k`` past tokens the current queries favour.

    Paper: TokenSelect, Wu et al., EMNLP 2025 (https://arxiv.org/abs/2411.02886). Per head, q.k scores over the
    candidate tokens are turned into a distribution by a softmax; summing the distributions over heads (soft
    voting) ranks tokens for the whole layer, so no single head dominates; attention then reads only the winners.
    Nothing is evicted: the full cache stays, only the read is sparse.

    Every forward (decode step or prefill chunk), per layer: query fingerprint = mean of the chunk's queries
    (B, H, D); candidates are the past tokens outside the first ``sinks`` and the last ``local`` before the chunk;
    s[h, j] = q[h] . k[h // G, j] (unscaled, as in the official code); softmax over j per head; sum over heads ->
    (B, Nc); top ``top_k``; attention over sinks + top-k + local + the chunk itself (causal). When the past is no
    larger than ``sinks + top_k + local`` the layer attends densely.

    Positions: keys keep the absolute positions HF cached them at. Deviation: the paper re-numbers the selected
    tokens contiguously (its source of length extrapolation); we do not, so the model sees true distances and
    behaves as the dense model does within its trained context.

    Selection Cache (``selection_cache=True``; off by default, as in the official release, where it is switched
    off and its path does not run): per layer and batch row, a forward whose fingerprint (flattened over heads)
    has cosine >= ``theta`` with the fingerprint that made the cached top-k reuses that top-k; otherwise it
    selects anew and caches the picks with its fingerprint (the release's rule, every forward, prefill chunks
    included; the paper's theta 0.9). The sinks and the local window are recomputed every time. On CUDA a
    reused row's scoring kernels exit at once (the top-k still runs on the fixed-shape step); on the CPU's
    dynamic path the scoring is skipped when every row reuses. ``run.stats()["tokenselect"]`` reports the hit
    rate.
    Shapes: selected keys/values (B, Hkv, sinks + top_k + local + q, D), shared by all heads.
    """

    name = "tokenselect"
    summary = "per-step top-k tokens by soft-voted per-head q.k scores + sink and local windows (no eviction)"
    paper = "https://arxiv.org/abs/2411.02886"
    kind = "read"

    top_k: int = 2048
    sinks: int = 128
    local: int = 512
    selection_cache: bool = False
    theta: float = 0.9

    def __post_init__(self) -> None:
        check_int(self.name, "top_k", self.top_k, 1)
        check_int(self.name, "sinks", self.sinks, 0)
        check_int(self.name, "local", self.local, 0)
        if not isinstance(self.selection_cache, bool):
            raise ValueError(f"{self.name}: selection_cache={self.selection_cache!r} is invalid; accepted: True or False")
        check_float(self.name, "theta", self.theta, -1.0, 1.0)

    def make_layer(self, ctx: LayerContext) -> KVLayer:
        return TokenSelectLayer(ctx.layer_idx, ctx.run)

    def extra_stats(self, run) -> dict:
        layers = [l for l in (run.cache.layers if run.cache is not None else []) if isinstance(l, TokenSelectLayer)]
        checks = sum(int(l.checks.sum()) for l in layers if l.checks is not None)
        if not self.selection_cache or not checks:
            return {}
        hits = sum(int(l.hits.sum()) for l in layers if l.hits is not None)
        return {"tokenselect": {"selection_cache_hit_rate": hits / checks, "selections": checks}}

    @classmethod
    def for_budget(cls, tokens: int) -> "TokenSelect":
        """Tokens read per step: the paper's 128 / 512 / 2048 proportions (1/21, 4/21, 16/21) of ``tokens``."""
        sinks, local = max(1, tokens // 21), max(1, 4 * tokens // 21)
        return cls(top_k=max(1, tokens - sinks - local), sinks=sinks, local=local)

    def select(self, query: torch.Tensor, key: torch.Tensor, layer: KVLayer, past: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots (B, sinks + top_k + local) of the past to read, and which of them are real picks (B, same) bool.

        query (B, H, q, D); key (B, Hkv, n, D) whose first ``past`` slots precede the chunk. Sinks, local window
        and candidates count real tokens per row (``layer.count_before``); with left padding a row's token at
        position p sits at slot pad + p. Entries are unique; an invalid entry (a short row) points at slot 0.
        """
        b, h, _, d = query.shape
        hkv = key.shape[1]
        dev = key.device
        kpos = layer.stored_pos()[:, 0, :past]  # (B, past)
        before = layer.count_before  # (B, 1) real tokens before the chunk
        lo, hi = self.sinks, before - self.local
        candidate = (kpos >= lo) & (kpos < hi)  # (B, past)
        fingerprint = query.mean(2).view(b, hkv, h // hkv, d).float()  # (B, Hkv, G, D)
        cached = self.selection_cache and isinstance(layer, TokenSelectLayer)
        if cached:
            flat = fingerprint.reshape(b, -1)
            reuse = layer.reuse(flat, self.top_k, self.theta)  # (B,)
        if cached and not key.is_cuda and bool(reuse.all()):  # a free host read on the CPU: skip the scoring
            top = layer.remember(reuse, flat, layer.picks)
        else:
            scores = torch.einsum("bkgd,bknd->bkgn", fingerprint, key[:, :, :past].float())  # (B, Hkv, G, past)
            if layer.padded:
                scores = scores.masked_fill(~candidate.view(b, 1, 1, past), float("-inf"))
                votes = torch.nan_to_num(scores.softmax(-1), nan=0.0).sum((1, 2))  # (B, past)
                votes = votes.masked_fill(~candidate, float("-inf"))
            else:  # every row holds the same candidate range [sinks, past - local): vote over it alone
                votes = torch.full((b, past), float("-inf"), device=dev)
                votes[:, self.sinks : past - self.local] = (
                    scores[..., self.sinks : past - self.local].softmax(-1).sum((1, 2)))
            top = votes.topk(self.top_k, dim=-1).indices.sort(dim=-1).values  # (B, top_k)
            if cached:  # cache with -1 for non-candidates (a short row's padding picks)
                top = layer.remember(reuse, flat, top.masked_fill(~candidate.gather(1, top), -1))
        picked = top >= 0  # -1: a cached "no pick"; a reused pick is still a candidate (the window only moves on)
        top = top.clamp_min(0)
        top_ok = candidate.gather(1, top) & picked
        pad = layer.seen - layer.count  # (B, 1) pad slots before each row's first real token
        head = pad + torch.arange(self.sinks, device=dev)  # (B, sinks)
        head_ok = (torch.arange(self.sinks, device=dev) < hi) & (head < past)
        tail = torch.arange(past - self.local, past, device=dev).clamp_min(0).expand(b, self.local)
        tail_ok = kpos.gather(1, tail) >= 0
        idx = torch.cat([head.clamp_max(past - 1), top, tail], dim=-1)
        ok = torch.cat([head_ok, top_ok, tail_ok], dim=-1)
        return idx.masked_fill(~ok, 0), ok

    def select_static(self, query: torch.Tensor, layer: KVLayer) -> torch.Tensor:
        """Slots (B, Hkv, sinks + top_k + local + 1) a fixed-shape decode step reads (-1: none).

        The same choice as :meth:`select` over the whole static span (empty slots are no candidates), with no
        shape depending on the step; the current token is the last entry. With fewer candidates than ``top_k``
        every candidate is read, which is the dense layer.
        """
        b, hkv = query.shape[0], layer.keys.shape[1]
        dev = layer.keys.device
        kpos = layer.pos[:, 0, : layer.span]  # (B, span)
        hi = layer.count_before - self.local  # (B, 1): candidates lie in [sinks, hi)
        take = min(self.top_k, layer.span)
        cached = self.selection_cache and isinstance(layer, TokenSelectLayer)
        if cached:
            flat = query[:, :, 0].reshape(b, -1).float()  # (B, H * D): a decode step's fingerprint
            reuse = layer.reuse(flat, take, self.theta)  # (B,): their scoring kernels exit at once
        votes = kernels.tokenselect_votes(query, layer.keys, layer.pos, self.sinks, hi, layer.span,
                                          reuse if cached else None)  # (B, span)
        best, top = votes.topk(take, dim=-1, sorted=False)  # (B, top_k), any order
        top = top.masked_fill(best == float("-inf"), -1)
        if cached:
            top = layer.remember(reuse, flat, top)
        cur = layer.wslot[:, :1, 0]  # (B, 1) slot being written (all rows append in lockstep)
        ar = torch.arange(self.sinks, device=dev)
        head = layer.row_pad() + ar
        head = head.masked_fill((ar >= hi) | (head >= cur), -1)
        tail = cur - self.local + torch.arange(self.local, device=dev)  # (B, local)
        tail_ok = (tail >= 0) & (kpos.gather(1, tail.clamp_min(0)) >= 0)
        idx = torch.cat([head, top, tail.masked_fill(~tail_ok, -1), cur], dim=-1)
        return idx.unsqueeze(1).expand(b, hkv, -1).contiguous()

    def attend(self, run, module, layer: KVLayer, query, key, value, scaling: float, softcap) -> torch.Tensor:
        if layer.static and softcap is None:
            out = kernels.sparse_decode_attention(
                query, layer.keys, layer.values, layer.pos, self.select_static(query, layer), 1, scaling
            )
            layer.static_after()
            return out
        n, q = key.shape[2], query.shape[2]
        past = n - q
        if past - self.sinks - self.local <= self.top_k or softcap is not None:
            return attend_layer(run, layer, query, key, value, scaling, softcap)
        b, hkv = key.shape[:2]
        idx, ok = self.select(query, key, layer, past)
        chunk = torch.arange(past, n, device=key.device).expand(b, q)
        idx = torch.cat([idx, chunk], dim=-1)  # + the chunk itself
        k_sel, v_sel = kernels.take_rows(key, idx), kernels.take_rows(value, idx)
        kpos = torch.gather(layer.stored_pos()[:, 0], 1, idx)  # (B, m)
        mask = None
        if q > 1 or layer.padded:
            ok = torch.cat([ok, kpos[:, past - n :] >= 0], dim=-1).view(b, 1, 1, -1)  # (B, 1, 1, m)
            qpos = layer.qpos.view(b, 1, q, 1)
            mask = (kpos.view(b, 1, 1, -1) <= qpos) & ok | (qpos < 0)  # (B, 1, q, m); pad queries see all
        out = sdpa(query, k_sel, v_sel, mask, scaling)
        if run.recorder is not None:
            read = idx if mask is None else idx.masked_fill(~ok.view(b, -1), n)  # invalid entries -> spare slot n
            chosen = torch.zeros(b, n + 1, dtype=torch.bool, device=key.device).scatter_(1, read, True)[:, :n]
            full_mask = layer.mask()
            if full_mask is None:
                full_mask = torch.ones(b, 1, q, n, dtype=torch.bool, device=key.device)
            run.recorder(dict(layer=layer.layer_idx, query=query, key=key, value=value,
                              mask=full_mask & chosen.view(b, 1, 1, n), scaling=scaling, out=out))
        layer.compact()
        return out
