"""Streaming perplexity: how each KV-cache policy copes as the text grows past its budget and the trained context.

The first N tokens of Paul Graham's essays go through the model ``--chunk`` tokens at a time inside
``attnkit.apply``, once per method, and we record the per-position negative log-likelihood (position i holds
-log p(token[i+1] | tokens[:i+1]), so its query sits at absolute position i). With a KV budget B:

* ``full`` keeps every token: the reference, which degrades once positions pass the trained context;
* ``window`` keeps the B most recent tokens: it collapses once the first tokens leave the cache (position > B);
* ``streaming_llm`` keeps 4 attention sinks + the B - 4 most recent tokens, with cache-relative positions:
  it should track ``full`` within the trained context and stay flat beyond it.

Outputs in ``--out``: ``nll_<method>.npy`` (one per method, written as soon as it finishes; reruns skip the ones
that exist for the same model/tokens/budget/chunk/dtype recorded in ``params.json``), ``streaming_ppl.csv``
(position, NLL per method), ``summary.csv`` (PPL per range and method), ``streaming_ppl.png`` (NLL, 256-token
moving average, against position) and a Markdown table on stdout. With N >= 2B, two acceptance checks are printed:
streaming_llm PPL within 10% of full, and window PPL at least 1.5x full past the budget (both measured up to the
trained context). Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository's attnkit importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import attnkit  # noqa: E402
from attnkit.data import essay_tokens  # noqa: E402
from attnkit.session import text_config  # noqa: E402

SMOOTH = 256


def method_settings(method: str, budget: int) -> dict[str, int]:
    """Settings giving ``method`` a KV budget of ``budget`` tokens."""
    return {"window": {"window": budget}, "streaming_llm": {"sinks": 4, "window": budget - 4}}.get(method, {})


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="attnkit.load_model name or path")
    p.add_argument("--tokens", type=int, default=4096, help="N: tokens of essay text to score")
    p.add_argument("--budget", type=int, default=1024, help="KV budget B (window=B; streaming_llm 4 sinks + B-4)")
    p.add_argument("--methods", default="full,window,streaming_llm", help="comma-separated attnkit methods")
    p.add_argument("--chunk", type=int, default=256, help="tokens fed per forward")
    p.add_argument("--out", type=Path, default=Path("results/streaming_ppl"), help="output folder")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32/bfloat16/float16 (default: load_model's choice)")
    p.add_argument("--overwrite", action="store_true", help="discard results made with other parameters")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.budget <= 4 or args.tokens < 2 or args.chunk < 1:
        p.error("need --budget > 4, --tokens >= 2 and --chunk >= 1")
    for m in args.methods:  # fail on a bad name or setting before loading anything
        try:
            attnkit.make_method(m, **method_settings(m, args.budget))
        except ValueError as err:
            p.error(str(err))
    return args


def write_atomic(path: Path, write: Any) -> None:
    """Call ``write(file)`` on a temp file next to ``path``, then rename it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        write(f)
    os.replace(tmp, path)


