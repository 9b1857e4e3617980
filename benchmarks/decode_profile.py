"""Where a decode step's time goes: device time per kernel category, for each method's fixed-shape step.

Llama-3.1-8B-shaped model with random bf16 weights (as ``decode_latency.py``). For each method the prompt is
prefilled through attnkit, the cache switches to fixed-shape decode, and a few steps run eagerly under
``torch.profiler`` (CUDA activity). Kernels are grouped by name: matmuls (the weights), attention (attnkit's
decode kernels, SDPA), selection (Quest scoring, top-k, sorts), and everything else (norms, RoPE, copies,
scatters: the small kernels a CUDA graph still has to run one after another). The graph-replayed step time of
the same run is printed next to it, so the table says how far each part is from its floor.

    python benchmarks/decode_profile.py --context 32768 --out results/decode_profile_32k.json
"""

from __future__ import annotations

import argparse
import gc
import json
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import attnkit
from attnkit.graphs import StaticDecoder
from decode_latency import LLAMA_31_8B, build_model, copy_bandwidth_gbs, settings_for, shape_arguments

CATEGORIES = {
    "matmul": ("gemm", "gemv", "cutlass", "nvjet", "xmma", "splitk", "cublas", "matmul"),
    "attention": ("_dense_split", "_sparse_split", "_quest_attend", "_combine", "flash", "fmha", "attention"),
    "selection": ("_quest", "_topk", "topk", "radix", "sort", "gathertopk", "bitonic"),
}


def category(kernel: str) -> str:
    name = kernel.lower()
    for cat, keys in CATEGORIES.items():
        if any(k in name for k in keys):
            return cat
    return "other (norms, RoPE, copies, scatters)"


def profile_method(model, ids, name: str, budget: int, steps: int, chunk: int, compiled: bool = False) -> dict:
    method, _, page = name.partition("/p")  # quest/p64: Quest with 64-token pages
    settings = dict(settings_for(budget)[method], **({"page": int(page)} if page else {}))
    with torch.no_grad(), attnkit.apply(model, method, **settings) as run:
        run.capacity_hint = ids.shape[1] + 2 * steps + 8
        cache = run.new_cache()
        run.capacity_hint = 0
        attnkit.inference.forward_chunks(model, ids, cache, chunk)
        pos = torch.full((ids.shape[0], 1), ids.shape[1], dtype=torch.long, device=ids.device)
        token = torch.zeros(ids.shape[0], dtype=torch.long, device=ids.device)
        eager = StaticDecoder(model, cache, 2 * steps + 4, graphs=False, compile=compiled)
        for _ in range(2):  # compile the Triton kernels (and the step, with --compile), warm cuBLAS
            eager.step(token, pos)
            pos += 1
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                eager.step(token, pos)
                pos += 1
            torch.cuda.synchronize()
        eager.close()
    by_cat: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    top: dict[str, float] = defaultdict(float)
    for e in prof.events():
        if e.device_type.name != "CUDA":
            continue
        t = getattr(e, "device_time", None) or getattr(e, "cuda_time", 0.0)
        by_cat[category(e.name)][0] += t / steps
        by_cat[category(e.name)][1] += 1 / steps
        top[e.name] += t / steps
    return {
        "categories": {k: {"us": v[0], "kernels": round(v[1])} for k, v in by_cat.items()},
        "top_kernels": dict(sorted(top.items(), key=lambda kv: -kv[1])[:12]),
        "kv_bytes": run.kv_bytes(),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shape_arguments(ap)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--compile", action="store_true", help="profile the torch.compile'd step (attnkit.generate's "
                    "compile=True) after the uncompiled one, as rows NAME compiled")
    ap.add_argument("--compiled-only", action="store_true", help="with --compile, profile only the compiled step")
    ap.add_argument("--out", type=Path, default=Path("results/decode_profile.json"))
    args = ap.parse_args(argv)
    model = build_model(args.layers, "cuda")
    ids = torch.randint(0, LLAMA_31_8B["vocab_size"], (args.batch, args.context), device="cuda")
    bandwidth = copy_bandwidth_gbs("cuda")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    rows = {}
    for name in [m for m in args.methods.split(",") if m]:
        for compiled in ([True] if args.compiled_only else [False, True]) if args.compile else [False]:
            label = name + (" compiled" if compiled else "")
            rows[label] = profile_method(model, ids, name, args.budget, args.steps, args.prefill_chunk, compiled)
            cats = rows[label]["categories"]  # printed now: a bounded run keeps the rows it finished
            print(f"{label}: " + ", ".join(f"{k} {v['us']:.0f} us ({v['kernels']})" for k, v in cats.items())
                  + f"; top: {', '.join(f'{k[:40]} {v:.0f}' for k, v in list(rows[label]['top_kernels'].items())[:6])}",
                  flush=True)
            gc.collect()  # cache layers and the run reference each other: free them before the next method
            torch.cuda.empty_cache()
    cats = ["matmul", "attention", "selection", "other (norms, RoPE, copies, scatters)"]
    print(f"\nDevice time per decode step (eager fixed-shape step under the profiler), Llama-3.1-8B shape, "
          f"batch {args.batch}, context {args.context}, {torch.cuda.get_device_name()}; weights floor "
          f"{1e6 * weight_bytes / (bandwidth * 1e9):.0f} us at {bandwidth:.0f} GB/s")
    print("| method | " + " | ".join(f"{c} us (kernels)" for c in cats) + " | sum us | KV floor us |")
    print("| --- |" + " ---: |" * (len(cats) + 2))
    for name, r in rows.items():
        c = r["categories"]
        total = sum(v["us"] for v in c.values())
        kv_floor = 1e6 * r["kv_bytes"] / (bandwidth * 1e9)
        r["sum_us"] = total
        print(f"| {name} | " + " | ".join(
            f"{c.get(k, {'us': 0})['us']:.0f} ({c.get(k, {'kernels': 0})['kernels']})" for k in cats
        ) + f" | {total:.0f} | {kv_floor:.0f} |")
    for name, r in rows.items():
        print(f"{name} top kernels (us/step): " + "; ".join(f"{k[:60]} {v:.0f}" for k, v in list(r["top_kernels"].items())[:6]))
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()},
              "copy_bandwidth_gbs": bandwidth, "weight_bytes": weight_bytes, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
