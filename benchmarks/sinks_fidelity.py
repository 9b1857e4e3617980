"""ZeroTuning and ACT against the unmodified model on classification and multiple-choice tasks (issue 9 item 4).

Per task: calibrate on the task's ``calib`` split (ZeroTuning: supervised head search, and its unsupervised entropy
variant; ACT: its head filter), then score ``full``, each calibrated method on the ``eval`` split. Accuracy with a
95% Wilson interval, and the paired difference to ``full`` with a 95% bootstrap interval over the eval samples.
The JSON is rewritten after every (task, method), and a rerun skips what it holds (resume).

    python benchmarks/sinks_fidelity.py --model smollm2-135m --tasks sst2,trec,arc_easy --calib 64 --eval 500 \\
        --out docs/results/sinks_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

import attnkit
from attnkit.calibrate_heads import calibrate_act, calibrate_zerotuning, wilson, write_json
from attnkit.cli import load
from attnkit.eval.choice import score_choices
from attnkit.eval.tasks.choice import choice_samples

METHODS = ("full", "zerotuning", "zerotuning_entropy", "act")


def paired_ci(a: list[int], b: list[int], draws: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean of b - a and its 95% bootstrap interval (percent points), resampling eval samples in pairs."""
    rng = random.Random(seed)
    n = len(a)
    diffs = [y - x for x, y in zip(a, b)]
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(draws))
    return 100 * sum(diffs) / n, 100 * means[int(0.025 * draws)], 100 * means[int(0.975 * draws) - 1]


def score(model, tok, samples, batch: int, **method) -> list[int]:
    out = []
    with torch.no_grad(), attnkit.apply(model, **method):
        for i in range(0, len(samples), batch):
            out += [r["correct"] for r in score_choices(model, tok, samples[i : i + batch])]
    return out


def merge(out: Path) -> int:
    """Folds the shard files' runs into ``out`` (a shard's run of a (task, method) wins over none)."""
    done = json.loads(out.read_text()) if out.is_file() else {"runs": {}}
    for shard in sorted(out.parent.glob(f"{out.stem}.shard*.json")):
        part = json.loads(shard.read_text())
        for task, runs in part.pop("runs", {}).items():
            done["runs"].setdefault(task, {}).update(runs)
        done = {**done, **part}  # the shard's settings and card are the latest run's (each run also names its card)
    out.write_text(json.dumps(done) + "\n")
    print(f"{out}: {sum(len(r) for r in done['runs'].values())} runs over {len(done['runs'])} tasks")
    return 0


