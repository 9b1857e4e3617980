"""Fidelity run: plain vs Attention AT vs Attention iAT (paper form, and the released code's form) on SST-2, CPU.

Same data (fixed split), same seeds (same initial weights and batch order per seed), same budget for every mode.
Usage: .venv/bin/python benchmarks/zoo_at_fidelity.py [--train-size 20000] [--epochs 4] [--seeds 0 1 2] [--out FILE]
Results are appended to a JSONL file as each run finishes; --report-only re-prints the table from it.
"""
import argparse, json, statistics, sys, time
from pathlib import Path

import torch

torch.set_num_threads(1)
from attnkit.zoo.adversarial import ATConfig, load_sst2, train_classifier  # noqa: E402

RUNS = [("plain", "paper"), ("at", "paper"), ("iat", "paper"), ("iat", "official")]
NAMES = {("plain", "paper"): "plain", ("at", "paper"): "Attention AT", ("iat", "paper"): "Attention iAT (paper form)",
         ("iat", "official"): "Attention iAT (released code: -AT)"}


def key(r):
    c = r["config"]
    return (c["mode"], c["iat_variant"] if c["mode"] == "iat" else "paper")


def fmt(xs, pct=True):
    k = 100 if pct else 1
    if len(xs) == 1:
        return f"{k * xs[0]:.2f}" if pct else f"{xs[0]:.3f}"
    m, s = statistics.mean(xs), statistics.stdev(xs)
    return (f"{k * m:.2f} ± {k * s:.2f}" if pct else f"{m:.3f} ± {s:.3f}") + \
        (f" [{k * min(xs):.1f}, {k * max(xs):.1f}]" if pct else "")


def report(rows):
    by = {}
    for r in rows:
        by.setdefault(key(r), {})[r["config"]["seed"]] = r
    print("\n| mode | seeds | test acc (best dev-AUC epoch), mean ± sd [min, max] | paired Δ vs plain (pp) "
          "| test acc (last epoch) | test F1 | test AUC | attn–grad Pearson | s / run |")
    print("|---|---|---|---|---|---|---|---|---|")
    plain = by.get(("plain", "paper"), {})
    for k in RUNS:
        if k not in by:
            continue
        rs = [by[k][s] for s in sorted(by[k])]
        acc = [r["test_accuracy"] for r in rs]
        common = [s for s in sorted(by[k]) if s in plain]
        if k == ("plain", "paper") or not common:
            delta = "–"
        else:
            d = [100 * (by[k][s]["test_accuracy"] - plain[s]["test_accuracy"]) for s in common]
            delta = f"{statistics.mean(d):+.2f}" + (f" ± {statistics.stdev(d):.2f}" if len(d) > 1 else "") + \
                f" ({sum(x > 0 for x in d)}/{len(d)} seeds > 0)"
        print(f"| {NAMES[k]} | {len(rs)} | {fmt(acc)} | {delta} | {fmt([r['test_accuracy_last'] for r in rs])} "
              f"| {fmt([r['test_f1'] for r in rs])} | {fmt([r['test_auc'] for r in rs])} "
              f"| {fmt([r['attn_grad_pearson'] for r in rs], pct=False)} | {statistics.mean(r['seconds'] for r in rs):.0f} |")
    print("\ntest acc % per epoch, mean over seeds (dev AUC picks the epoch; dev = held-out training phrases):")
    for k in RUNS:
        if k in by:
            rs = list(by[k].values())
            n_ep = len(rs[0]["history"])
            print(f"- {NAMES[k]}: " + ", ".join(
                f"ep {e + 1}: {100 * statistics.mean(r['history'][e]['test_accuracy'] for r in rs):.2f}"
                for e in range(n_ep)))
    print("\nper seed (test acc %, best epoch):")
    for k in RUNS:
        if k in by:
            print(f"- {NAMES[k]}: " + ", ".join(f"seed {s}: {100 * by[k][s]['test_accuracy']:.2f} (ep {by[k][s]['best_epoch']})"
                                               for s in sorted(by[k])))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--train-size", type=int, default=20000)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--xi", type=float, default=1.0)
    ap.add_argument("--out", default="results/zoo_at_sst2.jsonl")
    ap.add_argument("--report-only", action="store_true")
    a = ap.parse_args()
    out = Path(a.out)
    if not a.report_only:
        base = dict(train_size=a.train_size, epochs=a.epochs, xi=a.xi)
        data = load_sst2(ATConfig(**base))
        print({k: len(v) for k, v in data.items()}, flush=True)
        t0 = time.perf_counter()
        for seed in a.seeds:
            for mode, variant in RUNS:
                r = train_classifier(ATConfig(mode=mode, iat_variant=variant, seed=seed, **base), data, progress=True)
                print(f"== {NAMES[(mode, variant)]} seed {seed}: test acc {r['test_accuracy']:.4f} "
                      f"(best epoch {r['best_epoch']}), {r['seconds']:.0f} s", flush=True)
                with out.open("a") as f:
                    f.write(json.dumps(r) + "\n")
        print(f"total wall time {time.perf_counter() - t0:.0f} s", flush=True)
    rows = [json.loads(line) for line in out.read_text().splitlines() if line.strip()]
    report(rows)


if __name__ == "__main__":
    sys.exit(main())
