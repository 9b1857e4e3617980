"""Needle retention: which layers and KV heads still hold the needle after a KV-eviction method has run.

A RULER NIAH prompt goes through the model inside ``attnkit.apply`` for each method at one KV budget; after
generation we look at the absolute positions each (layer, KV head) still holds and ask whether it holds every
token of the needle's value (e.g. the 7 digits of the magic number). Scores alone say *that* a method lost the
needle; this says *where*. Only methods of kind "stored" (they evict) make sense here: a "read" method such as
tokenselect keeps every token and chooses at each step.

    python benchmarks/needle_retention.py --methods snapkv,h2o,streaming_llm --budget 1024 \\
        --task niah_single_2 --length 4096 --samples 10 --out results/needle_retention

Prints a Markdown table (score, and the share of KV heads holding the whole needle in the first, middle and last
third of the layers) and writes ``retention.json`` (per sample, method and layer) to ``--out``, after every
sample, so an interrupted run keeps what it measured and a rerun skips it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repository's attnkit importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import attnkit  # noqa: E402
from attnkit.eval.sample import METRICS, build_prompt  # noqa: E402
from attnkit.eval.tasks import get_task  # noqa: E402
from attnkit.registry import method_class  # noqa: E402


def value_span(tokenizer, ids: list[int], value: str, longest: int = 16) -> range:
    """Token positions [a, b) of the first occurrence of ``value`` in ``ids``: the shortest span decoding to it."""
    end = next((b for b in range(1, len(ids) + 1) if value in tokenizer.decode(ids[max(0, b - longest) : b])), None)
    if end is None:
        raise ValueError(f"value {value!r} not found in the prompt")
    start = max(a for a in range(max(0, end - longest), end) if value in tokenizer.decode(ids[a:end]))
    return range(start, end)


def retention(run, span: range) -> list[float]:
    """Per layer: the share of KV heads (over the batch) holding every position of ``span``."""
    want = torch.tensor(list(span))
    out = []
    for i in range(len(run.cache.layers)):
        pos = run.kept_positions(i).cpu()  # (B, Hkv, n)
        held = (pos[..., None] == want).any(-2).all(-1)  # (B, Hkv)
        out.append(float(held.float().mean()))
    return out


def thirds(values: list[float]) -> list[float]:
    n = len(values)
    cuts = [0, n // 3, 2 * n // 3, n]
    return [sum(values[a:b]) / max(1, b - a) for a, b in zip(cuts, cuts[1:])]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="snapkv,h2o,streaming_llm")
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--task", default="niah_single_2")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--out", default="results/needle_retention")
    args = ap.parse_args(argv)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for name in methods:
        try:
            kind = method_class(name).kind
        except ValueError as err:  # unknown name: the registry's did-you-mean message
            ap.error(str(err))
        if kind != "stored":
            ap.error(f"method '{name}' is of kind '{kind}': it keeps every token; "
                     "accepted: methods that evict (kind 'stored')")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    store = out_dir / "retention.json"
    params = {k: getattr(args, k) for k in ("model", "budget", "task", "length", "seed", "dtype")}
    done = json.loads(store.read_text()) if store.exists() else {}
    if done.get("params") != params:
        done = {"params": params, "rows": []}
    have = {(r["method"], r["sample"]) for r in done["rows"]}

    model, tokenizer = attnkit.load_model(args.model, device=args.device, dtype=args.dtype)
    samples = get_task(args.task).samples(tokenizer, args.length, args.samples, args.seed, chat=True)
    for s in samples:
        ids = build_prompt(tokenizer, s, chat=True)
        span = value_span(tokenizer, ids, s.references[0])
        for name in methods:
            if (name, s.index) in have:
                continue
            method = method_class(name).for_budget(args.budget)
            with attnkit.apply(model, method) as run:
                gen = attnkit.generate(model, tokenizer, ids, max_new_tokens=s.max_new_tokens)
                layers = retention(run, span)
            row = {"method": name, "sample": s.index, "score": float(METRICS[s.metric](gen.text, s.references)),
                   "needle_tokens": [span.start, span.stop], "prompt_tokens": len(ids),
                   "prediction": gen.text, "layers": layers}
            done["rows"].append(row)
            # after every sample, via a rename: an interrupt keeps the last complete file
            tmp = store.with_suffix(".tmp")
            tmp.write_text(json.dumps(done, indent=1))
            os.replace(tmp, store)
            print(f"{name} sample {s.index}: score {row['score']:.2f}, needle at {span.start}-{span.stop} "
                  f"of {len(ids)}, heads holding it by layer third {[round(x, 2) for x in thirds(layers)]}",
                  file=sys.stderr)

    print(f"\n{args.task} at {args.length} tokens, budget {args.budget}, {args.model}\n")
    print("| method | samples | score | heads holding the needle: first third | middle | last third |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in methods:
        rows = [r for r in done["rows"] if r["method"] == name]
        if not rows:
            continue
        layer_means = [sum(col) / len(rows) for col in zip(*(r["layers"] for r in rows))]
        score = 100 * sum(r["score"] for r in rows) / len(rows)
        cells = " | ".join(f"{100 * x:.0f}%" for x in thirds(layer_means))
        print(f"| {name} | {len(rows)} | {score:.0f} | {cells} |")


if __name__ == "__main__":
    main()