def merge_from(out: Path, others: list[Path]) -> int:
    """Adds to ``out`` the tasks of other result files (another machine's run of the same model and settings), each
    task whole from one file: the one holding more of its methods (``out`` on a tie), so a task's paired
    differences and card are one run's. The taken tasks' calibration profiles are copied beside ``out``'s."""
    done = json.loads(out.read_text())
    for other in others:
        part = json.loads(other.read_text())
        keys = ("model", "dtype", "calib", "eval", "mode")
        if [part.get(k) for k in keys] != [done.get(k) for k in keys]:
            raise SystemExit(f"{other}: settings {[part.get(k) for k in keys]} differ from {out}'s "
                             f"{[done.get(k) for k in keys]} ({', '.join(keys)})")
        for task, runs in part["runs"].items():
            if len(runs) > len(done["runs"].get(task, {})):
                done["runs"][task] = runs
                for prof in other.with_suffix("").glob(f"{task}_*.json"):
                    out.with_suffix("").mkdir(parents=True, exist_ok=True)
                    (out.with_suffix("") / prof.name).write_bytes(prof.read_bytes())
    out.write_text(json.dumps(done) + "\n")
    print(f"{out}: {sum(len(r) for r in done['runs'].values())} runs over {len(done['runs'])} tasks")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", default="sst2,sst5,mr,subj,trec,agnews,cb,boolq,rte,arc_easy,arc_challenge,piqa,"
                                       "openbookqa,commonsenseqa,hellaswag,mmlu")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--calib", type=int, default=64, help="calibration samples per task")
    ap.add_argument("--eval", type=int, default=500, help="evaluation samples per task (fewer if the split is)")
    ap.add_argument("--mode", choices=["head", "layer"], default="head")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--variants", type=int, default=None,
                    help="head-search candidates per forward (default: 8 on CUDA, 1 on the CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seconds", type=float, default=0, help="stop starting new tasks after this long (0: no bound)")
    ap.add_argument("--shard", default="", help="I/N: run every N-th task not complete in --out, writing "
                                               "OUT.shardI.json (several processes share one GPU)")
    ap.add_argument("--merge", action="store_true", help="fold OUT.shard*.json into --out and exit")
    ap.add_argument("--merge-from", type=Path, nargs="+", default=[],
                    help="add these result files' tasks to --out (each task whole from the file holding more of "
                         "its methods) and exit")
    args = ap.parse_args(argv)
    t0 = time.time()
    methods = [m for m in args.methods.split(",") if m]
    tasks = [t for t in args.tasks.split(",") if t]
    if args.merge:
        return merge(args.out)
    if args.merge_from:
        return merge_from(args.out, args.merge_from)
    if args.shard:
        i, n = (int(x) for x in args.shard.split("/"))
        main_runs = json.loads(args.out.read_text())["runs"] if args.out.is_file() else {}
        tasks = [t for t in tasks if set(methods) - set(main_runs.get(t, {}))][i::n]
        args.out = args.out.with_name(f"{args.out.stem}.shard{i}.json")
        profiles_dir = args.out.with_name(args.out.name.split(".shard")[0])
    done = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if args.shard:  # a task begun in --out goes on from what it holds (the paired differences need its `full`)
        done.setdefault("runs", {t: main_runs[t] for t in tasks if t in main_runs})
    done.setdefault("runs", {})
    model, tok = load(args.model, args.device, args.dtype)
    done.update(model=args.model, device=torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                dtype=args.dtype, calib=args.calib, eval=args.eval, mode=args.mode, torch=torch.__version__)
    profiles = profiles_dir if args.shard else args.out.with_suffix("")
    profiles.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        if args.seconds and time.time() - t0 > args.seconds:
            print(f"time bound reached before {task}", file=sys.stderr)
            break
        runs = done["runs"].setdefault(task, {})
        calib = choice_samples(task, tok, args.calib, 0, split="calib")
        evals = choice_samples(task, tok, args.eval, 0, split="eval")
        for name in methods:
            if name in runs:
                continue
            t1 = time.time()
            extra = {}
            if name == "full":
                correct = score(model, tok, evals, args.batch, method="full")
            elif name.startswith("zerotuning"):
                kind = "entropy" if name.endswith("entropy") else "accuracy"
                prof = calibrate_zerotuning(model, tok, calib, kind, args.mode, progress=False,
                                            variants=args.variants)
                path = write_json(prof, profiles / f"{task}_{name}.json")
                correct = score(model, tok, evals, args.batch, method="zerotuning", profile=str(path))
                extra = {"variants": prof["variants"], "heads": len(prof["gammas"]),
                         "gamma": prof["gammas"][0][2] if prof["gammas"] else 1.0,
                         "calib_accuracy": [prof["baseline_accuracy"], prof["calib_accuracy"]]}
            else:
                prof = calibrate_act(model, tok, calib, progress=False, variants=args.variants)
                path = write_json(prof, profiles / f"{task}_act.json")
                correct = score(model, tok, evals, args.batch, method="act", profile=str(path))
                extra = {"variants": prof["variants"], "heads": len(prof["heads"]),
                         "calib_accuracy": [prof["baseline_accuracy"], prof["calib_accuracy"]]}
            n, k = len(correct), sum(correct)
            lo, hi = wilson(k, n)
            runs[name] = {"accuracy": 100 * k / n, "ci95": [100 * lo, 100 * hi], "n": n, "correct": correct,
                          "seconds": round(time.time() - t1, 1), "device": done["device"], **extra}
            if name != "full" and "full" in runs:
                runs[name]["vs_full"] = paired_ci(runs["full"]["correct"], correct)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(done) + "\n")
            vs = runs[name].get("vs_full")
            print(f"{task:14s} {name:19s} {100 * k / n:5.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] n={n}"
                  + (f"  vs full {vs[0]:+.1f} [{vs[1]:+.1f}, {vs[2]:+.1f}]" if vs else "")
                  + (f"  heads {extra['heads']}" if extra else "") + f"  {time.time() - t1:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
