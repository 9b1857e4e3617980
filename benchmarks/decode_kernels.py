"""Per-layer decode attention microbenchmark: attnkit's Triton kernels against SDPA flash and FlexAttention, in one run.

Llama-3.1-8B attention shape (32 query / 8 KV heads, head_dim 128, bf16), one decode query per row. For each
context length it times:

* ``sdpa_flash``: SDPA restricted to the flash backend over exact-length K/V (a prefix view of the buffer).
* ``attnkit_dense``: :func:`attnkit.kernels.decode_attention` over a capacity buffer (context + 2048 slots),
  ``n`` read from a device tensor.
* ``attnkit_sparse_p16`` / ``_p64``: 2048 selected tokens (128 pages of 16 / 32 pages of 64), selection
  included: ``quest_scores`` + ``topk_pages`` + the sparse kernel, every call.
* ``attnkit_quest_p16`` / ``_p64``: what Quest's fixed-shape step runs, :func:`attnkit.kernels.quest_attention`:
  the fused scoring kernel, then one kernel whose split programs each find the top pages (bisection over the
  row's scores) and read their share of them in place, then the split merge: three launches.
* ``attnkit_dense_pdl``, ``attnkit_quest_p16_pdl`` / ``_p64_pdl``: the same kernels launched with programmatic
  dependent launch (``attnkit.kernels.triton_decode.PDL``): each may be scheduled while the one before drains;
  whether attnkit turns it on by default is these rows' to decide.
* ``gather_sdpa_p16``: the naive baseline, the same Quest selection, then a torch gather of the selected
  rows and SDPA flash over the copy.
* ``flex_dense``: FlexAttention's decode kernel (``flex_attention`` under ``torch.compile(dynamic=False,
  fullgraph=True)``, compiled before timing: a graph break would run its unfused eager path unnoticed;
  ``BACKEND="TRITON_DECODE"`` so that it fails rather than fall back to the prefill kernel, or, where
  the installed torch fails on that option, ``AUTO`` with a line saying so: its rule picks the decode kernel for
  these shapes) over the same capacity buffers as ``attnkit_dense``, ``enable_gqa`` (32 query heads over 8 KV
  heads). Its BlockMask (B, 1, 1, cap), KV blocks of 128, lists every block; ``kv_num_blocks`` = ceil(n / 128) is
  written on the device from ``n`` (outside the timed call: a decode loop writes it once per step for all layers)
  and a ``mask_mod`` compares each slot with ``n`` read from the device, so one graph serves every length. Reads
  K/V and ``n``, not ``pos``.
* ``flex_sparse_p16`` / ``_p64``: FlexAttention's decode kernel over the Quest selection of the sparse entries
  (``quest_scores`` + ``topk_pages``, inside the timed call). K/V are viewed as (B * 8, 1, cap, D) and q as
  (B * 8, 4, 1, D), so each KV head is a batch row with its own block list (the decode kernel takes a head
  dimension of 1 with GQA); the BlockMask has KV blocks of one page, the first 2048 / P entries of each row's
  ``kv_indices`` are overwritten with the selected pages every call, and the same length ``mask_mod`` applies.
Each FlexAttention entry is compiled and checked against ``attnkit.reference.dense_attention`` (float32) under the
same mask on one input set, then captured once in a CUDA graph, before the timing; an entry that fails any of these
is skipped with one line saying why.

flashinfer (``BatchDecodeWithPagedKVCacheWrapper``, the other library candidate) is not measured: its wheel
(~100 MB, pure Python, JIT-compiling its bundled CUDA sources with nvcc on first use) exceeds the 64 MiB that the
GPU machine accepts per call unless its sources are pruned by hand, and that machine has no internet to install it
from. Measuring it needs a pruned copy of the wheel (and its ``apache-tvm-ffi`` dependency) brought along.

Then, unless ``--no-breakdown``, a breakdown of the sparse path for pages of 16, 32 and 64 (graph only, no eager
timing; "bytes" is what each piece must read):

* ``quest_torch_pP``: :func:`attnkit.kernels.quest_scores` (the torch scoring, ~10 small kernels with the masks
  of ``topk_pages``) -- here the scores alone.
* ``quest_fused_pP``: :func:`attnkit.kernels.triton_select.quest_scores_masked`, scores and masks in one kernel.
* ``topk_pP``: ``torch.topk(sorted=False)`` alone on precomputed fp32 scores (2048 / P of them per KV head);
  ``topk_bisect_pP``: attnkit's one-program-per-row bisection top-k on the same scores.
* ``sparse_kernel_pP``: :func:`attnkit.kernels.sparse_decode_attention` alone on a precomputed selection.
* ``sparse_fused_pP``: the whole step with :func:`attnkit.kernels.select_pages` + the sparse kernel.
* ``ts_votes_bN_sS``: TokenSelect's scoring of every key and its soft votes
  (:func:`attnkit.kernels.triton_select.tokenselect_votes`) with N keys per loop step and S pipeline stages (the
  bytes are the keys plus the fp32 scores written and read back); ``ts_votes_all_rows_reused``: the same call
  when the Selection Cache reuses every row's picks (the kernels exit at once: what a cache hit costs).

Each method is captured in a CUDA graph that calls it 24 times, cycling over 2-8 input sets so that the bytes
read by consecutive calls exceed L2 (60 MB on H200) 4x, even for the sparse methods at 32K (16 MB per call);
the graph is replayed ``--replays`` times per repeat and the median of ``--repeats`` repeats is reported, next
to an eager (no graph) median. Effective TB/s counts the
K+V bytes each call must read; the floor is all bytes read (K+V, plus the page summary for Quest selection)
over the device-to-device copy bandwidth measured in the same run.

    python benchmarks/decode_kernels.py --contexts 32768,131072,524288 --out results/decode_kernels.json
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from attnkit import kernels
from attnkit.kernels.torch_ref import selected_slots
from attnkit.reference import dense_attention

HEADS, KV_HEADS, HEAD_DIM, DTYPE = 32, 8, 128, torch.bfloat16
SELECTED_TOKENS = 2048
CALLS_PER_GRAPH = 24  # cycling over the input sets (24 is a multiple of every set count 2..8 but 5, 7)
L2_BYTES = 60 << 20  # H200; input sets are rotated so that their working sets together exceed it 4x
HEADROOM = 2048  # free slots past the context in the capacity buffer
DENSE_METHODS = ("sdpa_flash", "attnkit_dense", "flex_dense")  # read all K/V of the context
FLEX_Q_BLOCK = 128  # BlockMask query block; flex_decoding needs a multiple of its BLOCK_M (16 for 1 query x 4 heads)
FLEX_DENSE_BLOCK = 128  # flex_dense's KV block
FLEX_MAX_ERR = 5e-2  # an entry whose error exceeds this fraction of the reference's largest output is not timed
FLEX_OPTIONS = {"BACKEND": "TRITON_DECODE"}  # flex_decoding or an error, not a silent fall back to the prefill kernel


def time_graph(fn: Callable[[int], torch.Tensor], sets: int, replays: int, repeats: int) -> float:
    """Median us per call of ``fn(set_index)`` replayed from a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (and Triton compilation) off the capture stream, as torch advises
        for i in range(3 * sets):
            fn(i % sets)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(CALLS_PER_GRAPH):
            fn(i % sets)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (replays * CALLS_PER_GRAPH))
    del graph
    return statistics.median(times)