def check_params(out: Path, params: dict[str, Any], overwrite: bool) -> None:
    """Record ``params`` in ``out/params.json``; refuse (or with ``overwrite`` clear) results made with others."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "params.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != params:
            diff = ", ".join(f"{k}: {old.get(k)!r} -> {v!r}" for k, v in params.items() if old.get(k) != v)
            if not overwrite:
                sys.exit(f"{out} holds results for other parameters ({diff}); pass --overwrite or another --out")
            for f in out.glob("nll_*.npy"):
                f.unlink()
    write_atomic(path, lambda f: f.write(json.dumps(params, indent=1).encode()))


def ppl(nll: np.ndarray, a: int, b: int) -> float:
    part = nll[a:b]
    return float(math.exp(part.astype(np.float64).mean())) if part.size else float("nan")


def ranges(n: int, budget: int) -> list[tuple[str, int, int]]:
    """(label, start, end) NLL-index ranges: the budget windows, the whole text, then fixed-size segments."""
    out = [(f"[0, {budget})", 0, min(budget, n))]
    if n > budget:
        out += [(f"[{budget}, {min(2 * budget, n)})", budget, min(2 * budget, n)), (f"[{budget}, {n})", budget, n)]
    out.append((f"all [0, {n})", 0, n))
    seg = 1024 if n >= 2048 else max(1, -(-n // 8))
    out += [(f"seg [{a}, {min(a + seg, n)})", a, min(a + seg, n)) for a in range(0, n, seg)]
    return out


def plot(path: Path, nlls: dict[str, np.ndarray], budget: int, trained: int | None, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for name, nll in nlls.items():
        k = min(SMOOTH, len(nll))
        smooth = np.convolve(nll, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(len(smooth)) + (k - 1) / 2, smooth, label=name, lw=1.2)
    n = max(len(v) for v in nlls.values())
    ax.axvline(budget, color="gray", ls="--", lw=1, label=f"KV budget {budget}")
    if trained and trained < n:
        ax.axvline(trained, color="black", ls="--", lw=1, label=f"trained context {trained}")
    ax.set(xlabel="position", ylabel=f"NLL = log PPL (nats, {SMOOTH}-token moving avg.)", xlim=(0, n))
    ax.set_title(f"{model}: streaming perplexity on Paul Graham essays")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    params = {"model": args.model, "tokens": args.tokens, "budget": args.budget, "chunk": args.chunk,
              "dtype": args.dtype}
    out: Path = args.out
    check_params(out, params, args.overwrite)
    timings_path = out / "timings.json"
    timings: dict[str, float] = json.loads(timings_path.read_text()) if timings_path.exists() else {}

    model, tok = attnkit.load_model(args.model, device=args.device, dtype=args.dtype)
    trained = getattr(text_config(model), "max_position_embeddings", None)
    ids = essay_tokens(tok, args.tokens)
    nlls: dict[str, np.ndarray] = {}
    for method in args.methods:
        path = out / f"nll_{method}.npy"
        if path.exists():
            nlls[method] = np.load(path)
            if len(nlls[method]) == args.tokens - 1:
                print(f"[{method}] reusing {path}", flush=True)
                continue
        settings = method_settings(method, args.budget)
        print(f"[{method}] {settings or ''} on {args.tokens} tokens", flush=True)
        t0 = time.perf_counter()
        with attnkit.apply(model, method, **settings):
            nll = attnkit.perplexity(model, tok, ids, chunk=args.chunk, progress=True).numpy()
        timings[method] = round(time.perf_counter() - t0, 1)
        write_atomic(path, lambda f: np.save(f, nll))
        write_atomic(timings_path, lambda f: f.write(json.dumps(timings, indent=1).encode()))
        nlls[method] = nll
        print(f"[{method}] PPL {ppl(nll, 0, len(nll)):.2f} in {timings[method]:.0f} s", flush=True)

    n = args.tokens - 1
    names = list(nlls)
    with (out / "streaming_ppl.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["position", *names])
        w.writerows([i, *(f"{nlls[m][i]:.5f}" for m in names)] for i in range(n))
    rows = [(label, a, b, [ppl(nlls[m], a, b) for m in names]) for label, a, b in ranges(n, args.budget)]
    with (out / "summary.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["range", "start", "end", *names])
        w.writerows([label, a, b, *(f"{v:.4f}" for v in vals)] for label, a, b, vals in rows)
    plot(out / "streaming_ppl.png", nlls, args.budget, trained, args.model)

    print(f"\n{args.model}, {args.tokens} tokens, KV budget {args.budget}, chunk {args.chunk}; "
          f"trained context {trained} (* = segment past it). PPL per position range:\n")
    print("| range | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for label, a, b, vals in rows:
        star = "*" if trained and label.startswith("seg") and b > trained else ""
        print(f"| {label}{star} | " + " | ".join(f"{v:.2f}" for v in vals) + " |")
    print("\nseconds per method: " + ", ".join(f"{m} {timings.get(m, float('nan')):.0f}" for m in names))
    print(f"wrote {out}/streaming_ppl.csv, summary.csv, streaming_ppl.png")

    ok = True
    if args.tokens >= 2 * args.budget and "full" in nlls:
        end = min(n, trained or n)  # compare inside the trained context, where full attention is the reference
        full = nlls["full"]
        if "streaming_llm" in nlls:
            r = ppl(nlls["streaming_llm"], 0, end) / ppl(full, 0, end)
            ok &= abs(r - 1) <= 0.10
            print(f"{'PASS' if abs(r - 1) <= 0.10 else 'FAIL'}: streaming_llm PPL / full PPL on [0, {end}) = "
                  f"{r:.3f} (want within 10%)")
        if "window" in nlls:
            r = ppl(nlls["window"], args.budget, end) / ppl(full, args.budget, end)
            ok &= r >= 1.5
            print(f"{'PASS' if r >= 1.5 else 'FAIL'}: window PPL / full PPL on [{args.budget}, {end}) = "
                  f"{r:.2f} (want >= 1.5)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
