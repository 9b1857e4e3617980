"""The README's Markdown table from a `sinks_fidelity.py` JSON: accuracy per task and method, the paired change
against `full` with its 95% bootstrap interval, and the mean change per task family (classification, multiple
choice) over the tasks each method reached.

    python benchmarks/sinks_table.py docs/results/sinks_smollm2.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

NAMES = {"sst2": "SST-2", "sst5": "SST-5", "mr": "MR", "subj": "Subj", "trec": "TREC", "agnews": "AG News",
         "cb": "CB", "boolq": "BoolQ", "rte": "RTE", "arc_easy": "ARC-E", "arc_challenge": "ARC-C",
         "hellaswag": "HellaSwag", "piqa": "PIQA", "openbookqa": "OpenBookQA", "commonsenseqa": "CommonsenseQA",
         "mmlu": "MMLU"}
CLASSIFICATION = ("sst2", "sst5", "mr", "subj", "trec", "agnews", "cb", "boolq", "rte")
METHODS = ("zerotuning", "zerotuning_entropy", "act")
HEADER = ("task", "n", "full", "zerotuning", "zerotuning (entropy)", "act")


def cell(run: dict | None) -> str:
    """'68.2 (+6.0 [+1.2, +10.8])' for a calibrated run, 'not run' where there is none."""
    if run is None:
        return "not run"
    if "vs_full" not in run:
        return f"{run['accuracy']:.1f}"
    d, lo, hi = run["vs_full"]
    return f"{run['accuracy']:.1f} ({d:+.1f} [{lo:+.1f}, {hi:+.1f}])"


def family_means(runs: dict, family: tuple[str, ...]) -> dict[str, tuple[float, int, int]]:
    """method -> (mean change in points, tasks with a gain, tasks measured) over the family's tasks."""
    out = {}
    for m in METHODS:
        diffs = [r[m]["vs_full"][0] for t, r in runs.items() if t in family and m in r and "vs_full" in r[m]]
        if diffs:
            out[m] = (sum(diffs) / len(diffs), sum(d > 0 for d in diffs), len(diffs))
    return out


def table(data: dict) -> str:
    runs = {t: data["runs"][t] for t in NAMES if t in data["runs"] and "full" in data["runs"][t]}
    lines = ["| " + " | ".join(HEADER) + " |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for t, r in runs.items():
        lines.append(f"| {NAMES[t]} | {r['full']['n']} | {r['full']['accuracy']:.1f} | "
                     + " | ".join(cell(r.get(m)) for m in METHODS) + " |")
    for label, family in (("classification", CLASSIFICATION),
                          ("multiple choice", tuple(t for t in NAMES if t not in CLASSIFICATION))):
        means = family_means(runs, family)
        if means:
            lines.append(f"| mean change, {label} | | | " + " | ".join(
                f"{means[m][0]:+.1f} (gains on {means[m][1]} of {means[m][2]})" if m in means else "-"
                for m in METHODS) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", type=Path)
    args = ap.parse_args(argv)
    print(table(json.loads(args.json.read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
