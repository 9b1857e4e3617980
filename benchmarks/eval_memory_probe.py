"""Where an eval batch's GPU memory goes: one left-padded batch of a model through ``attnkit.generate`` with a
method active, as ``attnkit eval`` runs it, with the allocator's peak after loading, after the prefill and after the
decode steps, and the largest blocks alive at the prefill's peak (the CUDA allocator's recorded trace).

Found in the thirteenth session: Gemma-3-270M at 16K, batch 4 held 10.9 GB (``full``) to 18.3 GB (tokenselect) per
process, far above its weights, KV cache and chunked attention. On the CPU the same prefill (float32) peaks at
2.6 GiB of live tensors, so the rest is CUDA-side. Figures go to notes/gpu.md.

    python benchmarks/eval_memory_probe.py --model gemma3-270m --length 16384 --batch 4 --methods full,tokenselect
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import attnkit
from attnkit.data import essay_tokens
from attnkit.models import load_model
from attnkit.registry import method_class


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def blocks_at_peak(n: int = 10) -> list[dict]:
    """The largest blocks alive at the recorded history's peak, with the attnkit / transformers frames that
    allocated them: the allocator's trace replayed (alloc adds a block, free_completed removes it)."""
    snap = torch.cuda.memory._snapshot()
    live, total, best, at_peak = {}, 0, -1, {}
    for e in snap["device_traces"][torch.cuda.current_device()]:
        if e["action"] == "alloc":
            live[e["addr"]] = e
            total += e["size"]
        elif e["action"] == "free_completed" and e["addr"] in live:
            total -= live.pop(e["addr"])["size"]
        if total > best:
            best, at_peak = total, dict(live)
    out = []
    for e in sorted(at_peak.values(), key=lambda e: -e["size"])[:n]:
        frames = [f"{f['filename'].split('/')[-1]}:{f['line']} {f['name']}" for f in e.get("frames") or []
                  if "attnkit" in f["filename"] or "transformers" in f["filename"]][:3]
        out.append(dict(mib=round(e["size"] / 2**20, 1), where=frames))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--length", type=int, default=16384, help="tokens in the longest prompt")
    ap.add_argument("--batch", type=int, default=4, help="prompts, left-padded (each 1/8 shorter than the last)")
    ap.add_argument("--methods", default="full")
    ap.add_argument("--budget", type=int, default=4096)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", help="JSON with every figure")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model, tok = load_model(args.model, device=args.device, dtype=dtype)
    device = next(model.parameters()).device
    ids = essay_tokens(tok, args.length)[0].tolist()
    prompts = [tok.decode(ids[: args.length - i * args.length // 8], skip_special_tokens=True)
               for i in range(args.batch)]
    rows = []
    for name in args.methods.split(","):
        method = method_class(name).for_budget(args.budget) if name != "full" else name
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        loaded = peak_gib(device)
        t0 = time.perf_counter()
        with attnkit.apply(model, method):
            gen = attnkit.generate(model, tok, prompts, max_new_tokens=1, prefill_chunk=args.length)
            prefill = peak_gib(device)
            top = blocks_at_peak() if device.type == "cuda" else []
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            attnkit.generate(model, tok, prompts, max_new_tokens=args.new_tokens, prefill_chunk=args.length)
        whole = peak_gib(device)
        if device.type == "cuda":
            torch.cuda.memory._record_memory_history(enabled=None)
        row = dict(method=name, batch=args.batch, length=args.length, prompt_tokens=gen[0].prompt_tokens,
                   loaded_gib=loaded, prefill_peak_gib=prefill, generate_peak_gib=whole,
                   seconds=round(time.perf_counter() - t0, 1), top_blocks=top)
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "top_blocks"}))
        for b in top:
            print(f"    {b['mib']:9.1f} MiB  {' <- '.join(b['where'])}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
