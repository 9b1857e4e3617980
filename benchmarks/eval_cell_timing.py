"""Where an `attnkit eval` cell's time goes: one padded batch's prefill at several ``--prefill-chunk`` sizes and its
decode, per method (rows of unequal lengths, left-padded as the eval's), and on CUDA the GPU's busy time during the
prefill (the sum of its kernels' times) beside the wall time. Busy far below wall means the host bounds the cell:
fewer, larger chunks or more shards per GPU help; busy near wall means the GPU does, and neither does.

Planned for issue 8's ranking sweep on Gemma-3 at 16K (`gpu_eval.sh rank16k_gemma`), whose rows cost ~0.27 s each
on an H100 at `--prefill-chunk 512` with four shards. Random token ids stand in for the prompts (the cost does not
depend on them); the eval's own settings otherwise (bf16 on CUDA, the method's budget in tokens).

    python benchmarks/eval_cell_timing.py --model gemma3-270m --length 16384 --batch 4 \\
        --methods full,quest:128,snapkv:128,h2o:128 --chunks 512,2048 --out results/eval_cell_timing.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

import attnkit
from attnkit.cli import load
from attnkit.registry import method_class


def parse_methods(text: str) -> list[tuple[str, int | None]]:
    """'full,quest:128' -> [('full', None), ('quest', 128)]."""
    out = []
    for spec in filter(None, text.split(",")):
        name, _, budget = spec.partition(":")
        out.append((name, int(budget) if budget else None))
    return out


def busy_ms(fn, top: int = 0) -> tuple[float, list[dict]]:
    """Milliseconds of CUDA kernel time while ``fn`` runs (torch.profiler's device events), and the ``top`` kernels
    by their summed time: [{"kernel", "ms", "calls"}, ...]."""
    from collections import defaultdict

    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    per = defaultdict(lambda: [0.0, 0])
    for e in kernels:
        per[e.name][0] += e.time_range.elapsed_us() / 1e3
        per[e.name][1] += 1
    ranked = sorted(per.items(), key=lambda kv: -kv[1][0])[:top]
    return (sum(e.time_range.elapsed_us() for e in kernels) / 1e3,
            [{"kernel": k[:90], "ms": round(ms, 2), "calls": n} for k, (ms, n) in ranked])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--length", type=int, default=16384)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--methods", default="full,quest:128,snapkv:128,h2o:128")
    ap.add_argument("--chunks", default="512,2048")
    ap.add_argument("--band", default="1", help="ATTNKIT_BAND_PREFILL values to compare, e.g. 0,1 (the masked "
                    "prefill against the varlen flash one)")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--top", type=int, default=12, help="the prefill's top CUDA kernels by time, per row")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU (as attnkit eval)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    model, tok = load(args.model, args.device, args.dtype or ("bfloat16" if cuda else "float32"))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (args.batch, args.length), generator=gen).tolist()
    # rows a few tokens apart, as RULER's prompts are: the batch is left-padded and takes the eval's masked path
    ids = [r[: args.length - 37 * i] for i, r in enumerate(ids)]
    rows = []
    for name, budget in parse_methods(args.methods):
        cls = method_class(name)
        method = cls() if budget is None else cls.for_budget(budget)  # the eval's budget mapping
        with torch.no_grad(), attnkit.apply(model, method=method):
            attnkit.generate(model, tok, [r[:300] for r in ids], max_new_tokens=2, prefill_chunk=128,
                             stop_at_eos=False)  # warm-up: kernels, graphs, allocator
            for chunk, flag in ((int(c), f) for c in args.chunks.split(",") for f in args.band.split(",")):
                os.environ["ATTNKIT_BAND_PREFILL"] = flag
                t0 = time.perf_counter()
                out = attnkit.generate(model, tok, ids, max_new_tokens=args.new_tokens, prefill_chunk=chunk,
                                       stop_at_eos=False)[0]
                wall = time.perf_counter() - t0
                row = {"method": name, "budget": budget, "chunk": chunk, "band": flag,
                       "prefill_s": round(out.prefill_s, 4),
                       "decode_ms_per_token": round(1e3 * out.decode_s / max(1, out.decode_steps), 3),
                       "wall_s": round(wall, 4)}
                if cuda:
                    t1 = time.perf_counter()
                    busy, top = busy_ms(lambda: attnkit.generate(model, tok, ids, max_new_tokens=1,
                                                                 prefill_chunk=chunk, stop_at_eos=False), args.top)
                    row.update(prefill_busy_ms=round(busy, 2), profiled_prefill_s=round(time.perf_counter() - t1, 4),
                               top_kernels=top)
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        device = torch.cuda.get_device_name() if cuda else "cpu"
        args.out.write_text(json.dumps({"model": args.model, "length": args.length, "batch": args.batch,
                                        "device": device, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