def time_eager(fn: Callable[[int], torch.Tensor], sets: int, calls: int, repeats: int) -> float:
    """Median us per call launched eagerly (host launch overhead included)."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(calls):
            fn(i % sets)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 2 << 30, reps: int = 10) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting read + write."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        dst.copy_(src)
    end.record()
    end.synchronize()
    return 2 * nbytes * reps / (start.elapsed_time(end) * 1e-3)


def set_count(context: int, batch: int) -> int:
    """Input sets to rotate over: enough that sparse calls (selected K/V + page-16 summary) overflow L2 4x."""
    sparse_bytes = batch * KV_HEADS * HEAD_DIM * DTYPE.itemsize * (2 * SELECTED_TOKENS + 2 * context // 16)
    count = min(8, max(2, -(-4 * L2_BYTES // sparse_bytes)))
    return next(c for c in (count, 6, 4, 3, 2) if c <= count and CALLS_PER_GRAPH % c == 0)


def make_sets(context: int, batch: int, sets: int) -> list[dict[str, torch.Tensor]]:
    """Input sets: q (B, H, 1, D); k, v (B, Hkv, cap, D) capacity buffers; pos (B, Hkv, cap), -1 past context."""
    cap = context + HEADROOM
    out = []
    for _ in range(sets):
        pos = torch.arange(cap, device="cuda").expand(batch, KV_HEADS, cap).contiguous()
        pos[..., context:] = -1
        out.append(
            dict(
                q=torch.randn(batch, HEADS, 1, HEAD_DIM, device="cuda", dtype=DTYPE),
                k=torch.randn(batch, KV_HEADS, cap, HEAD_DIM, device="cuda", dtype=DTYPE),
                v=torch.randn(batch, KV_HEADS, cap, HEAD_DIM, device="cuda", dtype=DTYPE),
                pos=pos,
                n=torch.tensor([context], device="cuda", dtype=torch.int32),
                out=torch.empty(batch, HEADS, 1, HEAD_DIM, device="cuda", dtype=DTYPE),
            )
        )
    return out


def with_pdl(fn: Callable[[int], torch.Tensor]) -> Callable[[int], torch.Tensor]:
    """``fn`` with programmatic dependent launch on for attnkit's kernels (set while it runs and is captured)."""
    from attnkit.kernels import triton_decode

    def run(i: int) -> torch.Tensor:
        triton_decode.PDL = True
        try:
            return fn(i)
        finally:
            triton_decode.PDL = None

    return run


