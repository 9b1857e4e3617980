"""TokenSelect: per-step, query-aware top-k token selection by soft-voted per-head q.k scores."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit import kernels
from attnkit.hf.attention import attend_layer, sdpa
from attnkit.hf.cache import KVLayer
from attnkit.methods.base import Method, check_int


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
    behaves as the dense model does within its trained context. The Selection Cache (re-using a selection when
    consecutive queries are similar) is disabled in the official release and is not implemented.
    Shapes: selected keys/values (B, Hkv, sinks + top_k + local + q, D), shared by all heads.
    """

    name = "tokenselect"
    summary = "per-step top-k tokens by soft-voted per-head q.k scores + sink and local windows (no eviction)"
    paper = "https://arxiv.org/abs/2411.02886"
    kind = "read"

    top_k: int = 2048
    sinks: int = 128
    local: int = 512

    def __post_init__(self) -> None:
        check_int(self.name, "top_k", self.top_k, 1)
        check_int(self.name, "sinks", self.sinks, 0)
        check_int(self.name, "local", self.local, 0)

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
        scores = torch.einsum("bkgd,bknd->bkgn", fingerprint, key[:, :, :past].float())  # (B, Hkv, G, past)
        if layer.padded:
            scores = scores.masked_fill(~candidate.view(b, 1, 1, past), float("-inf"))
            votes = torch.nan_to_num(scores.softmax(-1), nan=0.0).sum((1, 2))  # (B, past)
            votes = votes.masked_fill(~candidate, float("-inf"))
        else:  # every row holds the same candidate range [sinks, past - local): vote over it alone
            votes = torch.full((b, past), float("-inf"), device=dev)
            votes[:, self.sinks : past - self.local] = scores[..., self.sinks : past - self.local].softmax(-1).sum((1, 2))
        top = votes.topk(self.top_k, dim=-1).indices.sort(dim=-1).values  # (B, top_k)
        top_ok = candidate.gather(1, top)
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
        votes = kernels.tokenselect_votes(query, layer.keys, layer.pos, self.sinks, hi, layer.span)  # (B, span)
        best, top = votes.topk(min(self.top_k, votes.shape[-1]), dim=-1, sorted=False)  # (B, top_k), any order
        top = top.masked_fill(best == float("-inf"), -1)
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
