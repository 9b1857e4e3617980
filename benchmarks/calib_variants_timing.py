"""Seconds per head-search candidate at several candidates per forward (issue 9's calibration cost).

Scores the same ZeroTuning probes (one head at gamma 1.5 each) on a task's 64 calibration samples with
``variants`` = 1, 4, 8, 16 candidates per forward, checks that every setting gives the same objectives, and
prints seconds per candidate; the JSON holds every timing. ``--one-forward`` also times the largest ``variants``
with every sample in one forward (the grouping by length off: a per-forward cost too large to split for), against
which the length groups' gain shows.

    python benchmarks/calib_variants_timing.py --model smollm2-135m --tasks sst2,boolq,arc_easy,hellaswag \\
        --out results/calib_variants.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import attnkit
from attnkit.calibrate_heads import _Scorer
from attnkit.cli import load
from attnkit.eval import choice
from attnkit.eval.tasks.choice import choice_samples
from attnkit.session import text_config


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", default="sst2,boolq,arc_easy,hellaswag")
    ap.add_argument("--variants", default="1,4,8,16")
    ap.add_argument("--candidates", type=int, default=16)
    ap.add_argument("--calib", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--one-forward", action="store_true", help="also time the largest variants without length groups")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    model, tok = load(args.model, args.device, args.dtype)
    cfg = text_config(model)
    n_layers, n_heads = cfg.num_hidden_layers, cfg.num_attention_heads
    units = [(l, h) for l in range(n_layers) for h in range(n_heads)][:: max(1, n_layers * n_heads // args.candidates)]
    units = units[: args.candidates]
    method = attnkit.registry.make_method("zerotuning")
    default = dict(choice.FORWARD_TOKENS)
    out = {"model": args.model, "dtype": args.dtype, "candidates": len(units), "calib": args.calib,
           "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu", "tasks": {}}

    def set_chunk(chunk):
        tables = torch.zeros(len(chunk), n_layers, n_heads)
        for v, (l, h) in enumerate(chunk):
            tables[v, l, h] = 0.5
        method.set_gains(tables)

    with torch.no_grad(), attnkit.apply(model, method):
        for task in args.tasks.split(","):
            samples = choice_samples(task, tok, args.calib, 0, split="calib")
            row, ref = {}, None
            settings = [(int(x), False) for x in args.variants.split(",")]
            if args.one_forward:
                settings.append((settings[-1][0], True))
            for v, one in settings:
                # one forward: a per-forward cost no split can pay back
                choice.FORWARD_TOKENS.update({k: (1e12 if one else default[k]) for k in default})
                score = _Scorer(model, tok, samples, "accuracy", None, v)
                score.many(units[:v], set_chunk)  # warm-up: this batch shape's kernels
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                t = time.perf_counter()
                values = score.many(units, set_chunk)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                sec = (time.perf_counter() - t) / len(units)
                ref = ref or values
                diff = max(abs(a[0] - b[0]) for a, b in zip(values, ref))
                key = f"{v}, one forward" if one else str(v)
                row[key] = {"seconds_per_candidate": sec, "max_objective_diff_vs_first": diff}
                first = next(iter(row.values()))["seconds_per_candidate"]
                print(f"{task:12s} variants {key:>15s}: {1000 * sec:8.1f} ms a candidate ({first / sec:4.1f}x), "
                      f"objective diff {diff:.2e}", flush=True)
            choice.FORWARD_TOKENS.update(default)
            out["tasks"][task] = row
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
