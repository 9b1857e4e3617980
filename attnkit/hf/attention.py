"""attnkit's attention function and mask function, registered under one name in transformers' interfaces.

transformers hands every attention function ``(module, query, key, value, attention_mask, scaling, dropout,
**kwargs)`` with q, k, v after RoPE and after the cache update. Ours dispatches on the module's config to the
active :class:`~attnkit.session.Run`, takes the cache layer that just updated (``run.current[layer_idx]``), and
lets the method attend. The mask function returns no mask: masks come from the positions the cache layer
stores, which stay right under eviction and padding (the run hands each layer the forward's 2D attention mask).
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import CausalBias, causal_lower_right

from attnkit.hf import band
from attnkit.reference import attention_probs, dense_attention, expand_kv, per_head

NAME = "attnkit"
#: id(text config) -> active Run; filled by attnkit.apply for the duration of its block
ACTIVE_RUNS: dict[int, object] = {}
_registered = False
# cuDNN attention builds a new plan for every new KV length: ~10 ms of CPU per decode step on an H200 (torch
# 2.11, measured, notes/gpu.md). The KV length changes every step, so attnkit never lets SDPA pick it.
_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _score_bytes() -> int:
    text = os.environ.get("ATTNKIT_MASKED_SCORE_BYTES", str(1 << 28))
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"ATTNKIT_MASKED_SCORE_BYTES={text!r} is invalid; accepted: a number of bytes >= 1")
    return int(text)


#: Float32 scores (B x H x q x n x 4 bytes) one masked attention call may build. SDPA takes a bool mask to its
#: memory-efficient kernel where it can; where it cannot it runs its math path, which materialises the scores:
#: 8 GiB per batch row for Gemma-3-270M's sliding layers at 16K on the H100 (notes/gpu.md, twelfth session).
#: Above this the queries go in chunks, each over the key columns its mask opens (a sliding window's band).
#: ATTNKIT_MASKED_SCORE_BYTES overrides it (bytes).
MASKED_SCORE_BYTES = _score_bytes()


def sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scaling: float,
    causal: bool = False,
) -> torch.Tensor:
    """Fused attention. query (B, H, q, D); key/value (B, Hkv, n, D); mask (B, 1 or Hkv, q, n) bool, or a
    ``CausalBias`` -> (B, H, q, D).

    GQA goes through ``enable_gqa`` so the cache is never copied per query head (repeating KV heads cost
    more than the attention itself on a 32K decode step). A masked call whose scores would pass
    ``MASKED_SCORE_BYTES`` runs in query chunks (``masked_rows``): same result, bounded memory.
    """
    if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and query.shape[2] > 1:  # (CausalBias is no bool)
        rows = masked_chunk_rows(query, key)
        if query.shape[2] > rows:
            return _in_query_chunks(query, key, value, scaling, rows, lambda r: mask[:, :, r])
    return _sdpa(query, key, value, mask, scaling, causal)


def masked_chunk_rows(query: torch.Tensor, key: torch.Tensor) -> int:
    """Query rows per chunk of a masked attention whose (B, H, rows, n) float32 scores stay under
    MASKED_SCORE_BYTES; query (B, H, q, D), key (B, Hkv, n, D)."""
    b, h = query.shape[:2]
    return max(1, MASKED_SCORE_BYTES // (b * h * key.shape[2] * 4))


def layer_sdpa(layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
    """``sdpa`` under a cache layer's mask, each query chunk with only its own rows of the mask: at 16K x 4 rows the
    whole (B, 1, q, n) bool mask and its temporaries were 3 GiB (notes/gpu.md, thirteenth session)."""
    rows = masked_chunk_rows(query, key)
    if query.shape[2] <= rows:
        return sdpa(query, key, value, layer.mask(), scaling)
    return _in_query_chunks(query, key, value, scaling, rows, layer.mask)  # a mask for some rows is never None


def _in_query_chunks(query, key, value, scaling: float, rows: int, mask_rows) -> torch.Tensor:
    """``masked_rows`` over chunks of ``rows`` queries; ``mask_rows(slice)`` gives each chunk's (B, 1 or Hkv,
    rows, n) bool mask."""
    return torch.cat([masked_rows(query[:, :, s : s + rows], key, value, mask_rows(slice(s, s + rows)), scaling)
                      for s in range(0, query.shape[2], rows)], dim=2)


def masked_rows(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor,
                scaling: float) -> torch.Tensor:
    """Queries (B, H, q', D) over only the key columns their mask (B, 1 or Hkv, q', n) opens for any of them
    (a slice when they are contiguous, else gathered: sinks + a window): the columns left out are masked for
    every query here, so the result is the same (one host sync)."""
    cols = mask.flatten(0, 2).any(0).nonzero().flatten()
    count = cols.numel()
    if 0 < count < key.shape[2]:
        lo, hi = (int(x) for x in torch.stack([cols[0], cols[-1] + 1]).tolist())
        if hi - lo == count:
            key, value, mask = key[:, :, lo:hi], value[:, :, lo:hi], mask[..., lo:hi]
        else:
            key, value, mask = key[:, :, cols], value[:, :, cols], mask[..., cols]
    return _sdpa(query, key, value, mask, scaling, False)


def _sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, scaling: float,
          causal: bool) -> torch.Tensor:
    """``sdpa`` in one call."""
    if mask is not None and not isinstance(mask, CausalBias) and mask.shape[1] not in (1, query.shape[1]):
        mask = expand_kv(mask, query.shape[1])
    gqa = key.shape[1] != query.shape[1]
    if gqa and query.is_cuda and isinstance(mask, torch.Tensor):
        # SDPA's masked kernel (memory-efficient) takes no grouped heads: with enable_gqa it falls back to the math
        # path, which materialises (B, H, q, n) float32 scores (24 GiB for a batch of 8 at 6K x 4K). Repeating
        # the KV heads costs (H / Hkv - 1) x the keys' bytes instead. One KV head (Gemma-3-270M) is broadcast
        # without a copy: left at one head, the fused kernels refused the unequal head counts and every masked
        # call ran the math path in float32 (notes/gpu.md, fourteenth and fifteenth sessions).
        key, value = per_head(key, query.shape[1]), per_head(value, query.shape[1])
        gqa = False
    with sdpa_kernel(_BACKENDS):
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, scale=scaling, enable_gqa=gqa, is_causal=causal
        )


def causal_prefill(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
    """Bottom-right causal attention of a prefill chunk (B, H, q, D) over (B, Hkv, n, D), q <= n.

    SDPA serves a lower-right ``CausalBias`` with its memory-efficient kernel only (1.3-1.5x slower than flash on
    an H200 at 128K, notes/gpu.md). The flash kernel itself aligns a causal mask bottom-right when q < n (SDPA
    only refuses that case to keep its upper-left convention), and it takes grouped KV heads as they are, so on
    CUDA in half precision the chunk goes to it directly; tested against the CausalBias path.
    """
    q, n = query.shape[2], key.shape[2]
    half = query.is_cuda and query.dtype in (torch.float16, torch.bfloat16)
    if half and query.shape[-1] <= 128 and prefill_kernel() == "cudnn" and _CUDNN_OK[0]:
        try:
            return split_causal(_cudnn_attend, query, key, value, scaling)
        except RuntimeError as err:  # a shape or build cuDNN refuses: flash from now on, and say so once
            _CUDNN_OK[0] = False
            warnings.warn(f"attnkit: cuDNN prefill refused ({str(err).splitlines()[0][:120]}); using flash",
                          stacklevel=2)
    if half and query.shape[-1] <= 256 and _FLASH_OK[0]:
        try:
            return torch.ops.aten._scaled_dot_product_flash_attention(
                query, key, value, 0.0, True, False, scale=scaling
            )[0]
        except RuntimeError:  # an arch or layout the flash kernel refuses: the SDPA path from now on
            _FLASH_OK[0] = False
    return sdpa(query, key, value, causal_lower_right(q, n) if q != n else None, scaling, causal=q == n)


_FLASH_OK = [os.environ.get("ATTNKIT_FLASH_PREFILL", "1") != "0"]
_CUDNN_OK = [True]
PREFILL_KERNELS = ("flash", "cudnn")


def prefill_kernel() -> str:
    """The dense causal prefill kernel on CUDA: ``ATTNKIT_PREFILL_KERNEL`` = "flash" (default, SDPA's flash
    kernel) or "cudnn" (cuDNN's fused attention: 1.75x flash's speed on a 128K causal forward on the H100,
    docs/results/attention_kernels.csv; opt-in until its bf16 tests have run on the GPU)."""
    kernel = os.environ.get("ATTNKIT_PREFILL_KERNEL", "flash")
    if kernel not in PREFILL_KERNELS:
        raise ValueError(f"ATTNKIT_PREFILL_KERNEL={kernel!r} is not a prefill kernel; accepted: "
                         f"{', '.join(PREFILL_KERNELS)}")
    return kernel


def split_causal(attend, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 scaling: float) -> torch.Tensor:
    """Bottom-right causal attention of q queries over n >= q keys from a kernel that knows only square (top-left)
    causal masks: the n - q older keys, visible to every query (no mask), and the chunk's own q keys (square
    causal), merged by their log-sum-exps. ``attend(query, key, value, causal, scaling)`` -> (out (B, H, q, D),
    lse (B, H, q) natural log)."""
    q, n = query.shape[2], key.shape[2]
    if q == n:
        return attend(query, key, value, True, scaling)[0]
    old_out, old_lse = attend(query, key[:, :, : n - q], value[:, :, : n - q], False, scaling)
    new_out, new_lse = attend(query, key[:, :, n - q :], value[:, :, n - q :], True, scaling)
    top = torch.maximum(old_lse, new_lse)
    w_old, w_new = torch.exp(old_lse - top).unsqueeze(-1), torch.exp(new_lse - top).unsqueeze(-1)
    return ((old_out.float() * w_old + new_out.float() * w_new) / (w_old + w_new)).to(query.dtype)


def _cudnn_attend(query, key, value, causal: bool, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cuDNN's fused attention (grouped KV heads repeated: its SDPA entry takes none) with its log-sum-exp."""
    b, h, q, _ = query.shape
    key, value = expand_kv(key, h), expand_kv(value, h)
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        query, key, value, None, True, 0.0, causal, False, scale=scaling)[:2]
    return out, lse.reshape(b, h, q)


