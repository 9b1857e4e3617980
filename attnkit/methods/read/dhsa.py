"""DHSA: dynamic hierarchical sparse attention. Keys fall into chunks; length-normalised chunk and query-block
representations pick, per query block, the key tokens every head of the layer attends to during prefill."""

from __future__ import annotations

import importlib.util
import os
import warnings
from dataclasses import dataclass

import torch

from attnkit.hf.attention import attend_layer
from attnkit.hf.cache import KVLayer
from attnkit.kernels.sparse_prefill import (
    block_gather_attention,
    causal_pairs,
    causal_visibility,
    flex_block_attention,
    flex_ready,
    group_stats,
    mask_to_lists,
    masked_attention,
    query_blocks,
    read_pairs,
)
from attnkit.methods.base import Method, check_choice, check_int
from attnkit.reference import attention_probs

NEG_INF = float("-inf")
BOUNDS = "dhsa:chunk_of"  # run.shared key: (B, n) chunk id of every stored slot, shared by all layers


def fixed_chunks(kpos: torch.Tensor, size: int) -> torch.Tensor:
    """(B, n) chunk id of every slot: position // size (-1 for padding)."""
    return torch.where(kpos >= 0, kpos // size, -1)


def mass_ratios(query, key, value, qpos: torch.Tensor, kpos: torch.Tensor, scaling: float, w: int = 4,
                eps: float = 1e-6, block: int = 256, kernel: str = "auto") -> torch.Tensor:
    """(B, n) the official ``label_boundaries`` score of a boundary after each slot c: with M the head-averaged
    attention of this forward's queries, A_past = M's mass from rows after c + w into columns (c - w, c], A_fut
    into (c, c + w]; ratio = (max + eps) / (min + eps); 0 where the window does not fit. query (B, H, q, D) = the
    last q slots; key/value (B, Hkv, n, D); qpos (B, q) and kpos (B, n) positions (causal visibility).

    ``kernel``: "torch" sums M in row blocks of ``block`` (memory block x n; a float32 pass over every
    probability: ~13 s at 128K on an H100), "triton" reads q and k only (attnkit/kernels/triton_mass.py: 0.63 s
    at 128K on the H100), "auto" takes triton on CUDA where triton is installed and the head dim is a power of two
    >= 16, and falls back to torch, warning once, if the kernel fails there; ``ATTNKIT_MASS_KERNEL=torch`` keeps
    torch."""
    if kernel not in ("auto", "torch", "triton"):
        raise ValueError(f"kernel={kernel!r} is invalid; accepted: 'auto', 'torch', 'triton'")
    d = query.shape[-1]
    auto = kernel == "auto"
    if auto:
        fits = query.is_cuda and d >= 16 and d & (d - 1) == 0 and os.environ.get("ATTNKIT_MASS_KERNEL") != "torch"
        kernel = "triton" if fits and importlib.util.find_spec("triton") is not None else "torch"
    far = None
    if kernel == "triton":
        try:
            far, band = _mass_triton(query, key, qpos, kpos, scaling, w)
        except Exception as exc:  # noqa: BLE001 - the exact torch sums take any failure of the kernel path
            if not auto:
                raise
            if not isinstance(exc, ValueError):  # ValueError: slots out of position order, which torch handles
                warnings.warn(f"attnkit: DHSA's Triton mass kernels failed ({type(exc).__name__}: {exc}); using "
                              "the torch sums (ATTNKIT_MASS_KERNEL=torch skips the attempt)", stacklevel=2)
    if far is None:
        far, band = _mass_torch(query, key, qpos, kpos, scaling, w, block)
    n = key.shape[2]
    # after[c, j] = M's mass into column j from rows after c + w = far[j] (rows >= j + 2w) + band[j, t] for
    # t > c + w - j: sums of non-negative terms only (a column total minus its band cancelled in float32)
    suffix = band.flip(-1).cumsum(-1).flip(-1)  # suffix[j, t] = sum of band[j, t:]
    suffix = torch.cat([suffix[..., 1:], torch.zeros_like(suffix[..., :1])], -1)  # sum of band[j, t + 1:]
    ratio = torch.zeros((far.shape[0], n), device=key.device, dtype=torch.float64)
    c = torch.arange(w - 1, n - w, device=key.device)
    if len(c):
        cols = c.unsqueeze(1) + torch.arange(-w + 1, w + 1, device=key.device)  # (nc, 2w): past w, then future w
        after = far[:, cols] + suffix[:, cols, (c.unsqueeze(1) + w - cols).clamp(0, 2 * w - 1)]  # rows > c + w
        past, fut = after[..., :w].sum(-1), after[..., w:].sum(-1)
        ratio[:, c] = (torch.maximum(past, fut) + eps) / (torch.minimum(past, fut) + eps)
    return ratio.float().masked_fill(kpos < 0, 0.0)


def _mass_torch(query, key, qpos, kpos, scaling: float, w: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(far (B, n), band (B, n, 2w)) float64 from M in row blocks: far[j] = mass from rows at slots >= j + 2w,
    band[j, t] = M[slot j + t, j]."""
    b, _, q, _ = query.shape
    n = key.shape[2]
    col = torch.zeros((b, n), device=key.device, dtype=torch.float64)
    band = torch.zeros((b, n, 2 * w), device=key.device, dtype=torch.float64)
    key = key.float()  # once, not per row block
    for s in range(0, q, block):
        mask = causal_visibility(qpos[:, s : s + block], kpos)
        probs, _ = attention_probs(query[:, :, s : s + block], key, mask, scaling)
        m = probs.mean(1).double()  # (B, rows, n)
        rows = torch.arange(s, s + m.shape[1], device=key.device) + (n - q)  # their slots
        real = kpos.gather(1, rows.expand(b, -1)) >= 0
        m = m * real.unsqueeze(-1)
        col += m.sum(1)
        for t in range(2 * w):
            j = rows - t
            ok = j >= 0
            band[:, j[ok], t] += m[:, ok.nonzero()[:, 0], j[ok]]
    return col - band.sum(-1), band  # float64: the subtraction is exact enough here


def _mass_triton(query, key, qpos, kpos, scaling: float, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``_mass_torch``'s two sums from q and k: far by the kernel, band from 2w shifted dot products."""
    from attnkit.kernels.triton_mass import far_mass, row_lse

    b, h, q, d = query.shape
    n = key.shape[2]
    lse = row_lse(query, key, qpos, kpos, scaling)  # (B, H, q)
    far = far_mass(query, key, qpos, kpos, scaling, 2 * w, lse).mean(1).double()
    hkv = key.shape[1]
    band = torch.zeros((b, n, 2 * w), device=key.device, dtype=torch.float64)
    for t in range(2 * w):
        # key slots j whose row j + t is one of the q queries (query index j + t - (n - q)), 8K at a time
        for lo in range(max(0, n - q - t), n - t, 8192):
            j = torch.arange(lo, min(lo + 8192, n - t), device=key.device)
            i = j + t - (n - q)
            qi = query[:, :, i].float().view(b, hkv, h // hkv, len(j), d)
            s = (qi * key[:, :, j].float().unsqueeze(2)).sum(-1).view(b, h, len(j)) * scaling
            vis = (kpos[:, j] >= 0) & (kpos[:, j] <= qpos[:, i]) & (qpos[:, i] >= 0)  # (B, L)
            p = torch.where(vis.unsqueeze(1), torch.exp(s - lse[:, :, i]), torch.zeros((), device=key.device))
            band[:, j, t] = p.mean(1).double()
    return far, band


def mass_chunks(ratio: torch.Tensor, kpos: torch.Tensor, n_chunks: int, theta: float = 1.1, nms: int = 8,
                w: int = 4, tail: int = 0) -> torch.Tensor:
    """(B, n) chunk ids from boundary scores (B, n), as the official code labels them: slots scoring above
    ``theta`` away from the ends, strongest first, at least ``nms`` + 1 apart, at most ``n_chunks`` - 1 of
    them; a boundary also where the last ``tail`` tokens begin. A boundary after slot c starts a chunk at
    c + 1."""
    b, n = kpos.shape
    ids = torch.full((b, n), -1, dtype=torch.long)
    # on the host, in one copy: a loop of GPU scalar reads over 128K candidates took seconds (H200, notes/gpu.md)
    scores, reals = ratio.detach().float().cpu(), (kpos >= 0).cpu()
    for r in range(b):
        real = reals[r].nonzero()[:, 0]
        if not len(real):
            continue
        lo, hi = int(real[0]), int(real[-1]) + 1
        score = scores[r].clone()
        score[: lo + 2 * w - 1] = 0
        score[max(lo, hi - 2 * w) :] = 0
        cand = (score > theta).nonzero()[:, 0]
        order = cand[score[cand].argsort(descending=True, stable=True)].tolist()  # strongest first
        taken: list[int] = []
        blocked = bytearray(n + 2 * nms + 2)
        for c in order:
            if len(taken) >= n_chunks - 1:
                break
            if not blocked[c + nms + 1]:
                taken.append(c)
                blocked[c + 1 : c + 2 * nms + 2] = b"\x01" * (2 * nms + 1)  # distance <= nms on either side
        starts = sorted({c + 1 for c in taken} | ({hi - tail} if 0 < tail < hi - lo else set()))
        start = torch.zeros(n, dtype=torch.long)
        start[starts] = 1
        ids[r, lo:hi] = start[lo:hi].cumsum(0)
    return ids.to(kpos.device)


def chunk_means(x: torch.Tensor, chunk_of: torch.Tensor, n_chunks: int) -> torch.Tensor:
    """Length-normalised representations: the mean of each chunk's rows times sqrt(its length), float32.
    x (B, Hx, n, D); chunk_of (B, n) ids in [0, n_chunks) or -1 -> (B, Hx, n_chunks, D)."""
    mean, _, cnt = group_stats(x, chunk_of, n_chunks)
    return mean * cnt.sqrt().unsqueeze(1).unsqueeze(-1)


@dataclass
class DHSA(Method):
    """DHSA: per query block, the key tokens of the best-matching chunks, shared by all heads, in prefill.

    Paper: Xiong et al. 2025 (https://arxiv.org/abs/2510.24606; xiongsiheng/DHSA, the Gemma-2 code under
    legacy/, which matches the paper's first version). Keys are split into variable-length chunks once per
    forward (on its first global layer, shared by every layer); each global layer splits the forward's queries
    into blocks of ``block`` positions; a block's representation (head-averaged mean query x sqrt(block
    length)) meets every chunk's (head-averaged mean key x sqrt(chunk length)) and the chunk scores are
    upsampled to their tokens. Each block (all heads) reads its ``recent`` newest visible keys and the
    best-scored others, ``budget`` in all, block-causally; the ``sinks`` earliest chosen entries then give way
    to positions 0..sinks-1 (the code's global tokens); every query reads causally within that set. The last
    ``dense_tail`` queries of a forward attend densely (the code's instruction tokens); decode is dense.

    Chunk boundaries: the paper predicts them with a trained network (weights for Gemma-2 only, not shipped),
    so the two training-free ways are offered: ``boundaries="mass"`` (the code's ``label_boundaries``: the
    attention-mass ratio of the w = 4 tokens before and after each slot as seen by the later queries, above
    1.1, strongest first, at least 9 apart, (keys // block) x ``beta`` chunks at most, plus a boundary where the
    dense tail starts; computed blockwise from the head-averaged float32 attention of the first global layer)
    and ``"fixed"`` (every ``chunk`` positions, as the repository's current block-sparse version does).
    ``kernel``: "gather" (per block key lists, any layout), "flex" (FlexAttention over the chosen tokens' key
    blocks, compiled on CUDA; used where slot = position, else gather) or "auto" (flex on CUDA, gather elsewhere).
    How we differ: a chunk's tokens share its score and the more recent ones win the ties (the code leaves ties
    to topk); with chunked prefill, boundaries and blocks see the current forward's queries only. Shapes: chunk
    ids (B, n), block scores (B, blocks, chunks), read mask (B, 1, q, n).
    """

    name = "dhsa"
    summary = "chunk-level similarity picks key tokens per query block in prefill (all heads share them)"
    paper = "https://arxiv.org/abs/2510.24606"
    kind = "read"

    budget: int = 2048
    block: int = 128
    chunk: int = 64
    recent: int = 128
    sinks: int = 128
    dense_tail: int = 64
    boundaries: str = "mass"
    beta: int = 8
    kernel: str = "auto"

    def __post_init__(self) -> None:
        check_int(self.name, "budget", self.budget, 1)
        for f in ("block", "chunk"):
            check_int(self.name, f, getattr(self, f), 1)
        for f in ("recent", "sinks", "dense_tail"):
            check_int(self.name, f, getattr(self, f), 0)
        if self.recent + self.sinks > self.budget:
            raise ValueError(f"{self.name}: recent + sinks = {self.recent + self.sinks} exceeds budget={self.budget}; "
                             "accepted: recent + sinks <= budget")
        check_choice(self.name, "boundaries", self.boundaries, ("fixed", "mass"))
        check_int(self.name, "beta", self.beta, 1)
        check_choice(self.name, "kernel", self.kernel, ("auto", "gather", "flex"))

    @classmethod
    def for_budget(cls, tokens: int) -> "DHSA":
        """``tokens`` keys read per query block (sinks and recent keys take at most a quarter each)."""
        t = max(1, tokens)
        return cls(budget=t, recent=min(128, t // 4), sinks=min(128, t // 4))

    def chunk_ids(self, run, layer: KVLayer, query, key, value, scaling: float) -> torch.Tensor:
        kpos = layer.stored_pos()[:, 0]
        first = min(i for i, t in enumerate(run.layer_types) if t != "sliding_attention")
        cached = run.shared.get(BOUNDS)
        if layer.layer_idx != first and cached is not None and cached.shape == kpos.shape:
            return cached  # this forward's boundaries, from its first global layer
        if self.boundaries == "fixed":
            ids = fixed_chunks(kpos, self.chunk)
        else:
            ratio = mass_ratios(query, key, value, layer.qpos, kpos, scaling)
            n_keys = int((kpos >= 0).sum(-1).max())
            ids = mass_chunks(ratio, kpos, max(2, (n_keys // self.block) * self.beta), tail=self.dense_tail)
        run.shared[BOUNDS] = ids
        return ids

    def choose(self, run, layer: KVLayer, query, key, value, scaling: float):
        """(chosen (B, nqb, n) bool: what each query block reads before causality; local block of every query
        (B, q); query index per block offset (B, nqb, block)), or None when the forward stays dense."""
        b = query.shape[0]
        kpos = layer.stored_pos()[:, 0]  # (B, n)
        qpos = layer.qpos  # (B, q)
        if int((kpos >= 0).sum(-1).max()) <= self.budget:
            return None
        chunk_of = self.chunk_ids(run, layer, query, key, value, scaling)
        n_chunks = int(chunk_of.max()) + 1
        local, qidx, nqb = query_blocks(qpos, self.block)  # by position: a padded row blocks as its prompt alone
        # head-averaged representations (queries over H, keys over Hkv: the official code's mean after repeat_kv)
        qrep = chunk_means(query.float().mean(1, keepdim=True), local, nqb)[:, 0]  # (B, nqb, D): mean x sqrt(len)
        krep = chunk_means(key.float().mean(1, keepdim=True), chunk_of, n_chunks)[:, 0]  # (B, nch, D)
        scores = torch.matmul(qrep, krep.transpose(-1, -2))  # (B, nqb, nch), unscaled as in the code
        last = torch.full((b, nqb), -1, device=qpos.device, dtype=qpos.dtype)
        last.scatter_reduce_(1, local.clamp_min(0), qpos.masked_fill(local < 0, -1), "amax")  # block's last pos
        kp = kpos.unsqueeze(1)  # (B, 1, n)
        vis = (kp >= 0) & (kp <= last.unsqueeze(-1))  # block-causal (B, nqb, n)
        forced = vis & (kp > last.unsqueeze(-1) - self.recent)
        # priority as an exact integer key: forced slots, then the chunk's rank by score, then recency (a chunk's
        # tokens share its score; float tie-breaks would flip with rounding)
        rank = scores.argsort(-1).argsort(-1)  # (B, nqb, nch): 0 = lowest score
        tok_rank = rank.gather(2, chunk_of.clamp_min(0).unsqueeze(1).expand(b, nqb, -1))  # (B, nqb, n)
        span = int(kpos.max()) + 2
        pri = (tok_rank + 1) * span + kp + 1
        pri = torch.where(forced, (n_chunks + 2) * span, pri).masked_fill(~vis, 0)
        top = pri.topk(min(self.budget, pri.shape[-1]), dim=-1)
        chosen = torch.zeros_like(vis)
        chosen.scatter_(2, top.indices, top.values > 0)  # (B, nqb, n)
        if self.sinks:  # the code's global tokens: the earliest `sinks` chosen entries give way to positions 0..
            chosen = (chosen & (chosen.long().cumsum(-1) > self.sinks)) | (vis & (kp < self.sinks))
        return chosen, local, qidx

    def tail(self, q: int) -> int:
        return min(self.dense_tail, q)

    def read_mask(self, layer: KVLayer, chosen: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """(B, 1, q, n) bool: what each query read (for the recorder; the attention never builds it)."""
        b, q = local.shape
        visible = causal_visibility(layer.qpos, layer.stored_pos()[:, 0])
        read = chosen.gather(1, local.clamp_min(0).unsqueeze(-1).expand(b, q, chosen.shape[-1])).unsqueeze(1) & visible
        t = self.tail(q)
        if t:
            read[:, :, q - t :] = visible[:, :, q - t :]
        return read

    def attend(self, run, module, layer: KVLayer, query, key, value, scaling: float, softcap) -> torch.Tensor:
        if query.shape[2] == 1 or softcap is not None or layer.static:
            return attend_layer(run, layer, query, key, value, scaling, softcap)
        chosen = self.choose(run, layer, query, key, value, scaling)
        if chosen is None:
            return attend_layer(run, layer, query, key, value, scaling, softcap)
        chosen, local, qidx = chosen
        kpos, qpos, q = layer.stored_pos()[:, 0], layer.qpos, query.shape[2]
        if flex_ready(layer, query, self.block, self.kernel):
            out = flex_block_attention(query, key, value, None, self.block, scaling, tokens=chosen.unsqueeze(1))
        else:
            out = block_gather_attention(query, key, value, qidx, mask_to_lists(chosen).unsqueeze(1), qpos, kpos,
                                         scaling)
        t = self.tail(q)
        tail_local = local.clone()
        if t:
            tail_local[:, q - t :] = -1
        h = query.shape[1]
        self.note_read(run, h * read_pairs(chosen.unsqueeze(1), tail_local) + h * causal_pairs(qpos[:, q - t :]),
                       h * causal_pairs(qpos))
        if t:  # the last queries (the code's instruction tokens) attend densely
            out[:, :, q - t :], _ = masked_attention(query[:, :, q - t :], key, value,
                                                     causal_visibility(qpos[:, q - t :], kpos), scaling)
        if run.recorder is not None:
            run.recorder(dict(layer=layer.layer_idx, query=query, key=key, value=value,
                              mask=self.read_mask(layer, chosen, local), scaling=scaling, out=out))
        layer.compact()
        return out
