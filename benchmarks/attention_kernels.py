"""Prefill attention kernels x masks, in the style of the Long-Context Attention Benchmark (LongCA-bench).

Masks: full, causal, sliding window, causal document, prefix-LM, share-question, block-causal, top-k block
sparse, and the sparse-prefill methods' own masks (token_sparse: per-head token sets; dhsa: per query block
token lists shared by heads; rectified: per-head critical blocks; tca: per KV head token lists). Kernels: SDPA
flash / efficient / cuDNN (the masks each takes: flash and cuDNN only full and causal; efficient any mask as a
dense bool tensor while that fits), FlexAttention (compiled, any mask through its mask_mod and block mask), and
attnkit's kernels for the method masks (``compact_attention``, ``block_gather_attention``,
``flex_block_attention``). Shapes: Llama-3.1-8B heads (32 query / 8 KV, head_dim 128), batch 1, bf16.

Per (mask, kernel, length): median forward time over ``--repeats`` timed calls (CUDA events), backward + forward
where the kernel has one, TFLOP/s counted as 4 x mask area x query heads x head_dim (forward; x 2.5 for the
backward pass), mask density, and peak memory above the inputs. Rows go to a CSV as they are measured; a rerun
skips the rows the CSV holds (resume), and ``--seconds`` bounds a run. ``--plot`` draws forward TFLOP/s per mask
and kernel at the longest length into an SVG.

    python benchmarks/attention_kernels.py --lengths 8192,32768,131072 --out results/attention_kernels.csv

Context-parallel prefill (``--cp ring,ulysses,torch_ring --gpus N``): causal attention of one sequence split over
N GPUs of the host (``attnkit.parallel``: our P2P ring and Ulysses all-to-all, torch's ``context_parallel`` ring),
Llama-3.1-8B heads, forward only. Started without torchrun it re-launches itself under ``torch.distributed.run``
with N processes (NCCL, ``NCCL_NVLS_ENABLE=0``; gloo on CPU). Rank 0 first times one-GPU SDPA flash at each
length (the other ranks wait), then every rank runs each strategy on its shard (zigzag layout for the rings,
contiguous for Ulysses). Per row: the slowest rank's median ms, TFLOP/s per GPU (4 x n(n+1)/2 x H x D / N /
time) and scaling efficiency t(1 GPU) / (N x t(N GPUs)); columns ``gpus``, ``strategy`` and ``efficiency``
(older CSVs get them added, their rows counted as one GPU).

    python benchmarks/attention_kernels.py --cp ring,ulysses,torch_ring --gpus 2 --lengths 32768,131072,524288 \
        --out results/attention_kernels.csv
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from attnkit.kernels.sparse_prefill import block_gather_attention, compact_attention, flex_block_attention
from attnkit.parallel import (STRATEGIES, SeqLayout, ring_attention, torch_ring_attention, torch_ring_context,
                              ulysses_attention)
from attnkit.parallel.launch import init_distributed, relaunch, under_torchrun
from attnkit.parallel.prefill import DEFAULT_LAYOUT

FIELDS = ["mask", "kernel", "length", "pass", "ms", "tflops", "density", "peak_mib", "note", "gpus", "strategy",
          "efficiency"]
BLOCK = 128


def mask_mods(n: int, device, seed: int = 0) -> dict[str, tuple]:
    """name -> (mask_mod(b, h, q, k) for FlexAttention, kind for SDPA: "full", "causal" or None, per-head?)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    nb = -(-n // BLOCK)
    docs = torch.zeros(n, dtype=torch.long)  # causal document: documents of 1-16K tokens
    at, d = 0, 0
    while at < n:
        size = int(torch.randint(1024, 16384, (1,), generator=g))
        docs[at : at + size] = d
        at, d = at + size, d + 1
    docs = docs.to(device)
    prefix = n // 4
    q_end = n // 8  # share-question: a question, then 4 answers that each see the question and themselves
    answer = torch.clamp((torch.arange(n) - q_end) // max(1, (n - q_end) // 4), min=-1).to(device)
    density = 0.125  # top-k block sparse: 1/8 of the causal key blocks per query block, plus the diagonal
    topk = (torch.rand(nb, nb, generator=g) < density).tril().to(device) | torch.eye(nb, dtype=torch.bool, device=device)

    def full(b, h, q, k):
        return (q >= 0) & (k >= 0)

    def causal(b, h, q, k):
        return k <= q

    def sliding(b, h, q, k):
        return (k <= q) & (q - k < 4096)

    def document(b, h, q, k):
        return (k <= q) & (docs[q] == docs[k])

    def prefix_lm(b, h, q, k):
        return (k <= q) | (k < prefix)

    def share_question(b, h, q, k):
        return (k <= q) & ((k < q_end) | (answer[q] == answer[k]))

    def block_causal(b, h, q, k):
        return (k // 2048) <= (q // 2048)

    def topk_blocks(b, h, q, k):
        return (k <= q) & topk[q // BLOCK, k // BLOCK]

    return {"full": (full, "full"), "causal": (causal, "causal"), "sliding_window": (sliding, None),
            "causal_document": (document, None), "prefix_lm": (prefix_lm, None),
            "share_question": (share_question, None), "block_causal": (block_causal, None),
            "topk_block_sparse": (topk_blocks, None)}


def timed(fn, repeats: int, before=None) -> float:
    """Median milliseconds of ``fn`` over ``repeats`` calls after one warm-up (CUDA events; wall clock on CPU);
    ``before()`` runs ahead of each timed call (a barrier, so that every rank starts together)."""
    fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if before is not None:
            before()
        if torch.cuda.is_available():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t))
    return statistics.median(times)


def area(mask_mod, n: int, device, rows: int = 2048) -> int:
    """Exact number of visible (query, key) pairs, evaluated in row blocks."""
    total = 0
    k = torch.arange(n, device=device).view(1, -1)
    for s in range(0, n, rows):
        q = torch.arange(s, min(n, s + rows), device=device).view(-1, 1)
        total += int(mask_mod(0, 0, q, k).sum())
    return total


def method_inputs(n: int, h: int, hkv: int, device, seed: int = 0) -> dict[str, tuple]:
    """The method masks as their kernels take them, at settings like the papers' (random choices of the shapes
    the methods produce): token_sparse keeps half of the tokens per head plus a 128 window; dhsa reads 2,048
    tokens per query block of 128 (the 128 newest and random others); rectified keeps 20% of the key blocks per
    head (plus the sink and diagonal); tca 1,024 tokens per KV head and query block plus a 4,096 window."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    nb = -(-n // BLOCK)
    keep = n // 2
    sets = torch.stack([torch.randperm(n - 128, generator=g)[:keep].sort().values for _ in range(h)])
    sets = torch.cat([sets, torch.arange(n - 128, n).expand(h, 128)], dim=-1)[None].to(device)
    pos = torch.arange(n, device=device)[None]
    qidx = torch.arange(nb * BLOCK, device=device).view(1, nb, BLOCK)
    qidx = torch.where(qidx < n, qidx, -1)

    def lists(per: int, heads: int, window: int) -> torch.Tensor:
        out = torch.full((1, heads, nb, per + window), -1, dtype=torch.long)
        for i in range(nb):
            end = min(n, (i + 1) * BLOCK)
            recent = torch.arange(max(0, end - window), end)
            old = end - len(recent)
            pick = torch.randperm(old, generator=g)[: min(per, old)] if old else torch.zeros(0, dtype=torch.long)
            for hh in range(heads):
                row = torch.cat([pick if hh == 0 else torch.randperm(old, generator=g)[: min(per, old)], recent])
                row = row.sort().values
                out[0, hh, i, -len(row):] = row
        return out.to(device)

    crit = (torch.rand(1, h, nb, nb, generator=g) < 0.2).tril().to(device)
    crit = crit | torch.eye(nb, dtype=torch.bool, device=device) | (torch.arange(nb, device=device) == 0)
    return {"token_sparse": ("compact", sets, pos, keep + 128),
            "dhsa": ("gather", qidx, lists(2048 - 128, 1, 128), pos),
            "rectified": ("flex_blocks", crit),
            "tca": ("gather", qidx, lists(1024, hkv, 4096), pos)}


def lists_to_tokens(lists: torch.Tensor, n: int) -> torch.Tensor:
    """Per query block token lists (1, Hs, nqb, k), -1 padded -> (1, Hs, nqb, n) bool: FlexAttention's input."""
    tokens = torch.zeros(*lists.shape[:3], n + 1, dtype=torch.bool, device=lists.device)
    tokens.scatter_(-1, torch.where(lists >= 0, lists, n), True)
    return tokens[..., :n]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="8192,16384,32768,65536,131072")
    ap.add_argument("--masks", default="")
    ap.add_argument("--kernels", default="sdpa_flash,sdpa_efficient,sdpa_cudnn,flex,attnkit")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--no-backward", action="store_true")
    ap.add_argument("--dense-mask-limit", type=int, default=32768, help="largest length given a dense bool mask")
    ap.add_argument("--seconds", type=float, default=0, help="stop starting new rows after this long (0: none)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=Path("results/attention_kernels.csv"))
    ap.add_argument("--plot", type=Path, help="write an SVG of forward TFLOP/s at the longest length and exit")
    ap.add_argument("--cp", default="", help="context-parallel strategies: ring,ulysses,torch_ring (see above)")
    ap.add_argument("--gpus", type=int, default=0, help="processes (GPUs) for --cp (default: all visible, or 2)")
    args = ap.parse_args(argv)
    if args.plot:
        return plot(args.out, args.plot)
    if args.cp:
        if not under_torchrun():
            gpus = args.gpus or (torch.cuda.device_count() if args.device == "cuda" else 2) or 2
            return relaunch(gpus, list(sys.argv[1:] if argv is None else argv), script=__file__)
        return cp_main(args)
    t0 = time.time()
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    h, hkv, d = args.heads, args.kv_heads, args.head_dim
    done = done_rows(args.out)
    out, writer = open_rows(args.out)
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False) if dev.type == "cuda" else flex_attention
    # one compile per (mask, length, pass): past dynamo's default of 8 it would silently run the unfused
    # flex_attention (the whole score matrix: 26 GB at 8K, measured) and time that instead
    torch._dynamo.config.recompile_limit = 1024
    kernels = args.kernels.split(",")
    for n in [int(x) for x in args.lengths.split(",")]:
        q = torch.randn(1, h, n, d, device=dev, dtype=dtype)
        k = torch.randn(1, hkv, n, d, device=dev, dtype=dtype)
        v = torch.randn(1, hkv, n, d, device=dev, dtype=dtype)
        mods = mask_mods(n, dev)
        wanted = [m for m in (args.masks.split(",") if args.masks else [*mods, "token_sparse", "dhsa", "rectified",
                                                                          "tca"])]
        for name in wanted:
            if name in mods:
                mod, kind = mods[name]
                mask_area = area(mod, n, dev)
            else:
                mod, kind, mask_area = None, None, None
            for kernel in kernels:
                for pas in (["fwd"] if args.no_backward else ["fwd", "fwd+bwd"]):
                    if (name, kernel, str(n), pas, "1") in done:
                        continue
                    if args.seconds and time.time() - t0 > args.seconds:
                        print("time bound reached", file=sys.stderr)
                        out.close()
                        return 0
                    row = run_one(name, kernel, pas, n, q, k, v, mod, kind, mask_area, mods, flex, create_block_mask,
                                  args, dev)
                    if row is None:
                        continue
                    writer.writerow(row)
                    out.flush()
                    print(",".join(str(row.get(f, "")) for f in FIELDS), flush=True)
        del q, k, v
    out.close()
    return 0


def run_one(name, kernel, pas, n, q, k, v, mod, kind, mask_area, mods, flex, create_block_mask, args, dev):
    """One measured row, or None where the kernel does not take the mask (or this pass)."""
    h, d = q.shape[1], q.shape[-1]
    scale = d**-0.5
    note = ""
    method = mod is None
    if method:
        spec_kind = {"token_sparse": "compact", "rectified": "flex_blocks"}.get(name, "gather")
        # the kernels each method has: token_sparse its compacted attention ("attnkit"), rectified FlexAttention
        # over its critical blocks, DHSA / TCA their token lists both gathered ("attnkit", the CPU / any-layout
        # path) and through FlexAttention over the listed tokens' blocks (their default on CUDA)
        takes = {"compact": ("attnkit",), "flex_blocks": ("flex",), "gather": ("attnkit", "flex")}[spec_kind]
        if kernel not in takes or pas != "fwd":
            return None  # the sparse-prefill kernels are timed forward only (inference)
        spec = method_inputs(n, h, k.shape[1], dev)[name]
        if spec[0] == "compact":
            _, sets, pos, per = spec
            fn = lambda: compact_attention(q, k, v, pos, sets, per, scale)  # noqa: E731
            mask_area = per * (per + 1) / 2  # per head: kept queries causally over kept keys
        elif spec[0] == "gather":
            _, qidx, lists, pos = spec
            mask_area = float((lists >= 0).sum()) * BLOCK / lists.shape[1]  # upper bound: every query reads its list
            note = "area: block lists x block"
            if kernel == "flex":
                tokens = lists_to_tokens(lists, n)
                fn = lambda: flex_block_attention(q, k, v, None, BLOCK, scale, tokens=tokens)  # noqa: E731
            else:
                fn = lambda: block_gather_attention(q, k, v, qidx, lists, pos, pos, scale)  # noqa: E731
        else:
            crit = spec[1]
            fn = lambda: flex_block_attention(q, k, v, crit, BLOCK, scale)  # noqa: E731
            mask_area = float(crit.sum()) * BLOCK * BLOCK / h
            note = "area: critical blocks x block^2"
    else:
        need_grad = pas == "fwd+bwd"
        qq, kk, vv = (t.detach().requires_grad_(need_grad) for t in (q, k, v))
        if kernel in ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient"):
            backend = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
                       "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION}[kernel]
            attn_mask = None
            if kind is None:
                if kernel != "sdpa_efficient" or n > args.dense_mask_limit:
                    return None
                qi = torch.arange(n, device=dev).view(-1, 1)
                attn_mask = mod(0, 0, qi, torch.arange(n, device=dev).view(1, -1))
            # SDPA's masked and cuDNN paths take no grouped heads: repeat K/V (counted in peak memory)
            rep = kernel != "sdpa_flash"
            ke = kk.repeat_interleave(h // kk.shape[1], 1) if rep else kk
            ve = vv.repeat_interleave(h // vv.shape[1], 1) if rep else vv

            def call():
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(qq, ke, ve, attn_mask=attn_mask, scale=scale,
                                                          is_causal=kind == "causal", enable_gqa=not rep)
        elif kernel == "flex":
            t = time.time()
            try:  # compiled on CUDA: the eager builder evaluates the whole (n, n) mask at once (512 GiB at 64K)
                bm = create_block_mask(mod, 1, 1, n, n, device=dev, _compile=dev.type == "cuda")
            except (RuntimeError, torch.OutOfMemoryError) as exc:
                return refused(name, kernel, n, pas, exc)
            note = f"block mask {time.time() - t:.1f}s"

            def call():
                return flex(qq, kk, vv, block_mask=bm, scale=scale, enable_gqa=True)
        else:
            return None

        def fn():
            o = call()
            if need_grad:
                o.sum().backward()
            return o
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    try:
        ms = timed(fn, args.repeats)
    except (RuntimeError, torch.OutOfMemoryError) as exc:  # a kernel that refuses this shape: say so in the row
        return refused(name, kernel, n, pas, exc)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if dev.type == "cuda" else float("nan")
    flops = 4 * mask_area * h * d * (3.5 if pas == "fwd+bwd" else 1.0)
    row = {"mask": name, "kernel": kernel, "length": n, "pass": pas, "ms": round(ms, 3),
           "tflops": round(flops / ms / 1e9, 1), "density": round(mask_area / (n * n), 4),
           "peak_mib": round(peak, 1), "note": note, "gpus": 1}
    return row


def refused(name: str, kernel: str, n: int, pas: str, exc: BaseException) -> dict:
    """The row of a kernel that refused this mask or shape, with the first line of its error."""
    return {"mask": name, "kernel": kernel, "length": n, "pass": pas, "ms": "", "tflops": "", "density": "",
            "peak_mib": "", "note": f"refused: {str(exc).splitlines()[0][:120]}", "gpus": 1}


def done_rows(path: Path) -> set[tuple]:
    """(mask, kernel, length, pass, gpus) of the rows a CSV holds (rows of CSVs without ``gpus``: one GPU)."""
    if not path.is_file():
        return set()
    with path.open() as f:
        return {(r["mask"], r["kernel"], r["length"], r["pass"], r.get("gpus") or "1") for r in csv.DictReader(f)}


def open_rows(path: Path):
    """(file, DictWriter) appending to ``path``; a CSV written before the ``gpus`` / ``strategy`` /
    ``efficiency`` columns is rewritten once with them (its rows: one GPU), so resuming it keeps working."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file():
        with path.open() as f:
            reader = csv.DictReader(f)
            header, rows = reader.fieldnames or [], list(reader)
        if header != FIELDS:
            with path.open("w", newline="") as f:
                w = csv.DictWriter(f, FIELDS)
                w.writeheader()
                w.writerows({**{k: "" for k in FIELDS}, **r, "gpus": r.get("gpus") or 1} for r in rows)
    new_file = not path.is_file()
    out = path.open("a", newline="")
    writer = csv.DictWriter(out, FIELDS, restval="")
    if new_file:
        writer.writeheader()
    return out, writer


def cp_main(args) -> int:
    """The --cp run, one process per GPU under torchrun: rank 0's one-GPU baseline, then every strategy."""
    dev = init_distributed(args.device)
    rank, world = dist.get_rank(), dist.get_world_size()
    strategies = args.cp.split(",")
    for s in strategies:
        if s not in STRATEGIES:
            raise SystemExit(f"--cp {s!r} is invalid; accepted: {', '.join(STRATEGIES)}")
    if args.gpus and args.gpus != world:
        raise SystemExit(f"--gpus {args.gpus} but torchrun started {world} processes; accepted: equal counts")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    h, hkv, d = args.heads, args.kv_heads, args.head_dim
    box = [done_rows(args.out) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)  # every rank skips the same rows
    done = box[0]
    out, writer = open_rows(args.out) if rank == 0 else (None, None)
    t0 = time.time()
    for n in [int(x) for x in args.lengths.split(",")]:
        todo = [s for s in strategies if ("causal", f"cp_{s}", str(n), "fwd", str(world)) not in done]
        stop = [bool(args.seconds and time.time() - t0 > args.seconds)]
        dist.broadcast_object_list(stop, src=0)
        if stop[0]:
            break
        if todo and n % (2 * world):
            if rank == 0:
                print(f"length {n}: not a multiple of 2 x {world} GPUs; skipped", file=sys.stderr)
            continue
        if not todo:
            continue
        area_n = n * (n + 1) // 2
        flops = 4 * area_n * h * d
        base = [0.0]
        if rank == 0:  # the one-GPU baseline, alone on its GPU (the other ranks wait at the broadcast)
            base[0] = single_gpu_ms(n, h, hkv, d, dev, dtype, args.repeats)
            kname = "sdpa_flash" if dev.type == "cuda" else "sdpa"
            if ("causal", kname, str(n), "fwd", "1") not in done:
                row = {"mask": "causal", "kernel": kname, "length": n, "pass": "fwd", "ms": round(base[0], 3),
                       "tflops": sig3(flops / base[0] / 1e9), "density": round(area_n / (n * n), 4), "gpus": 1,
                       "strategy": "single", "note": "baseline of the --cp rows"}
                writer.writerow(row)
                print(",".join(str(row.get(f, "")) for f in FIELDS), flush=True)
        dist.broadcast_object_list(base, src=0)
        for strategy in todo:
            ms, peak, note = cp_time(strategy, n, dev, dtype, h, hkv, d, args.repeats)
            if rank != 0:
                continue
            row = {"mask": "causal", "kernel": f"cp_{strategy}", "length": n, "pass": "fwd", "ms": ms,
                   "density": round(area_n / (n * n), 4), "peak_mib": peak, "note": note, "gpus": world,
                   "strategy": strategy}
            if ms != "":
                row.update({"tflops": sig3(flops / world / ms / 1e9),
                            "efficiency": round(base[0] / (world * ms), 3),
                            "note": f"{note}; 1 GPU {base[0]:.3f} ms"})
            writer.writerow(row)
            out.flush()
            print(",".join(str(row.get(f, "")) for f in FIELDS), flush=True)
    if out is not None:
        out.close()
    dist.destroy_process_group()
    return 0


def sig3(x: float) -> float:
    """Three significant digits (TFLOP/s from 0.01 on a CPU smoke run to hundreds on GPUs)."""
    return float(f"{x:.3g}")


def single_gpu_ms(n: int, h: int, hkv: int, d: int, dev, dtype, repeats: int) -> float:
    """Median ms of causal SDPA over the whole sequence on this device (flash on CUDA)."""
    q, k, v = (torch.randn(1, x, n, d, device=dev, dtype=dtype) for x in (h, hkv, hkv))

    def call():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION] if dev.type == "cuda" else list(_CPU_BACKENDS)):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=d**-0.5, enable_gqa=True)

    return timed(call, repeats)


