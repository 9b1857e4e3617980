"""Rectified SpaAttn, adapted to causal text models: block-sparse prefill whose output is rescaled by the pooled
estimate of the mass it kept, plus pooled-value terms for the skipped blocks where they provably help."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from attnkit.hf.attention import attend_layer
from attnkit.hf.cache import KVLayer
from attnkit.kernels.sparse_prefill import causal_visibility, flex_block_attention, group_stats, masked_attention
from attnkit.methods.base import Method, check_float, check_int
from attnkit.reference import expand_kv

NEG_INF = float("-inf")


@dataclass
class Rectified(Method):
    """Rectified SpaAttn: critical key blocks by a pooled attention estimate, the sparse output rescaled by the
    estimated mass it covers, pooled values added for the skipped blocks the GAPR test finds beneficial.

    Paper: Liu et al. 2025 (https://arxiv.org/abs/2511.19835; BienLuky/Rectified-SpaAttn), for video diffusion
    transformers. On every global layer during prefill, queries and keys are pooled into blocks of ``block``
    positions (means q_i, k_j, v_j; mean absolute deviations dq_i, dk_j). Per query head the pooled
    probabilities P_ij count each key block by the keys it shows the block's queries; a query block's critical
    blocks are the smallest set of its visible blocks, strongest first, whose P covers ``p_remain`` (one more
    than the blocks below it, as the code counts), and at least (1 - ``drop``) of them. Exact attention runs on
    the critical blocks (token-level causal) and is rescaled by R_i = the sum of P over the critical blocks and
    the non-beneficial skipped ones; a skipped block j is beneficial (GAPR) when
    |q_i . k_j| > |dq_i . k_j| + |q_i . dk_j|, and then adds P_ij v_j (IPAR). Decode steps are dense.

    Causal adaptation (the paper is bidirectional): key blocks after a query block are masked out of the pooled
    softmax; the diagonal block counts the mean number of keys its queries see (triangular), and it, the first
    ``sinks`` key blocks and the ``local`` blocks before the diagonal are always critical (so a skipped block is
    always fully in the past). The Hilbert-curve token order and spatial neighbours of the video code do not
    apply to text and are not used. Shapes: pooled P (B, H, query blocks, key blocks); read mask (B, H, q, n).
    """

    name = "rectified"
    summary = "block-sparse prefill, output rescaled by pooled mass estimates plus pooled values (GAPR / IPAR)"
    paper = "https://arxiv.org/abs/2511.19835"
    kind = "read"

    block: int = 128
    p_remain: float = 0.3
    drop: float = 0.8
    sinks: int = 1
    local: int = 1
    rectify: bool = True

    def __post_init__(self) -> None:
        check_int(self.name, "block", self.block, 1)
        check_float(self.name, "p_remain", self.p_remain, 0.0, 1.0)
        check_float(self.name, "drop", self.drop, 0.0, 1.0)
        check_int(self.name, "sinks", self.sinks, 0)
        check_int(self.name, "local", self.local, 0)
        if not isinstance(self.rectify, bool):
            raise ValueError(f"{self.name}: rectify={self.rectify!r} is invalid; accepted: True or False")

    @classmethod
    def for_budget(cls, tokens: int) -> "Rectified":
        """Blocks of ``tokens`` / 16 positions (16 blocks to choose from at a budget's length)."""
        return cls(block=max(1, tokens // 16))

    def plan(self, layer: KVLayer, query, key, value, scaling: float):
        """Critical blocks (B, H, query blocks, key blocks) by absolute block id, scale (B, H, q, 1) and addend
        (B, H, q, D), or None (dense)."""
        b, h, q, d = query.shape
        hkv = key.shape[1]
        kpos = layer.stored_pos()[:, 0]  # (B, n)
        qpos = layer.qpos
        kb = torch.where(kpos >= 0, kpos // self.block, -1)  # (B, n) key block by position
        qb = torch.where(qpos >= 0, qpos // self.block, -1)  # (B, q)
        nkb = int(kb.max()) + 1
        if nkb <= self.sinks + self.local + 1:
            return None
        kmean, kdev, kcnt = group_stats(key, kb, nkb)  # (B, Hkv, nkb, D)
        vmean, _, _ = group_stats(value, kb, nkb)
        qmean, qdev, _ = group_stats(query, qb, nkb)  # query blocks indexed by absolute block id too
        kmean, kdev, vmean = (expand_kv(t, h) for t in (kmean, kdev, vmean))  # (B, H, nkb, D)
        # visible keys per (query block, key block): a past block all its keys, the diagonal the mean number its
        # queries see (position p sees p - start + 1 of them: the layer holds every token), later blocks none
        qcnt = torch.zeros((b, nkb), device=query.device).scatter_add_(1, qb.clamp_min(0), (qb >= 0).float())
        seen = torch.where(qpos >= 0, qpos % self.block + 1, 0).float()
        diag = torch.zeros((b, nkb), device=query.device).scatter_add_(1, qb.clamp_min(0), seen)
        diag = diag / qcnt.clamp_min(1)
        blocks = torch.arange(nkb, device=query.device)
        past = blocks.view(1, -1, 1) > blocks.view(1, 1, -1)  # (1, nqb, nkb): key block j before query block i
        counts = torch.where(past, kcnt.unsqueeze(1), 0.0)
        counts = counts + torch.diag_embed(diag)
        counts = counts * (qcnt > 0).unsqueeze(-1)  # (B, nqb, nkb); query blocks outside this forward: none
        z = torch.matmul(qmean, kmean.transpose(-1, -2)) * scaling  # (B, H, nqb, nkb)
        logits = z + counts.clamp_min(1e-30).log().unsqueeze(1)
        logits = logits.masked_fill((counts <= 0).unsqueeze(1), NEG_INF)
        p = logits.softmax(-1).nan_to_num(0.0)  # pooled probabilities with B-fold (visible-count) weights
        qi = blocks.view(1, 1, nkb, 1)
        kj = blocks.view(1, 1, 1, nkb)
        avail = counts.unsqueeze(1) > 0
        forced = avail & ((kj < self.sinks) | ((qi - kj) <= self.local))
        cand = avail & ~forced
        sp, order = p.masked_fill(~cand, -1.0).sort(-1, descending=True)
        cum = sp.clamp_min(0).cumsum(-1)
        n_cand = cand.sum(-1, keepdim=True)
        n_keep = ((cum <= self.p_remain) & (sp >= 0)).sum(-1, keepdim=True) + 1
        n_keep = torch.maximum(n_keep, ((1 - self.drop) * n_cand).long()).clamp_max(n_cand)
        rank = torch.empty_like(order).scatter_(-1, order, blocks.expand_as(order))
        critical = forced | (cand & (rank < n_keep))  # (B, H, nqb, nkb)
        skipped = avail & ~critical
        if self.rectify:
            qk = torch.matmul(qmean, kmean.transpose(-1, -2)).abs()
            bound = torch.matmul(qdev, kmean.transpose(-1, -2)).abs() + torch.matmul(qmean, kdev.transpose(-1, -2)).abs()
            beneficial = skipped & (qk > bound)
        else:
            beneficial = torch.zeros_like(skipped)
        scale_b = (p * (avail & ~beneficial)).sum(-1, keepdim=True)  # R per query block (B, H, nqb, 1)
        add_b = torch.matmul(p * beneficial, vmean)  # (B, H, nqb, D)
        if not self.rectify:
            scale_b = torch.ones_like(scale_b)
        # per query: its block's scale and addend
        at = qb.clamp_min(0)
        scale = scale_b.gather(2, at.view(b, 1, q, 1).expand(b, h, q, 1))
        addend = add_b.gather(2, at.view(b, 1, q, 1).expand(b, h, q, d))
        if layer.padded:  # pad queries: unscaled (outputs discarded)
            pad = (qpos < 0).view(b, 1, q, 1)
            scale = torch.where(pad, 1.0, scale)
            addend = torch.where(pad, 0.0, addend)
        pairs = counts * qcnt.unsqueeze(-1)  # (B, nqb, nkb) visible (query, key) pairs per block pair
        self._read = (float((critical * pairs.unsqueeze(1)).sum()), float(pairs.sum()) * h)
        return critical, scale, addend

    def read_mask(self, layer: KVLayer, critical: torch.Tensor) -> torch.Tensor:
        """(B, H, q, n) bool token mask of the critical blocks, causal (pad queries read everything)."""
        kpos, qpos = layer.stored_pos()[:, 0], layer.qpos
        b, h, _, nkb = critical.shape
        q = qpos.shape[1]
        kb = torch.where(kpos >= 0, kpos // self.block, 0)
        qb = torch.where(qpos >= 0, qpos // self.block, 0)
        crit_q = critical.gather(2, qb.view(b, 1, q, 1).expand(b, h, q, nkb))  # (B, H, q, nkb)
        if layer.holds_prefix():  # slot = position: key blocks are slot ranges (no (q, n) int64 index)
            read = crit_q.repeat_interleave(self.block, dim=-1)[..., : kpos.shape[1]]
        else:
            read = crit_q.gather(3, kb.view(b, 1, 1, -1).expand(b, h, q, kb.shape[1]))
        read = read & causal_visibility(qpos, kpos)
        return read | (qpos < 0).view(b, 1, q, 1) if layer.padded else read

    def attend(self, run, module, layer: KVLayer, query, key, value, scaling: float, softcap) -> torch.Tensor:
        if query.shape[2] == 1 or softcap is not None or layer.static:
            return attend_layer(run, layer, query, key, value, scaling, softcap)
        planned = self.plan(layer, query, key, value, scaling)
        if planned is None:
            return attend_layer(run, layer, query, key, value, scaling, softcap)
        critical, scale, addend = planned
        self.note_read(run, *self._read)
        n, q = key.shape[2], query.shape[2]
        flex = query.is_cuda and layer.holds_prefix() and (n - q) % self.block == 0 and self.block % 16 == 0 \
            and os.environ.get("ATTNKIT_KERNELS") != "torch"
        read = None if flex and run.recorder is None else self.read_mask(layer, critical)
        if flex:  # slot = position: the critical blocks are FlexAttention blocks (compiled, skipped when unmarked)
            sparse = flex_block_attention(query, key, value, critical[:, :, (n - q) // self.block :], self.block, scaling)
        else:
            sparse, _ = masked_attention(query, key, value, read, scaling)
        out = (sparse.float() * scale + addend).to(query.dtype)
        if run.recorder is not None:
            run.recorder(dict(layer=layer.layer_idx, query=query, key=key, value=value, mask=read, scaling=scaling,
                              out=out, scale=scale, addend=addend))
        layer.compact()
        return out
