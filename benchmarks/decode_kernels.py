"""Per-layer decode attention microbenchmark: attnkit's Triton kernels against SDPA flash, in one run.

Llama-3.1-8B attention shape (32 query / 8 KV heads, head_dim 128, bf16), one decode query per row. For each
context length it times:

* ``sdpa_flash``: SDPA restricted to the flash backend over exact-length K/V (a prefix view of the buffer).
* ``attnkit_dense``: :func:`attnkit.kernels.decode_attention` over a capacity buffer (context + 2048 slots),
  ``n`` read from a device tensor.
* ``attnkit_sparse_p16`` / ``_p64``: 2048 selected tokens (128 pages of 16 / 32 pages of 64), selection
  included: ``quest_scores`` + ``topk_pages`` + the sparse kernel, every call.
* ``gather_sdpa_p16``: the naive baseline, the same Quest selection, then a torch gather of the selected
  rows and SDPA flash over the copy.

Then, unless ``--no-breakdown``, a breakdown of the sparse path for pages of 16, 32 and 64 (graph only, no eager
timing; "bytes" is what each piece must read):

* ``quest_torch_pP``: :func:`attnkit.kernels.quest_scores` (the torch scoring, ~10 small kernels with the masks
  of ``topk_pages``) -- here the scores alone.
* ``quest_fused_pP``: :func:`attnkit.kernels.triton_select.quest_scores_masked`, scores and masks in one kernel.
* ``topk_pP``: ``torch.topk(sorted=False)`` alone on precomputed fp32 scores (2048 / P of them per KV head);
  ``topk_bisect_pP``: attnkit's one-program-per-row bisection top-k on the same scores.
* ``sparse_kernel_pP``: :func:`attnkit.kernels.sparse_decode_attention` alone on a precomputed selection.
* ``sparse_fused_pP``: the whole step with :func:`attnkit.kernels.select_pages` + the sparse kernel.

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
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from attnkit import kernels
from attnkit.kernels.torch_ref import selected_slots

HEADS, KV_HEADS, HEAD_DIM, DTYPE = 32, 8, 128, torch.bfloat16
SELECTED_TOKENS = 2048
CALLS_PER_GRAPH = 24  # cycling over the input sets (24 is a multiple of every set count 2..8 but 5, 7)
L2_BYTES = 60 << 20  # H200; input sets are rotated so that their working sets together exceed it 4x
HEADROOM = 2048  # free slots past the context in the capacity buffer


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

        found[f"attnkit_sparse_p{page}"] = (sparse, summary_bytes)
        if page == 16:

            def gather(i: int, select: Callable = select) -> torch.Tensor:
                s = sets[i]
                slots, _ = selected_slots(select(s), 16, s["k"].shape[2])  # every selected slot is valid here
                rows = slots.unsqueeze(-1).expand(*slots.shape, HEAD_DIM)
                k_sel, v_sel = s["k"].gather(2, rows), s["v"].gather(2, rows)
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    return F.scaled_dot_product_attention(s["q"], k_sel, v_sel, enable_gqa=True)

            found["gather_sdpa_p16"] = (gather, summary_bytes)
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
        found = methods(context, sets)
        # A sanity check worth its microseconds on a first run: the dense kernel against SDPA flash.
        ref = found["sdpa_flash"][0](0).float()
        err = (found["attnkit_dense"][0](0).float() - ref).abs().max().item()
        print(f"\ncontext {context} ({len(sets)} input sets): |attnkit_dense - sdpa_flash| max = {err:.2e}")
        kv_dense = 2 * args.batch * KV_HEADS * context * HEAD_DIM * DTYPE.itemsize
        kv_sparse = 2 * args.batch * KV_HEADS * SELECTED_TOKENS * HEAD_DIM * DTYPE.itemsize
        base = None
        print("| method | graph us | eager us | KV TB/s | floor us | vs sdpa_flash |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for name, (fn, extra) in found.items():
            graph_us = time_graph(fn, len(sets), args.replays, args.repeats)
            eager_us = time_eager(fn, len(sets), 50, args.repeats)
            kv = kv_dense if name in ("sdpa_flash", "attnkit_dense") else kv_sparse
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