_CPU_BACKENDS = (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH)


def cp_time(strategy: str, n: int, dev, dtype, h: int, hkv: int, d: int, repeats: int) -> tuple:
    """One strategy at one length, on every rank: (slowest rank's median ms, largest peak MiB above the inputs,
    note), or ("", "", "refused: ...")."""
    rank, world = dist.get_rank(), dist.get_world_size()
    lay = SeqLayout(n, world, rank, DEFAULT_LAYOUT[strategy])
    if strategy == "torch_ring" and dev.type != "cuda":
        return "", "", "refused: torch's context_parallel patches the CUDA SDPA kernels only"
    g = torch.Generator(device=dev).manual_seed(rank)
    q, k, v = (torch.randn(1, x, lay.local_len, d, device=dev, dtype=dtype, generator=g) for x in (h, hkv, hkv))
    if strategy == "torch_ring":
        ctx = torch_ring_context(lay, None, dev)
        fn = lambda: torch_ring_attention(q, k, v, d**-0.5)  # noqa: E731
    else:
        ctx = contextlib.nullcontext()
        attn = ring_attention if strategy == "ring" else ulysses_attention
        fn = lambda: attn(q, k, v, lay, None, d**-0.5)  # noqa: E731
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    with ctx:  # warm-up inside (NCCL communicators, kernels), then every rank starts each timed call together
        median = timed(fn, repeats, before=dist.barrier)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else 0.0
    worst = torch.tensor([median, peak], dtype=torch.float64, device=dev)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return round(float(worst[0]), 3), (round(float(worst[1]), 1) if cuda else ""), f"layout {lay.kind}"


def plot(csv_path: Path, svg: Path) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in csv.DictReader(csv_path.open()) if r["pass"] == "fwd" and r["tflops"]]
    longest = max(int(r["length"]) for r in rows)
    rows = [r for r in rows if int(r["length"]) == longest]
    masks = list(dict.fromkeys(r["mask"] for r in rows))
    kernels = list(dict.fromkeys(r["kernel"] for r in rows))
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(kernels)
    for i, kname in enumerate(kernels):
        vals = [next((float(r["tflops"]) for r in rows if r["mask"] == m and r["kernel"] == kname), math.nan)
                for m in masks]
        ax.bar([x + i * width for x in range(len(masks))], vals, width, label=kname)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(masks))], masks, rotation=30, ha="right")
    ax.set_ylabel("forward TFLOP/s")
    ax.set_title(f"prefill attention at {longest:,} tokens (Llama-3.1-8B heads, bf16)")
    ax.legend(fontsize=8, loc="upper right")  # the left holds the dense masks' tallest bars
    fig.tight_layout()
    svg.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(svg)
    print(svg)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
