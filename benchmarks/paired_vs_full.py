"""Each method of an ``attnkit eval`` database against ``full``, sample by sample: per-task scores, the mean over
tasks of the paired difference with a 95% bootstrap interval (samples resampled within each task), and the share of
dense; for perplexity tasks the mean ratio to ``full`` per sample with its interval.

    python benchmarks/paired_vs_full.py docs/results/sparse_gemma3_gpu.db --length 16384

A method with rows under several settings (a field added between runs changes the cell key) is compared under its
newest settings; the others are named and left out. Markdown goes to stdout.
"""

from __future__ import annotations

import argparse
import gzip
import lzma
import random
import shutil
import sqlite3
import tempfile
from collections import defaultdict
from pathlib import Path


def load(db: Path, length: int, model: str | None) -> dict:
    """{(method, budget): {task: {sample: score}}} at this length, each method under its newest settings. A
    ``.db.gz`` / ``.db.xz`` file is read from a decompressed temporary copy."""
    copy = None
    if db.suffix in (".gz", ".xz"):
        tmp = tempfile.NamedTemporaryFile(suffix=".db", delete=False)
        with (gzip.open if db.suffix == ".gz" else lzma.open)(db) as src, tmp:
            shutil.copyfileobj(src, tmp)
        db = copy = Path(tmp.name)
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    query = "select method, budget, settings_json, task, sample_index, score, created_at from results where length = ?"
    args: list = [length]
    if model:
        query += " and model = ?"
        args.append(model)
    newest: dict = {}
    rows = con.execute(query, args).fetchall()
    con.close()
    if copy:
        copy.unlink()
    for method, budget, settings, *_, created in rows:
        key = (method, budget)
        if key not in newest or created > newest[key][1]:
            newest[key] = (settings, created)
    out: dict = defaultdict(lambda: defaultdict(dict))
    skipped: dict = defaultdict(int)
    for method, budget, settings, task, sample, score, _ in rows:
        if settings != newest[(method, budget)][0]:
            skipped[(method, budget, settings)] += 1
            continue
        out[(method, budget)][task][sample] = score
    for (method, budget, settings), n in skipped.items():
        print(f"<!-- left out: {n} rows of {method} {budget or ''} under older settings {settings[:80]}... -->")
    return out


def paired(full: dict, other: dict, ratio: bool, draws: int, seed: int) -> tuple[float, float, float, int, float]:
    """Mean over tasks of the per-task mean of other - full (or other / full), a 95% bootstrap interval that
    resamples each task's shared samples, the number of tasks shared, and full's mean over the shared samples."""
    pairs = {t: [(full[t][s], other[t][s]) for s in sorted(set(full[t]) & set(other[t]))] for t in full if t in other}
    pairs = {t: p for t, p in pairs.items() if p}
    if not pairs:
        return float("nan"), float("nan"), float("nan"), 0, float("nan")

    def stat(sample: dict) -> float:
        per = [sum((b / a) if ratio else (b - a) for a, b in p) / len(p) for p in sample.values()]
        return sum(per) / len(per)

    rng = random.Random(seed)
    boot = sorted(stat({t: rng.choices(p, k=len(p)) for t, p in pairs.items()}) for _ in range(draws))
    base = sum(sum(a for a, _ in p) / len(p) for p in pairs.values()) / len(pairs)
    return stat(pairs), boot[int(0.025 * draws)], boot[int(0.975 * draws) - 1], len(pairs), base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("db", type=Path)
    ap.add_argument("--length", type=int, required=True)
    ap.add_argument("--model")
    ap.add_argument("--samples", type=int, default=20, help="samples that make a task's cell complete")
    ap.add_argument("--draws", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not args.db.is_file():
        raise SystemExit(f"{args.db}: no such database")
    cells = load(args.db, args.length, args.model)
    fulls = [k for k in cells if k[0] == "full"]
    if not fulls:
        raise SystemExit(f"{args.db}: no `full` rows at length {args.length}")
    full = cells[fulls[0]]
    ppl = sorted(t for t in full if t.startswith("ppl"))
    tasks = sorted(t for t in full if not t.startswith("ppl"))
    order = [fulls[0]] + sorted(k for k in cells if k[0] != "full")
    if tasks:
        print(f"| {args.length} | " + " | ".join(tasks) + " | mean | share of dense (shared samples) | "
              "paired vs full, points (95% bootstrap) | tasks (complete) |")
        print("| --- " * (len(tasks) + 5) + "|")
        for key in order:
            got = cells[key]
            means = [100 * sum(got[t].values()) / len(got[t]) if got.get(t) else None for t in tasks]
            shown = [f"{m:.1f}" + ("" if len(got[t]) >= args.samples else f" ({len(got[t])})") if m is not None
                     else "" for m, t in zip(means, tasks)]
            have = [m for m in means if m is not None]
            mean = sum(have) / len(have) if have else float("nan")
            name = f"{key[0]} {key[1]}".strip()
            if key[0] == "full":
                print(f"| {name} | " + " | ".join(shown) + f" | {mean:.2f} | | | |")
                continue
            d, lo, hi, n, base = paired({t: full[t] for t in tasks}, {t: got[t] for t in tasks if t in got}, False,
                                  args.draws, args.seed)
            complete = sum(len(got.get(t, {})) >= args.samples for t in tasks)
            print(f"| {name} | " + " | ".join(shown) + f" | {mean:.2f} | {(base + d) / base:.2f} | "
                  f"{100 * d:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}] | {n} ({complete}) |")
    for t in ppl:
        print(f"\n| {t} at {args.length} | samples | mean perplexity | ratio to full per sample (95% bootstrap) |")
        print("| --- | ---: | ---: | ---: |")
        for key in order:
            got = cells[key].get(t)
            if not got:
                continue
            name = f"{key[0]} {key[1]}".strip()
            mean = sum(got.values()) / len(got)
            if key[0] == "full":
                print(f"| {name} | {len(got)} | {mean:.2f} | |")
                continue
            r, lo, hi, *_ = paired({t: full[t]}, {t: got}, True, args.draws, args.seed)
            print(f"| {name} | {len(got)} | {mean:.2f} | {r:.3f} [{lo:.3f}, {hi:.3f}] |")


if __name__ == "__main__":
    main()