def methods(context: int, sets: list[dict[str, torch.Tensor]]) -> dict[str, tuple[Callable[[int], torch.Tensor], int]]:
    """name -> (fn(set_index), extra bytes read besides K+V: the page summaries)."""
    found: dict[str, tuple[Callable[[int], torch.Tensor], int]] = {}

    def sdpa(i: int) -> torch.Tensor:
        s = sets[i]
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(
                s["q"], s["k"][:, :, :context], s["v"][:, :, :context], enable_gqa=True
            )

    def dense(i: int) -> torch.Tensor:
        s = sets[i]
        return kernels.decode_attention(s["q"], s["k"], s["v"], s["pos"], s["n"], out=s["out"])

    found["sdpa_flash"] = (sdpa, 0)
    found["attnkit_dense"] = (dense, 0)
    found["attnkit_dense_pdl"] = (with_pdl(dense), 0)
    selects: dict[int, tuple[Callable[[dict[str, torch.Tensor]], torch.Tensor], int, int]] = {}
    for page in (16, 64):
        for s in sets:  # built once, as a decode loop would keep them up to date with update_page_summary
            s[f"summary{page}"] = kernels.page_summaries(s["k"], s["pos"], page)
            s[f"pages{page}"] = torch.tensor([-(-context // page)], device="cuda")
        summary_bytes = sets[0][f"summary{page}"].numel() * sets[0][f"summary{page}"].element_size()

        def select(s: dict[str, torch.Tensor], page: int = page) -> torch.Tensor:
            scores = kernels.quest_scores(s["q"], s[f"summary{page}"])
            return kernels.topk_pages(scores, SELECTED_TOKENS // page, s[f"pages{page}"], force_last=True)

        def sparse(i: int, page: int = page, select: Callable = select) -> torch.Tensor:
            s = sets[i]
            idx = select(s)
            return kernels.sparse_decode_attention(s["q"], s["k"], s["v"], s["pos"], idx, page, out=s["out"])

        def quest(i: int, page: int = page) -> torch.Tensor:
            s = sets[i]
            return kernels.quest_attention(s["q"], s["k"], s["v"], s["pos"], s[f"summary{page}"],
                                           SELECTED_TOKENS // page, s[f"pages{page}"], page, out=s["out"])

        found[f"attnkit_sparse_p{page}"] = (sparse, summary_bytes)
        found[f"attnkit_quest_p{page}"] = (quest, summary_bytes)
        found[f"attnkit_quest_p{page}_pdl"] = (with_pdl(quest), summary_bytes)
        selects[page] = (select, SELECTED_TOKENS // page, summary_bytes)
        if page == 16:

            def gather(i: int, select: Callable = select) -> torch.Tensor:
                s = sets[i]
                slots, _ = selected_slots(select(s), 16, s["k"].shape[2])  # every selected slot is valid here
                rows = slots.unsqueeze(-1).expand(*slots.shape, HEAD_DIM)
                k_sel, v_sel = s["k"].gather(2, rows), s["v"].gather(2, rows)
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(s["q"], k_sel, v_sel, enable_gqa=True)

            found["gather_sdpa_p16"] = (gather, summary_bytes)
    found.update(flex_methods(context, sets, selects))
    return found


# FlexAttention entries: masks, the reference check, and the entries themselves (see the module docstring).


@functools.cache
def compiled_flex() -> Callable[..., torch.Tensor]:
    """``torch.compile(flex_attention, dynamic=False, fullgraph=True)``, made once; the first call of each shape
    compiles. ``fullgraph``: a graph break inside flex_attention would otherwise run its unfused eager path (every
    score materialised, the BlockMask's block lists ignored) without a word."""
    from torch.nn.attention.flex_attention import flex_attention

    # One graph per context and entry: 3 contexts x 3 entries pass dynamo's default of 8 graphs per function, after
    # which it would silently run flex_attention's unfused eager path.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(flex_attention, dynamic=False, fullgraph=True)


def length_mask(length: torch.Tensor) -> Callable[..., torch.Tensor]:
    """FlexAttention ``mask_mod`` keeping slots below ``length[0]``, a 1-element device tensor the kernel reads."""

    def below_length(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        return kv_idx < length[0]

    return below_length


def flex_dense_mask(length: torch.Tensor, batch: int, cap: int, mask_mod: Callable[..., torch.Tensor]):
    """BlockMask (B, 1, 1, cap) for one decode query over the first ``length`` slots of a capacity buffer.

    ``kv_indices`` (B, 1, 1, ceil(cap / 128)) lists every KV block in order; ``kv_num_blocks`` (B, 1, 1) holds
    ceil(length / 128), written on the device by :func:`refresh_dense_blocks`; ``mask_mod`` cuts the last block.
    One head row: with GQA the decode kernel takes no other (H == Hkv would fall back to the prefill kernel).
    """
    from torch.nn.attention.flex_attention import BlockMask

    blocks = -(-cap // FLEX_DENSE_BLOCK)
    kv_indices = torch.arange(blocks, device=length.device, dtype=torch.int32).expand(batch, 1, 1, blocks).contiguous()
    kv_num_blocks = torch.zeros(batch, 1, 1, device=length.device, dtype=torch.int32)
    mask = BlockMask.from_kv_blocks(kv_num_blocks, kv_indices, BLOCK_SIZE=(FLEX_Q_BLOCK, FLEX_DENSE_BLOCK),
                                    mask_mod=mask_mod, seq_lengths=(1, cap), compute_q_blocks=False)
    refresh_dense_blocks(mask, length)
    return mask


def refresh_dense_blocks(mask, length: torch.Tensor) -> None:
    """``kv_num_blocks`` = ceil(length / block) in place, on the device (a decode loop does it once per step)."""
    block = mask.BLOCK_SIZE[1]
    mask.kv_num_blocks.copy_(torch.div(length + block - 1, block, rounding_mode="floor").view(1, 1, 1))


def flex_page_mask(length: torch.Tensor, rows: int, cap: int, page: int, take: int,
                   mask_mod: Callable[..., torch.Tensor]):
    """BlockMask (rows, 1, 1, cap), rows = B * Hkv (one per KV head), KV blocks of one page.

    ``kv_indices`` (rows, 1, 1, ceil(cap / page)) has BlockMask's full width (FlexAttention's CPU kernel asserts it);
    its first ``take`` entries are overwritten by :func:`write_pages` and are all the decode kernel reads
    (``kv_num_blocks`` = ``take``). ``mask_mod`` drops slots at or past ``length``.
    """
    from torch.nn.attention.flex_attention import BlockMask

    pages = -(-cap // page)
    kv_indices = torch.zeros(rows, 1, 1, pages, device=length.device, dtype=torch.int32)
    kv_num_blocks = torch.full((rows, 1, 1), take, device=length.device, dtype=torch.int32)
    return BlockMask.from_kv_blocks(kv_num_blocks, kv_indices, BLOCK_SIZE=(FLEX_Q_BLOCK, page), mask_mod=mask_mod,
                                    seq_lengths=(1, cap), compute_q_blocks=False)


def write_pages(mask, idx: torch.Tensor, spare: int | None) -> None:
    """Selected page ids idx (B, Hkv, K) into ``mask.kv_indices[..., :K]`` (int32), in place, no host sync.

    Unused entries (-1) become page ``spare``, one wholly at or past the length (masked, so it adds nothing; repeats
    are harmless). ``spare=None``: the caller knows there are none, which saves a kernel.
    """
    rows, take = idx.shape[0] * idx.shape[1], idx.shape[2]
    src = idx if spare is None else torch.where(idx >= 0, idx, spare)
    mask.kv_indices[..., :take].copy_(src.reshape(rows, 1, 1, take))


def by_kv_head(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views with each KV head as a batch row: q (B, H, 1, D) -> (B * Hkv, G, 1, D), the group's query heads as
    FlexAttention's heads; k, v (B, Hkv, cap, D) -> (B * Hkv, 1, cap, D). Head h = hkv * G + g, as expand_kv."""
    batch, heads, one, dim = q.shape
    kv_heads, cap = k.shape[1], k.shape[2]
    rows = batch * kv_heads
    return (q.view(rows, heads // kv_heads, one, dim), k.view(rows, 1, cap, dim), v.view(rows, 1, cap, dim))


def page_mask(idx: torch.Tensor, page: int, cap: int, length: torch.Tensor) -> torch.Tensor:
    """(B, Hkv, K) selected page ids (-1 unused) -> (B, Hkv, 1, cap) bool: slot in a selected page and below length."""
    slots, in_range = selected_slots(idx, page, cap)
    hits = torch.zeros(*idx.shape[:2], cap, device=idx.device, dtype=torch.int32)
    hits.scatter_add_(2, slots, in_range.int())  # add, not assign: unused entries alias slot cap - 1
    return ((hits > 0) & (torch.arange(cap, device=idx.device) < length)).unsqueeze(2)


def reference_by_kv_head(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """:func:`attnkit.reference.dense_attention` (float32) one KV head at a time: q (B, H, 1, D), k, v (B, Hkv, cap,
    D), mask (B or 1, Hkv or 1, 1, cap) -> (B, H, 1, D). All heads at once would copy K/V to float32 per query head
    (~17 GB at 512K)."""
    kv_heads = k.shape[1]
    group = q.shape[1] // kv_heads
    outs = []
    for h in range(kv_heads):
        m = mask[:, h : h + 1] if mask.shape[1] > 1 else mask
        outs.append(dense_attention(q[:, h * group : (h + 1) * group], k[:, h : h + 1], v[:, h : h + 1], m)[0])
    return torch.cat(outs, dim=1)


def flex_options(device: torch.device) -> dict[str, str] | None:
    """The entries' ``kernel_options``: :data:`FLEX_OPTIONS` on CUDA (emptied once the installed torch fails on it),
    none elsewhere (FlexAttention's CPU kernel is only the tests' way to run the same masks)."""
    return FLEX_OPTIONS if device.type == "cuda" else None


def _why(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"


def flex_methods(
    context: int,
    sets: list[dict[str, torch.Tensor]],
    selects: dict[int, tuple[Callable[[dict[str, torch.Tensor]], torch.Tensor], int, int]],
) -> dict[str, tuple[Callable[[int], torch.Tensor], int]]:
    """FlexAttention's decode kernel, dense and over each Quest selection; name -> (fn(set_index), extra bytes).

    selects : page size -> (select(set) -> (B, Hkv, K) page ids, K, page-summary bytes), the sparse entries' own.
    Each entry is compiled, checked on set 0 against the float32 reference under its mask and (on CUDA) captured in
    a CUDA graph here; one that fails is left out with one printed line.
    """
    found: dict[str, tuple[Callable[[int], torch.Tensor], int]] = {}
    s0 = sets[0]
    batch, kv_heads, cap = s0["k"].shape[:3]
    length = s0["n"]  # the same length in every set: one tensor, one mask_mod, one compiled graph per entry
    options = flex_options(s0["q"].device)
    try:
        flex = compiled_flex()
        below = length_mask(length)
    except Exception as exc:
        print(f"flex_*: skipped, {_why(exc)}")
        return found

    def build_dense() -> tuple[Callable[[int], torch.Tensor], int, torch.Tensor]:
        mask = flex_dense_mask(length, batch, cap, below)

        def flex_dense(i: int) -> torch.Tensor:
            s = sets[i]
            with torch.no_grad():
                return flex(s["q"], s["k"], s["v"], block_mask=mask, enable_gqa=True, kernel_options=options)

        ref_mask = (torch.arange(cap, device=length.device) < length).view(1, 1, 1, cap)
        return flex_dense, 0, ref_mask

    def build_sparse(page: int) -> tuple[Callable[[int], torch.Tensor], int, torch.Tensor]:
        select, take, summary_bytes = selects[page]
        mask = flex_page_mask(length, batch * kv_heads, cap, page, take, below)
        pages = -(-cap // page)
        spare = None
        if -(-context // page) < take:  # fewer pages hold keys than are selected: topk_pages pads with -1
            spare = pages - 1
            if spare * page < context:
                raise ValueError(f"no page past the context to stand for unused entries (headroom < {page})")

        def flex_sparse(i: int) -> torch.Tensor:
            s = sets[i]
            write_pages(mask, select(s), spare)
            q, k, v = by_kv_head(s["q"], s["k"], s["v"])
            with torch.no_grad():
                out = flex(q, k, v, block_mask=mask, enable_gqa=True, kernel_options=options)
            return out.reshape(s["q"].shape)  # (B * Hkv, G, 1, D) -> (B, H, 1, D)

        return flex_sparse, summary_bytes, page_mask(select(s0), page, cap, length)

    builds = [("flex_dense", build_dense)]
    builds += [(f"flex_sparse_p{page}", functools.partial(build_sparse, page)) for page in sorted(selects)]
    for name, build in builds:
        try:
            fn, extra, ref_mask = build()
            start = time.perf_counter()
            try:
                out = fn(0).float()  # compiles
            except Exception as exc:
                if not options:
                    raise
                # Some torch releases document BACKEND but fail on it: say so, and let AUTO choose from here on
                # (for these shapes its rule picks flex_decoding too).
                print(f"{name}: BACKEND={options['BACKEND']!r} failed ({_why(exc)}); AUTO from now on")
                FLEX_OPTIONS.clear()
                options = None
                out = fn(0).float()
            compile_s = time.perf_counter() - start
            ref = reference_by_kv_head(s0["q"], s0["k"], s0["v"], ref_mask)
            err, top = (out - ref).abs().max().item(), ref.abs().max().item()
            print(f"{name}: |out - dense_attention fp32 under its mask| max = {err:.2e} (|ref| max {top:.2e}; "
                  f"first call, compile included, {compile_s:.1f} s)")
            if not err <= FLEX_MAX_ERR * top:
                print(f"{name}: skipped, error above {FLEX_MAX_ERR} of the reference's largest output")
                continue
            if s0["q"].is_cuda:
                time_graph(fn, len(sets), 1, 1)  # warm-up and capture as the timing does: fails here, not there
        except Exception as exc:
            print(f"{name}: skipped, {_why(exc)}")
            continue
        found[name] = (fn, extra)
    return found

def breakdown(context: int, sets: list[dict[str, torch.Tensor]]) -> list[tuple[str, Callable[[int], torch.Tensor], int]]:
    """(name, fn(set_index), bytes it must read) for the pieces of the sparse path; see the module docstring."""
    from attnkit.kernels import triton_select

    rows: list[tuple[str, Callable[[int], torch.Tensor], int]] = []
    for page in (16, 32, 64):
        take = SELECTED_TOKENS // page
        for s in sets:
            if f"summary{page}" not in s:
                s[f"summary{page}"] = kernels.page_summaries(s["k"], s["pos"], page)
                s[f"pages{page}"] = torch.tensor([-(-context // page)], device="cuda")
            s[f"scores{page}"] = triton_select.quest_scores_masked(s["q"], s[f"summary{page}"], s[f"pages{page}"])
            s[f"idx{page}"] = triton_select.topk_from_masked(s[f"scores{page}"], take)
        s0 = sets[0]
        summary_bytes = s0[f"summary{page}"].numel() * s0[f"summary{page}"].element_size()
        score_bytes = s0[f"scores{page}"].numel() * 4
        kv_sparse = 2 * s0["q"].shape[0] * KV_HEADS * SELECTED_TOKENS * HEAD_DIM * DTYPE.itemsize

        def quest_torch(i: int, page: int = page) -> torch.Tensor:
            return kernels.quest_scores(sets[i]["q"], sets[i][f"summary{page}"])

        def quest_fused(i: int, page: int = page) -> torch.Tensor:
            s = sets[i]
            return triton_select.quest_scores_masked(s["q"], s[f"summary{page}"], s[f"pages{page}"],
                                                     out=s[f"scores{page}"])

        def topk(i: int, page: int = page, take: int = take) -> torch.Tensor:
            return torch.topk(sets[i][f"scores{page}"], take, dim=-1, sorted=False).indices

        def topk_bisect(i: int, page: int = page, take: int = take) -> torch.Tensor:
            return triton_select.topk_bisect(sets[i][f"scores{page}"], take)

        def sparse_kernel(i: int, page: int = page) -> torch.Tensor:
            s = sets[i]
            return kernels.sparse_decode_attention(s["q"], s["k"], s["v"], s["pos"], s[f"idx{page}"], page,
                                                   out=s["out"])

        def sparse_fused(i: int, page: int = page, take: int = take) -> torch.Tensor:
            s = sets[i]
            idx = kernels.select_pages(s["q"], s[f"summary{page}"], take, s[f"pages{page}"], force_last=True)
            return kernels.sparse_decode_attention(s["q"], s["k"], s["v"], s["pos"], idx, page, out=s["out"])

        rows += [
            (f"quest_torch_p{page}", quest_torch, summary_bytes),
            (f"quest_fused_p{page}", quest_fused, summary_bytes),
            (f"topk_p{page}", topk, score_bytes),
            (f"topk_bisect_p{page}", topk_bisect, score_bytes),
            (f"sparse_kernel_p{page}", sparse_kernel, kv_sparse),
            (f"sparse_fused_p{page}", sparse_fused, kv_sparse + summary_bytes),
        ]
    # TokenSelect's scoring (every key of the context) and soft votes: the kernel's tile and pipeline depth
    s0 = sets[0]
    batch = s0["q"].shape[0]
    hi = torch.full((batch, 1), context - 512, device="cuda")
    ts_bytes = batch * KV_HEADS * context * HEAD_DIM * DTYPE.itemsize + 2 * batch * HEADS * context * 4
    for block, stages in ((64, 2), (128, 2), (64, 3), (128, 3)):

        def votes(i: int, block: int = block, stages: int = stages) -> torch.Tensor:
            s = sets[i]
            return triton_select.tokenselect_votes(s["q"], s["k"], s["pos"], 128, hi, context, block=block, stages=stages)

        rows.append((f"ts_votes_b{block}_s{stages}", votes, ts_bytes))
    every = torch.ones(batch, dtype=torch.bool, device="cuda")

    def reused(i: int) -> torch.Tensor:  # a Selection Cache hit on every row: the scoring kernels exit at once
        s = sets[i]
        return triton_select.tokenselect_votes(s["q"], s["k"], s["pos"], 128, hi, context, skip=every)

    rows.append(("ts_votes_all_rows_reused", reused, 0))
    return rows


def check_selection(sets: list[dict[str, torch.Tensor]], page: int) -> float:
    """Fraction of select_pages' picks that the torch path (quest_scores + topk_pages) also picks."""
    s = sets[0]
    take = SELECTED_TOKENS // page
    fused = kernels.select_pages(s["q"], s[f"summary{page}"], take, s[f"pages{page}"])
    ref = kernels.topk_pages(kernels.quest_scores(s["q"], s[f"summary{page}"]), take, s[f"pages{page}"])
    hit = (fused.unsqueeze(-1) == ref.unsqueeze(-2)).any(-1) & (fused >= 0)
    return hit.sum().item() / max(1, (ref >= 0).sum().item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="32768,131072,524288", help="comma-separated context lengths")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--replays", type=int, default=8, help="graph replays per repeat (x24 calls each)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-breakdown", action="store_true", help="skip the sparse-path breakdown rows")
    parser.add_argument("--out", type=Path, default=None, help="write the results here as JSON")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "GPU benchmark"
    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"device: {torch.cuda.get_device_name()}, kernels backend: {kernels.backend('cuda')}, "
          f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")
    rows = []
    for context in [int(c) for c in args.contexts.split(",")]:
        sets = make_sets(context, args.batch, set_count(context, args.batch))
        print(f"\ncontext {context} ({len(sets)} input sets)")
        found = methods(context, sets)  # prints the FlexAttention entries' checks
        # A sanity check worth its microseconds on a first run: the dense kernel against SDPA flash.
        ref = found["sdpa_flash"][0](0).float()
        err = (found["attnkit_dense"][0](0).float() - ref).abs().max().item()
        print(f"|attnkit_dense - sdpa_flash| max = {err:.2e}")
        kv_dense = 2 * args.batch * KV_HEADS * context * HEAD_DIM * DTYPE.itemsize
        kv_sparse = 2 * args.batch * KV_HEADS * SELECTED_TOKENS * HEAD_DIM * DTYPE.itemsize
        base = None
        print("| method | graph us | eager us | KV TB/s | floor us | vs sdpa_flash |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for name, (fn, extra) in found.items():
            graph_us = time_graph(fn, len(sets), args.replays, args.repeats)
            eager_us = time_eager(fn, len(sets), 50, args.repeats)
            kv = kv_dense if name in DENSE_METHODS else kv_sparse
            floor_us = (kv + extra) / bw * 1e6
            base = graph_us if base is None else base
            row = dict(context=context, batch=args.batch, method=name, graph_us=graph_us, eager_us=eager_us,
                       kv_bytes=kv, extra_bytes=extra, kv_tbps=kv / graph_us / 1e6, floor_us=floor_us,
                       speedup_vs_sdpa_flash=base / graph_us)
            rows.append(row)
            print(f"| {name} | {graph_us:.1f} | {eager_us:.1f} | {row['kv_tbps']:.2f} | {floor_us:.1f} | "
                  f"{row['speedup_vs_sdpa_flash']:.2f}x |", flush=True)
        if not args.no_breakdown:
            pieces = breakdown(context, sets)
            overlap = ", ".join(f"p{p} {check_selection(sets, p):.3f}" for p in (16, 32, 64))
            print(f"\nbreakdown, context {context}; select_pages picks shared with quest_scores + topk_pages: {overlap}")
            print("| piece | graph us | bytes read MB | TB/s | floor us | vs sdpa_flash |")
            print("| --- | ---: | ---: | ---: | ---: | ---: |")
            for name, fn, nbytes in pieces:
                graph_us = time_graph(fn, len(sets), args.replays, args.repeats)
                floor_us = nbytes / bw * 1e6
                row = dict(context=context, batch=args.batch, method=name, graph_us=graph_us, eager_us=None,
                           kv_bytes=None, extra_bytes=nbytes, kv_tbps=None, floor_us=floor_us,
                           speedup_vs_sdpa_flash=base / graph_us, breakdown=True)
                rows.append(row)
                print(f"| {name} | {graph_us:.1f} | {nbytes / 1e6:.1f} | {nbytes / graph_us / 1e6:.2f} | "
                      f"{floor_us:.1f} | {row['speedup_vs_sdpa_flash']:.2f}x |", flush=True)
        del sets, found
        torch.cuda.empty_cache()
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, copy_bw_bytes_per_s=bw,
                    heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, dtype=str(DTYPE))
        args.out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
