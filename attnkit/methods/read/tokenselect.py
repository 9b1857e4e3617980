"""TokenSelect: per-step, query-aware top-k token selection by soft-voted per-head q.k scores."""

from __future__ import annotations

from dataclasses import dataclass

import torch

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

    def select(self, query: torch.Tensor, key: torch.Tensor, past: int) -> torch.Tensor:
        """Indices (B, sinks + top_k + local) of the past slots to read, ascending.

        query (B, H, q, D); key (B, Hkv, n, D) whose first ``past`` slots precede the chunk.
        """
        b, h, _, d = query.shape
        hkv = key.shape[1]
        lo, hi = self.sinks, past - self.local
        fingerprint = query.mean(2).view(b, hkv, h // hkv, d).float()  # (B, Hkv, G, D)
        scores = torch.einsum("bkgd,bknd->bkgn", fingerprint, key[:, :, lo:hi].float())  # (B, Hkv, G, Nc)
        votes = scores.softmax(-1).sum((1, 2))  # (B, Nc)
        top = votes.topk(self.top_k, dim=-1).indices.sort(dim=-1).values + lo
        dev = key.device
        head = torch.arange(lo, device=dev).expand(b, lo)
        tail = torch.arange(hi, past, device=dev).expand(b, past - hi)
        return torch.cat([head, top, tail], dim=-1)

    def attend(self, run, module, layer: KVLayer, query, key, value, scaling: float, softcap) -> torch.Tensor:
        n, q = key.shape[2], query.shape[2]
        past = n - q
        if past - self.sinks - self.local <= self.top_k or softcap is not None:
            return attend_layer(run, layer, query, key, value, scaling, softcap)
        b, hkv = key.shape[:2]
        idx = self.select(query, key, past)
        idx = torch.cat([idx, torch.arange(past, n, device=key.device).expand(b, q)], dim=-1)  # + the chunk
        gather = idx.view(b, 1, -1, 1).expand(b, hkv, -1, key.shape[-1])
        k_sel, v_sel = torch.gather(key, 2, gather), torch.gather(value, 2, gather)
        kpos = torch.gather(layer.stored_pos()[:, 0], 1, idx)  # (B, m)
        mask = None
        if q > 1:
            mask = (kpos.unsqueeze(1) <= layer.qpos.view(1, -1, 1)).unsqueeze(1)  # (B, 1, q, m)
        out = sdpa(query, k_sel, v_sel, mask, scaling)
        if run.recorder is not None:
            chosen = torch.zeros(b, n, dtype=torch.bool, device=key.device).scatter_(1, idx, True)
            causal = layer.stored_pos()[:, :1].unsqueeze(-2) <= layer.qpos.view(1, 1, -1, 1)  # (B, 1, q, n)
            mask = causal & chosen.view(b, 1, 1, n)
            run.recorder(dict(layer=layer.layer_idx, query=query, key=key, value=value, mask=mask, scaling=scaling, out=out))
        layer.compact()
        return out