def attend_layer(run, layer, query, key, value, scaling: float, softcap: float | None) -> torch.Tensor:
    """Attention over what a cache layer holds, under its mask; feeds probabilities to the layer and compacts.

    query (B, H, q, D); key/value (B, Hkv, n, D) -> (B, H, q, D) in the query's dtype.
    """
    if layer.static:  # fixed-shape decode step: device-held slots, no mask, no compaction
        out = layer.static_attend(query, scaling, softcap)
        layer.static_after()
        return out
    out, mask = layer_attention(run, layer, query, key, value, scaling, softcap)
    if run.recorder is not None:
        run.recorder(dict(layer=layer.layer_idx, query=query, key=key, value=value, mask=mask, scaling=scaling, out=out))
    layer.compact()
    return out


def layer_attention(run, layer, query, key, value, scaling: float,
                    softcap: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``attend_layer``'s attention (a non-static layer) without the recorder and compaction, for a method that
    changes some heads' output before it records and compacts itself (ACT). Returns (out, the whole mask where the
    recorder needs it, else None). query (B, H, q, D); key/value (B, Hkv, n, D) -> out (B, H, q, D)."""
    wants = layer.wants_probs
    q, n = query.shape[2], key.shape[2]
    # A prefill chunk over a cache that holds every earlier token in order is plain bottom-right causal: give SDPA
    # that bias instead of a (q, n) bool mask, which would push it to a slower masked kernel (and, at 128K, build
    # a mask of gigabytes). The last few queries' probabilities ("last:<w>", SnapKV) come from a small (w, n) pass.
    fusable = q > 1 and wants != "all" and softcap is None and run.recorder is None
    plain_causal = fusable and layer.holds_prefix()
    # A padded batch or a sliding window: a per-row causal band, one varlen flash call instead of masked chunks
    in_band, window = layer.band() if fusable and not plain_causal and band.usable(query) else (False, None)
    # the whole (q, n) mask only for the recorder; the other paths build it query block by query block
    whole = not plain_causal and run.recorder is not None
    mask = layer.mask() if whole else None
    if plain_causal:
        out = causal_prefill(query, key, value, scaling)
        if wants:
            w = min(int(wants.split(":")[1]), q)
            rows = torch.arange(n - w, n, device=key.device).view(w, 1)
            sub_mask = (torch.arange(n, device=key.device) <= rows).view(1, 1, w, n)
            probs, _ = attention_probs(query[:, :, -w:], key, sub_mask, scaling)
            layer.observe(probs)  # holds_prefix: no padding, so every query is real
    elif wants == "all" or softcap is not None:
        out = dense_rows(layer, query, key, value, mask, scaling, softcap)
        if wants and wants != "all":  # "last:<w>" under a softcap: the last w queries' probabilities only
            w = min(int(wants.split(":")[1]), q)
            probs, _ = attention_probs(query[:, :, -w:], key, layer.mask(slice(q - w, q)), scaling, softcap)
            layer.observe(only_real_queries(layer, probs))
    else:
        out = band_prefill(layer, query, key, value, scaling, window) if in_band else None
        if out is None:
            out = sdpa(query, key, value, mask, scaling) if whole else layer_sdpa(layer, query, key, value, scaling)
        if wants:  # "last:<w>": probabilities of the chunk's last w queries only
            w = min(int(wants.split(":")[1]), query.shape[2])
            sub_mask = mask[:, :, -w:] if whole else layer.mask(None if w == q else slice(q - w, q))
            probs, _ = attention_probs(query[:, :, -w:], key, sub_mask, scaling)
            layer.observe(only_real_queries(layer, probs))
    return out, mask


def row_blocks(layer, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None):
    """(rows, mask) per block of a chunk's queries whose (B, H, rows, n) float32 scores stay under
    MASKED_SCORE_BYTES: each block's rows of ``mask`` where the recorder built it whole, else of the layer's mask
    (the layer's whole mask, possibly None, when one block takes every query).
    query (B, H, q, D); key (B, Hkv, n, D)."""
    q = query.shape[2]
    step = masked_chunk_rows(query, key)
    for s in range(0, q, step):
        rows = slice(s, min(s + step, q))
        yield rows, mask[:, :, rows] if mask is not None else layer.mask(None if step >= q else rows)


def dense_rows(layer, query, key, value, mask: torch.Tensor | None, scaling: float,
               softcap: float | None) -> torch.Tensor:
    """Eager float32 attention (a softcap, or a layer that scores with every query's probabilities) in query
    blocks whose (B, H, rows, n) scores stay under MASKED_SCORE_BYTES, each with its own rows of the layer's mask
    (``mask``: the whole one, where the recorder built it). With wants_probs "all", each block's probabilities go
    to ``observe`` as they are made. Whole, they are H x q x n x 4 bytes per batch row, and the scores before
    the softmax as much again: 1.5 GiB each for H2O with a 4,096-token budget on a 32-head model in 2,048-query
    chunks (n = budget + chunk), 4 GiB for a softcapped 16-head Gemma-2 reading 8K in one chunk; on the tests'
    tiny Llama, H2O at budget 8,192 over 16K in 4K chunks peaked at 2,848 MiB whole, 1,381 MiB in blocks
    (benchmarks/row_blocks_memory.py, CPU). query (B, H, q, D); key/value (B, Hkv, n, D) -> (B, H, q, D) in the
    query's dtype."""
    observe = layer.wants_probs == "all"
    outs = []
    for rows, block_mask in row_blocks(layer, query, key, mask):
        out, probs, _ = dense_attention(query[:, :, rows], key, value, block_mask, scaling, softcap)
        outs.append(out.to(query.dtype))
        if observe:
            layer.observe(only_real_queries(layer, probs, rows), rows)
        del probs
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def band_prefill(layer, query, key, value, scaling: float, window: int | None) -> torch.Tensor | None:
    """A prefill chunk (B, H, q, D) over a layer whose ``band()`` holds, by :mod:`attnkit.hf.band`'s flash call;
    pad queries' rows zeroed (finite, as the masked path's). None where the kernel is refused."""
    pads = (layer.stored_pos()[:, 0] < 0).sum(-1)  # (B,) left-padding slots per row (every head alike)
    out = band.run_flash(query, key, value, pads, scaling, window)
    if out is None or not layer.padded:
        return out
    real = layer.qpos.view(query.shape[0], 1, -1, 1) >= 0
    return torch.where(real, out, 0)


def only_real_queries(layer, probs: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
    """Zero the (B, H, q', n) probabilities of pad queries, which see everything and must score nothing; they
    belong to the chunk's last q' queries, or to its ``rows``."""
    real = layer.real_queries(None, rows) if rows is not None else layer.real_queries(probs.shape[2])
    return probs if real is None else probs * real


def attnkit_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The function transformers calls in every attention layer while attnkit is active."""
    run = ACTIVE_RUNS.get(id(module.config))
    handle = getattr(run.cache, "step_handle", None) if run is not None else None
    if handle is not None and torch.compiler.is_compiling():  # a compiled decode step (attnkit.hf.step_ops)
        scale = module.head_dim**-0.5 if scaling is None else scaling
        out = torch.ops.attnkit.step_attend(query, key, handle, module.layer_idx, scale, kwargs.get("softcap"))
        return out.transpose(1, 2).contiguous(), None
    if run is None:
        raise RuntimeError(
            "attnkit attention was called outside `attnkit.apply(...)`; restore the model's attention "
            "implementation or run inside the block"
        )
    layer = run.current.pop(module.layer_idx, None)
    if layer is None:
        raise RuntimeError(
            f"layer {module.layer_idx}: no attnkit cache layer was updated in this forward; pass the run's cache "
            "(`past_key_values=run.new_cache()`) or let attnkit.apply inject it"
        )
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("attention sinks as learned logits (s_aux, gpt-oss) are not supported yet")
    scale = module.head_dim**-0.5 if scaling is None else scaling
    softcap = kwargs.get("softcap")
    out = run.attend(module, layer, query, key, value, scale, softcap)
    return out.transpose(1, 2).contiguous(), None


def attnkit_mask(*args, **kwargs) -> None:
    """Mask function paired with :func:`attnkit_attention`: masks are built from cache positions instead."""
    return None


def register() -> None:
    """Register attnkit's functions with transformers (once, on first use; never at import)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attnkit_attention)
    AttentionMaskInterface.register(NAME, attnkit_mask)
    _registered = True
