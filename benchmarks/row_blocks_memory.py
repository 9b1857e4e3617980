"""Peak memory of an eager scoring prefill (H2O, SpAtten, ACT) with its probabilities whole vs in query-row blocks.

    python benchmarks/row_blocks_memory.py [--method h2o] [--budget 8192] [--context 16384] [--chunk 4096]
        [--device cpu]

Each mode runs in a process of its own on the tests' tiny random Llama (4 heads over 2 KV heads); prints its peak
memory (the process's max RSS on CPU, torch's peak allocation on CUDA), its wall time and its two new tokens,
which must agree. "whole" sets MASKED_SCORE_BYTES out of reach: one (B, H, chunk, budget + chunk) pass per layer.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def one(args) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    import torch

    import attnkit
    from attnkit.hf import attention
    from test_padded_batch import IdTok
    from tiny import tiny_llama

    if args.mode == "whole":
        attention.MASKED_SCORE_BYTES = 1 << 50
    model = tiny_llama().to(args.device)
    model.config.max_position_embeddings = max(args.context * 2, 2048)
    ids = torch.randint(3, 256, (args.context,), generator=torch.Generator().manual_seed(0)).tolist()
    settings = {"h2o": {"heavy": args.budget // 2, "recent": args.budget - args.budget // 2},
                "spatten": {"budget": args.budget},
                "act": {"heads": "all"}}[args.method]  # ACT keeps every token (budget unused), reweighs all heads
    start = time.perf_counter()
    with torch.no_grad(), attnkit.apply(model, args.method, **settings):
        out = attnkit.generate(model, IdTok(), ids, max_new_tokens=2, prefill_chunk=args.chunk, stop_at_eos=False)
    seconds = time.perf_counter() - start
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": args.mode, "peak_mib": round(peak), "seconds": round(seconds, 1), "tokens": out.tokens}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="h2o", choices=["h2o", "spatten", "act"])
    p.add_argument("--budget", type=int, default=8192)
    p.add_argument("--context", type=int, default=16384)
    p.add_argument("--chunk", type=int, default=4096)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--mode", choices=["whole", "blocked"], help=argparse.SUPPRESS)  # one child process
    args = p.parse_args()
    if args.mode:
        print(json.dumps(one(args)))
        return
    rows = []
    for mode in ("whole", "blocked"):
        child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--mode", mode], capture_output=True,
                               text=True, check=True)
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(f"{args.method} budget {args.budget}, {args.context} tokens in {args.chunk}-token chunks, {mode}: "
              f"peak {rows[-1]['peak_mib']} MiB, {rows[-1]['seconds']} s, tokens {rows[-1]['tokens']}")
    if rows[0]["tokens"] != rows[1]["tokens"]:
        raise SystemExit("the two modes disagree on the new tokens")


if __name__ == "__main__":
    main()
