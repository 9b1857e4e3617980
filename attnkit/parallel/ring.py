"""Ring attention over torch.distributed point-to-point ops: portable (gloo on CPU, NCCL on CUDA), forward only.

Paper: Liu et al. 2023, Ring Attention with Blockwise Transformers (https://arxiv.org/abs/2310.01889); the
load-balanced zigzag layout as in torch's context parallelism (``_HeadTailLoadBalancer``) and zhuzilin's
ring-flash-attention. Every rank keeps its queries; its K/V block travels around the ring (rank r sends to
r + 1 and receives from r - 1, the next block's transfer overlapping this block's attention), and the W partial
outputs merge exactly by log-sum-exp in float32 (:mod:`attnkit.parallel.blocks`).

Causal attention is planned from the layout, without masks: at step i rank r holds the keys of rank
s = r - i; a (query chunk, key chunk) pair is either fully visible (keys earlier), invisible (later) or the
diagonal (step 0, index-causal). In zigzag every step after the first is half the pairs (all queries x the
source's early chunk when s < r, this rank's late chunk x all keys when s > r), so work is even; in the
contiguous layout rank r works r + 1 steps. Other visibilities (window, DHSA lists) build each step's bool mask
from global positions and skip steps where nothing is visible.

torch's own ``context_parallel`` ring is :mod:`attnkit.parallel.torch_ring` (CUDA only).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from attnkit.parallel.blocks import NEG_INF, attend_block, merge_into
from attnkit.parallel.layout import SeqLayout


def check_qkv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: SeqLayout, name: str) -> None:
    """One ValueError naming the shape at fault: query (B, H, n/W, D), key/value (B, Hkv, n/W, D), Hkv | H."""
    if query.ndim != 4 or key.ndim != 4 or value.ndim != 4 or key.shape[:3] != value.shape[:3]:
        raise ValueError(f"{name}: query {tuple(query.shape)}, key {tuple(key.shape)}, value {tuple(value.shape)}; "
                         "accepted: query (B, H, T, D) and key/value (B, Hkv, T, D)")
    for what, t in (("query", query), ("key", key)):
        if t.shape[2] != layout.local_len:
            raise ValueError(f"{name}: {what} holds {t.shape[2]} tokens; accepted: this rank's "
                             f"{layout.local_len} = {layout.n} / {layout.world} of the layout")
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"{name}: {query.shape[1]} query heads over {key.shape[1]} KV heads; accepted: KV heads "
                         "dividing the query heads")


def ring_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, layout: SeqLayout, group=None,
    scale: float | None = None, visibility=None,
) -> torch.Tensor:
    """Attention of this rank's queries over every rank's keys, passing K/V around the ring.

    query (B, H, n/W, D); key/value (B, Hkv, n/W, D): this rank's tokens in ``layout`` order (positions
    ``layout.positions()``); visibility: None (causal) or a mask kind of :mod:`attnkit.parallel.masks`.
    -> (B, H, n/W, D) in the query's dtype. Every rank of ``group`` calls it, with the same layout (its own
    ``rank``: the rank in ``group``).
    """
    check_qkv(query, key, value, layout, "ring_attention")
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    w, rank = layout.world, layout.rank
    b, h, t, _ = query.shape
    acc = torch.zeros((b, h, t, value.shape[-1]), device=query.device)  # float32 accumulators
    lse = torch.full((b, h, t), NEG_INF, device=query.device)
    kv = torch.stack([key, value]).contiguous()  # (2, B, Hkv, n/W, D): one message per step
    spare = torch.empty_like(kv) if w > 1 else None
    nxt = dist.get_global_rank(group, (rank + 1) % w) if group is not None else (rank + 1) % w
    prv = dist.get_global_rank(group, (rank - 1) % w) if group is not None else (rank - 1) % w
    qpos = layout.positions(device=query.device)
    for step in range(w):
        reqs = []
        if step < w - 1:  # start the next block's transfer before attending this one
            ops = [dist.P2POp(dist.isend, kv, nxt, group), dist.P2POp(dist.irecv, spare, prv, group)]
            reqs = dist.batch_isend_irecv(ops)
        src = (rank - step) % w
        if visibility is None:
            _causal_step(query, kv[0], kv[1], layout, src, scale, acc, lse)
        else:
            mask = visibility.mask(qpos, layout.positions(src, device=query.device))
            if bool(mask.any()):
                out, l = attend_block(query, kv[0], kv[1], scale, mask=None if bool(mask.all()) else mask)
                merge_into(acc, lse, out, l)
        for req in reqs:
            req.wait()
        if step < w - 1:
            kv, spare = spare, kv
    return acc.to(query.dtype)


def _causal_step(query, key, value, layout: SeqLayout, src: int, scale: float, acc, lse) -> None:
    """Fold causal attention of this rank's queries over ``src``'s keys into the accumulators."""
    if src == layout.rank:  # both ascending in the same positions: index-causal
        out, l = attend_block(query, key, value, scale, causal=True)
        merge_into(acc, lse, out, l)
        return
    qc, kc = layout.chunks(), layout.chunks(src)
    full = [[kb[1] <= qa[0] for kb in kc] for qa in qc]  # chunk pairs: fully visible, else invisible
    qs = [i for i, row in enumerate(full) if any(row)]
    ks = [j for j in range(len(kc)) if any(row[j] for row in full)]
    if not qs:
        return
    c = layout.chunk
    if all(full[i][j] for i in qs for j in ks) and qs == list(range(qs[0], qs[-1] + 1)) \
            and ks == list(range(ks[0], ks[-1] + 1)):  # one rectangle: one call
        pairs = [(slice(qs[0] * c, (qs[-1] + 1) * c), slice(ks[0] * c, (ks[-1] + 1) * c))]
    else:
        pairs = [(slice(i * c, (i + 1) * c), slice(j * c, (j + 1) * c)) for i in qs for j in ks if full[i][j]]
    for qsl, ksl in pairs:
        out, l = attend_block(query[:, :, qsl], key[:, :, ksl], value[:, :, ksl], scale)
        merge_into(acc[:, :, qsl], lse[:, :, qsl], out, l)
