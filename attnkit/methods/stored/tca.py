"""TCA-Attention: per-head token budgets calibrated offline, handed to key blocks online by a redundancy score;
sparse prefill over the chosen tokens plus a local window, and the KV cache shrunk to them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnkit.hf.attention import attend_layer
from attnkit.hf.cache import KVLayer
from attnkit.kernels.sparse_prefill import (
    block_gather_attention,
    causal_pairs,
    flex_block_attention,
    flex_ready,
    mask_to_lists,
    query_blocks,
    read_pairs,
)
from attnkit.methods.base import LayerContext, Method, check_choice, check_float, check_int, load_json_profile
from attnkit.reference import attention_probs

NEG_INF = float("-inf")


def config_table(block: int, n_configs: int) -> torch.Tensor:
    """(n_configs, K) probabilities over the per-block token counts k = 1, 2, 4, ..., block (K of them): a
    Gaussian on log2 k with sigma 1 and means spread evenly from log2 1 to log2 block; ascending in expected
    tokens per block."""
    ks = torch.tensor(block_counts(block), dtype=torch.float64).log2()
    mu = torch.linspace(0, math.log2(block), n_configs, dtype=torch.float64)
    p = torch.exp(-0.5 * (ks.view(1, -1) - mu.view(-1, 1)) ** 2)
    return (p / p.sum(-1, keepdim=True)).float()


def block_counts(block: int) -> list[int]:
    """1, 2, 4, ..., up to ``block`` (``block`` itself last when it is no power of two)."""
    out = [1 << i for i in range(int(math.log2(block)) + 1)]
    return out if out[-1] == block else out + [block]


def counts_by_rank(p: torch.Tensor, ks: torch.Tensor, n_blocks: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """Tokens each block keeps: blocks ranked by redundancy (rank 0 = highest) take the largest counts first,
    a share p_k of the blocks taking k. p (..., K) per head; ks (K,) ascending; n_blocks (...,) available blocks;
    rank (..., nb) -> (..., nb) long."""
    cum = p.flip(-1).cumsum(-1)  # shares from the largest k down
    frac = (rank.float() + 0.5) / n_blocks.clamp_min(1).unsqueeze(-1).float()
    which = torch.searchsorted(cum.contiguous(), frac.contiguous()).clamp_max(len(ks) - 1)
    return ks.flip(0)[which]


def rank_in_blocks(key: torch.Tensor, block: int) -> torch.Tensor:
    """(..., n) rank of every slot inside its run of ``block`` consecutive slots by ascending ``key``, ties to the
    lower slot: small sorts of ``block`` entries instead of one sort of the whole span."""
    n = key.shape[-1]
    nb = -(-n // block)
    k = F.pad(key, (0, nb * block - n), value=float("inf")).view(*key.shape[:-1], nb, block)
    order = k.argsort(dim=-1, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(block, device=key.device).expand_as(order))
    return rank.view(*key.shape[:-1], nb * block)[..., :n]


def select_tokens(s: torch.Tensor, kb: torch.Tensor, old: torch.Tensor, p: torch.Tensor, ks: torch.Tensor,
                  alpha: float, n_kb: int, block: int = 0) -> torch.Tensor:
    """TCA's online choice. s (..., n) attention of the selecting query per slot; kb (..., n) key block of every
    slot; old (..., n) bool: slots eligible (older than the local window, visible); p (..., K) the head's
    configuration -> (..., n) bool chosen slots. ``block`` > 0 says that kb is slot // block (a layer holding
    every token in order, unpadded): the ranks inside blocks then come from small per-block sorts.

    Block redundancy h_j = (1 - alpha) sum s + alpha (1 - sum s^2 / (sum s)^2) over the block's eligible slots;
    blocks sorted by h get token counts from the configuration; each keeps its top-k slots by s (ties to the
    lower slot)."""
    lead = s.shape[:-1]
    s = s.float() * old
    at = kb.clamp(0, n_kb - 1)
    mass = torch.zeros((*lead, n_kb), device=s.device).scatter_add_(-1, at, s)
    sq = torch.zeros_like(mass).scatter_add_(-1, at, s * s)
    size = torch.zeros_like(mass).scatter_add_(-1, at, old.float())
    h = (1 - alpha) * mass + alpha * (1 - sq / mass.clamp_min(1e-30) ** 2) * (mass > 0)
    h = h.masked_fill(size == 0, NEG_INF)
    rank = h.argsort(-1, descending=True).argsort(-1)  # (..., n_kb)
    k_block = counts_by_rank(p, ks, (size > 0).sum(-1), rank)  # (..., n_kb)
    # each eligible slot's rank inside its block by s (descending); only eligible ranks matter
    if block:
        rank_in = rank_in_blocks(torch.where(old, -s, float("inf")), block)
    else:  # any layout: one sort by (block, -s), eligible first within a block
        order = (at.double() * 4 - s.double() - old.double()).argsort(dim=-1, stable=True)
        sorted_block = at.gather(-1, order)
        first = torch.searchsorted(sorted_block.contiguous(), sorted_block.contiguous(), right=False)
        rank_in = torch.empty_like(order).scatter_(
            -1, order, torch.arange(order.shape[-1], device=s.device).expand_as(order) - first)
    return old & (rank_in < k_block.gather(-1, at))


def load_profile(path: str) -> dict:
    """A TCA profile (JSON from ``attnkit calibrate tca``): block, configs and per-layer head configurations."""
    return load_json_profile("tca", path, ("block", "configs", "layers"))


class TCALayer(KVLayer):
    """Keeps every token during prefill; when decoding starts, each KV head keeps what its last query block
    chose plus the local window (per-head counts: a head keeping fewer leaves holes, pos -1)."""

    shared_layout = False
    all_visible_in_decode = False  # holes (pos -1) sit among the kept slots: a decode step needs its mask

    def __init__(self, cfg: "TCA", layer_idx: int, run) -> None:
        super().__init__(layer_idx, run)
        self.cfg = cfg
        self.keep: torch.Tensor | None = None  # (B, Hkv, n) bool: the last prefill block's choice

    def visible(self, qpos, kpos):
        return kpos >= 0  # holes left by per-head compression are never read

    def update(self, key_states, value_states, *args, **kwargs):
        if key_states.shape[-2] == 1 and self.keep is not None:
            self.compress()
        return super().update(key_states, value_states, *args, **kwargs)

    def begin_static(self, steps: int) -> None:
        if self.keep is not None:
            self.compress()
        super().begin_static(steps)

    def compress(self) -> None:
        keep = self.keep[..., : self.n]
        k = int(keep.sum(-1).max())
        pri = torch.where(keep, self.pos[:, :, : self.n].float(), NEG_INF)
        idx = pri.topk(k, dim=-1).indices.sort(-1).values
        holes = ~keep.gather(2, idx)
        self.keep_slots(idx)
        self.pos[:, :, :k].masked_fill_(holes, -1)
        self.keep = None
        self.shrink()  # really free the memory: buffers sized to what is kept plus the tokens still to come


@dataclass
class TCA(Method):
    """TCA-Attention: calibrated per-head budgets, online block redundancy, a local window; sparse prefill and a
    shrunk KV cache.

    Paper: TCA-Attention (https://arxiv.org/abs/2512.09238). No official code was found: this follows the
    paper's description as summarised in ../shared/methods/sparse.md, and every reconstruction is named here.
    Offline (``attnkit calibrate tca``, one forward over an essay): for each global layer and KV head, the
    configuration (one of ``configs`` distributions over per-block counts k = 1, 2, 4, ..., block, log-Gaussian,
    :func:`config_table`) that keeps the fewest tokens while the kept ones hold at least ``tau`` of the last
    query's attention mass. Online, each block of ``block`` queries of a prefill forward takes the softmax
    attention of its last query (averaged over the query heads of a KV head) as s; the key blocks older than its
    local window get redundancy h_j = (1 - alpha) sum s + alpha (1 - sum s^2 / (sum s)^2), are ranked by it and
    handed counts from the head's configuration (highest h, largest k); each keeps its top-k tokens by s. The
    block's queries attend (causally) to those tokens plus the ``window`` newest positions. When decoding
    starts, each KV head keeps what the prompt's last query block chose plus that window: the cache shrinks
    (``held_bytes``); decode steps then append (dense over what is kept).

    How we differ (reconstructions, no code to check): the configuration family (sigma 1 on log2 k, means evenly
    spaced), the selecting query (each block's last), block ranks mapped to counts by cumulative shares; the
    paper's decode rule (every ``block`` new tokens keep floor(sum_k k p_k) of them) is not implemented: decode
    tokens are kept. Without a profile every head takes configuration ``fallback`` (-1: the middle one).
    ``kernel`` as DHSA's: "gather", "flex" (where slot = position) or "auto" (flex on CUDA).
    ``shrink=False`` (ours, not the paper's) keeps the whole cache for decoding: sparse prefill only, no KV saving;
    it tells how much of an accuracy loss comes from the shrink rather than from the prefill choice.
    Shapes: s (B, Hkv, blocks, n), chosen (B, Hkv, blocks, n), read mask (B, Hkv, q, n).
    """

    name = "tca"
    summary = "calibrated per-head budgets handed to key blocks by redundancy; sparse prefill, shrunk KV cache"
    paper = "https://arxiv.org/abs/2512.09238"

    tau: float = 0.9
    block: int = 128
    window: int = 4096
    configs: int = 14
    alpha: float = 0.5
    fallback: int = -1
    profile: str = ""
    kernel: str = "auto"
    shrink: bool = True

    def __post_init__(self) -> None:
        check_float(self.name, "tau", self.tau, 0.0, 1.0)
        check_int(self.name, "block", self.block, 1)
        check_int(self.name, "window", self.window, 1)
        check_int(self.name, "configs", self.configs, 2)
        check_float(self.name, "alpha", self.alpha, 0.0, 1.0)
        check_int(self.name, "fallback", self.fallback, -1, self.configs - 1)
        check_choice(self.name, "kernel", self.kernel, ("auto", "gather", "flex"))
        if not isinstance(self.shrink, bool):
            raise ValueError(f"tca: shrink must be true or false, got {self.shrink!r}")
        self._profile = load_profile(self.profile) if self.profile else None
        for field in ("block", "configs"):
            if self._profile is not None and self._profile[field] != getattr(self, field):
                raise ValueError(f"tca: profile {self.profile!r} was calibrated with {field} "
                                 f"{self._profile[field]}; set {field}={self._profile[field]}")
        self._table = config_table(self.block, self.configs)

    @classmethod
    def for_budget(cls, tokens: int) -> "TCA":
        """A local window of ``tokens`` / 2 (the calibrated blocks add the rest)."""
        return cls(window=max(1, tokens // 2))

    def make_layer(self, ctx: LayerContext) -> KVLayer:
        return TCALayer(self, ctx.layer_idx, ctx.run)

    def head_configs(self, layer_idx: int, hkv: int, device) -> torch.Tensor:
        """(Hkv, K) the layer's per-head configuration probabilities."""
        if self._profile is None:
            c = self.configs // 2 if self.fallback < 0 else self.fallback
            return self._table[c].expand(hkv, -1).to(device)
        rows = self._profile["layers"].get(str(layer_idx))
        if rows is None or len(rows) != hkv:
            raise ValueError(f"tca: profile {self.profile!r} has no {hkv}-head entry for layer {layer_idx}; "
                             "calibrate it on this model")
        return self._table[torch.tensor(rows)].to(device)

    def choose(self, layer: KVLayer, query, key, value, scaling: float, group: int = 64):
        """(chosen (B, Hkv, nqb, n) bool per query block and KV head, before causality; local block of every
        query (B, q); query index per block offset (B, nqb, block)). Blocks are scored ``group`` at a time."""
        b, h, q, d = query.shape
        hkv = key.shape[1]
        kpos = layer.stored_pos()  # (B, Hkv, n)
        qpos = layer.qpos
        local, qidx, nqb = query_blocks(qpos, self.block)
        idx = torch.arange(q, device=qpos.device).expand(b, q)
        last_i = torch.full((b, nqb), -1, device=qpos.device, dtype=torch.long)
        last_i.scatter_reduce_(1, local.clamp_min(0), idx.masked_fill(local < 0, -1), "amax")  # block's last query
        last_pos = qpos.gather(1, last_i.clamp_min(0))  # (B, nqb)
        n_kb = int(kpos.max()) // self.block + 1
        p_all = self.head_configs(layer.layer_idx, hkv, query.device)
        ks = torch.tensor(block_counts(self.block), device=query.device)
        kb_all = torch.where(kpos >= 0, kpos // self.block, 0)
        # nothing evicted yet and no padding: slot = position, so key block = slot // block
        contiguous = self.block if layer.n == layer.seen and not layer.padded else 0
        chosen = torch.zeros((b, hkv, nqb, kpos.shape[-1]), dtype=torch.bool, device=query.device)
        key_f = key.float()  # the scoring passes' float32 keys, converted once
        for s in range(0, nqb, group):
            li, lp = last_i[:, s : s + group], last_pos[:, s : s + group]
            g = li.shape[1]
            ql = query.gather(2, li.clamp_min(0).view(b, 1, g, 1).expand(b, h, g, d))
            kp = kpos.unsqueeze(2)  # (B, Hkv, 1, n)
            vis = (kp >= 0) & (kp <= lp.view(b, 1, g, 1))
            probs, _ = attention_probs(ql, key_f, vis, scaling)  # (B, H, g, n)
            sc = probs.view(b, hkv, h // hkv, g, -1).mean(2)
            old = vis & (kp <= lp.view(b, 1, g, 1) - self.window)
            kb = kb_all.unsqueeze(2).expand_as(sc)
            p = p_all.view(1, hkv, 1, -1).expand(b, hkv, g, -1)
            chosen[:, :, s : s + g] = select_tokens(sc, kb, old, p, ks, self.alpha, n_kb, contiguous) | (vis & ~old)
            self._read += read_pairs(chosen[:, :, s : s + g], local, s) * (h // hkv)
        return chosen, local, qidx

    def attend(self, run, module, layer: KVLayer, query, key, value, scaling: float, softcap) -> torch.Tensor:
        if query.shape[2] == 1 or softcap is not None or layer.static:
            return attend_layer(run, layer, query, key, value, scaling, softcap)
        b, _, q, _ = query.shape
        if int(layer.count.max()) <= self.window:  # everything inside the local window: dense, nothing to shrink
            return attend_layer(run, layer, query, key, value, scaling, softcap)
        self._read = 0.0
        chosen, local, qidx = self.choose(layer, query, key, value, scaling)
        self.note_read(run, self._read, causal_pairs(layer.qpos) * query.shape[1])
        kpos = layer.stored_pos()
        if flex_ready(layer, query, self.block, self.kernel):
            out = flex_block_attention(query, key, value, None, self.block, scaling, tokens=chosen)
        else:
            out = block_gather_attention(query, key, value, qidx, mask_to_lists(chosen), layer.qpos, kpos, scaling)
        # what each row's last query block chose: the cache keeps it when decoding starts (if no chunk follows)
        row_last = local[:, -1].clamp_min(0).view(b, 1, 1, 1).expand(b, chosen.shape[1], 1, chosen.shape[-1])
        if self.shrink:
            layer.keep = chosen.gather(2, row_last)[:, :, 0]  # (B, Hkv, n)
        if run.recorder is not None:  # what each query read, as a mask (built for the recorder only)
            per_q = chosen.gather(2, local.clamp_min(0).view(b, 1, q, 1).expand(b, chosen.shape[1], q, chosen.shape[-1]))
            read = per_q & (kpos.unsqueeze(2) <= layer.qpos.view(b, 1, q, 1)) & (kpos.unsqueeze(2) >= 0)
            run.recorder(dict(layer=layer.layer_idx, query=query, key=key, value=value, mask=read, scaling=scaling,
                              out=out))
        layer.compact()
        return out
