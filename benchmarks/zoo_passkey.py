"""Passkey length generalisation of tiny NoPE LMs, CPU: train at L characters, test at L, 2L, 4L.

Every mixer gets the same model around it (TinyLM: 2 layers, d 64, 4 heads, MLP x4, no positional encoding), the
same seeds (same data stream, same initialisation where the shapes agree), the same budget (steps x batch) and the
same held-out evaluation sets (the essays' test split for ``--haystack essay``). Exact match of the 5 answer digits,
teacher-forced (equal to greedy decoding's exact match); for landmark also greedy decoding through its decode path
with top-k block retrieval (the paper's inference), row "landmark (top-k retrieval)".

Usage (the run reported in the task notes)::

    .venv/bin/python benchmarks/zoo_passkey.py --seq-len 128 --steps 1500 --seeds 0 1 \\
        --out results/zoo_passkey.jsonl

Rows are appended to the JSONL file as each run finishes (a run already there is skipped, so an interrupted run
resumes); ``--report-only`` re-prints the table from it.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(1)
from attnkit.zoo.passkey import (  # noqa: E402
    PasskeyConfig,
    eval_seed,
    passkey,
    passkey_hits,
    train_passkey,
)

HEADS = 4
MODELS = {  # row name -> (mixer, its settings)
    "softmax": ("softmax", {}),
    "selective (code)": ("selective", {"form": "code"}),
    "selective (paper)": ("selective", {"form": "paper"}),
    "meta_tokens": ("meta_tokens", {"num_meta": 16}),
    "landmark": ("landmark", {"block_size": 16, "top_k": 2}),
}


def config(name: str, args: argparse.Namespace, seed: int) -> PasskeyConfig:
    mixer, settings = MODELS[name]
    if mixer == "landmark":
        settings = {**settings, "block_size": args.block_size}
    return PasskeyConfig(mixers=mixer, mixer_settings={mixer: {"num_heads": HEADS, **settings}}, d_model=args.d_model,
                         n_layers=2, mlp_ratio=4, seq_len=args.seq_len, haystack=args.haystack, steps=args.steps,
                         batch_size=args.batch_size, lr=args.lr, lm_weight=args.lm_weight,
                         train_lengths=args.train_lengths,
                         eval_lengths=tuple(args.multiples), eval_examples=args.eval_examples, seed=seed)


def depth_bins(hits: torch.Tensor, depth: torch.Tensor, bins: int = 3) -> list[float]:
    """Exact match by needle depth, in ``bins`` equal bins of [0, 1]."""
    index = (depth * bins).long().clamp(max=bins - 1)
    return [round(hits[index == k].double().mean().item(), 4) if (index == k).any() else None for k in range(bins)]


def run_one(name: str, cfg: PasskeyConfig, args: argparse.Namespace) -> list[dict]:
    start = time.perf_counter()
    model, row = train_passkey(cfg, args.checkpoints, progress=not args.no_progress, log_every=max(1, cfg.steps // 10))
    rows = []
    modes = [(name, False)] + ([("landmark (top-k retrieval)", True)] if cfg.mixers == "landmark" else [])
    for label, decode in modes:
        t0 = time.perf_counter()
        acc, by_depth = {}, {}
        for m in cfg.eval_lengths:
            n = m * cfg.seq_len
            batch = passkey(cfg.eval_examples, n, cfg.haystack, cfg.digits, split="test", seed=eval_seed(cfg, n))
            hits = passkey_hits(model, batch, cfg.eval_batch_size, decode)
            acc[str(n)] = round(hits.double().mean().item(), 4)
            by_depth[str(n)] = depth_bins(hits, batch.depth)
        rows.append({"model": label, "seed": cfg.seed, "params": row["params"], "accuracy": acc,
                     "accuracy_by_depth_thirds": by_depth, "train_wall_s": row["train_wall_s"],
                     "eval_wall_s": round(time.perf_counter() - t0, 2), "final_loss": row["final_loss"],
                     "log": row["log"], "config": row["config"], "decode": decode})
    print(f"{name} seed {cfg.seed}: {rows[0]['accuracy']} in {time.perf_counter() - start:.0f} s", file=sys.stderr,
          flush=True)
    return rows


def stored(row: dict) -> dict:
    """A stored row's config, with the defaults of fields added since it was written."""
    return {"train_lengths": "fixed", **row["config"]}


def fmt(xs: list[float]) -> str:
    if len(xs) == 1:
        return f"{100 * xs[0]:.1f}"
    return f"{100 * statistics.mean(xs):.1f} [{100 * min(xs):.0f}, {100 * max(xs):.0f}]"


def report(rows: list[dict]) -> None:
    if not rows:
        return
    lengths = list(rows[0]["accuracy"])
    order = list(MODELS) + ["landmark (top-k retrieval)"]
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["model"], []).append(r)
    c = rows[0]["config"]
    print(f"\nPasskey exact match (%), trained at L = {c['seq_len']} characters ({c['haystack']} haystack), "
          f"{c['steps']} steps x {c['batch_size']}, {len(by[next(iter(by))])} seed(s); mean [min, max] over seeds\n")
    print("| mixer | params | " + " | ".join(f"L={n}" + (" (train)" if i == 0 else f" ({n // int(lengths[0])}x)")
                                          for i, n in enumerate(map(int, lengths))) + " | train s / run |")
    print("|---|---|" + "---|" * len(lengths) + "---|")
    for name in order:
        if name not in by:
            continue
        rs = sorted(by[name], key=lambda r: r["seed"])
        cells = [fmt([r["accuracy"][n] for r in rs]) for n in lengths]
        wall = statistics.mean(r["train_wall_s"] for r in rs)
        print(f"| {name} | {rs[0]['params']:,} | " + " | ".join(cells) + f" | {wall:.0f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--multiples", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--haystack", choices=["noise", "essay"], default="noise")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--train-lengths", choices=["fixed", "uniform"], default="fixed")
    ap.add_argument("--lm-weight", type=float, default=1.0)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16, help="landmark block size")
    ap.add_argument("--eval-examples", type=int, default=200)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--checkpoints", default=None, help="resumable training checkpoints (default: none)")
    ap.add_argument("--out", default="results/zoo_passkey.jsonl")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    out = Path(args.out)
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()] if out.exists() else []
    if not args.report_only:
        out.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        for seed in args.seeds:
            for name in args.models:
                cfg = config(name, args, seed)
                if any(stored(r) == json.loads(json.dumps(cfg.__dict__)) and r["model"] == name for r in rows):
                    continue  # already in the file
                new = run_one(name, cfg, args)
                with out.open("a") as f:
                    for r in new:
                        f.write(json.dumps(r) + "\n")
                rows += new
        print(f"total wall time {time.perf_counter() - start:.0f} s", file=sys.stderr)
    wanted = {json.dumps(config(n, args, s).__dict__, sort_keys=True, default=list) for n in args.models
              for s in args.seeds}
    report([r for r in rows if json.dumps(stored(r), sort_keys=True, default=list) in wanted])


if __name__ == "__main__":
    main()
