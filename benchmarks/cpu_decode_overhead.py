"""CPU decode cost per method on SmolLM2-135M (float32): a method's bookkeeping must stay small where attention is.

Prefills an ``--context``-token prompt (Paul Graham essays) once through each method at one KV budget, then
times ``--repeats`` continuations of ``--new-tokens`` greedy tokens each from that cache (EOS off) and prints the
median ms per decoded token and the ratio to ``full`` measured in the same process (target: every method <= 1.1x
full at 8K). A busy machine makes these figures meaningless: run it alone.

    python benchmarks/cpu_decode_overhead.py --context 8192 --budget 1024 --new-tokens 32 --methods full,tokenselect,full,fasa
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import json
from pathlib import Path

import torch

import attnkit
from attnkit.data import essays_text
from attnkit.cli import parse_setting
from attnkit.registry import method_class


class NoEos:
    def __init__(self, tok):
        self.tok, self.eos_token_id, self.pad_token_id = tok, None, 0

    def decode(self, ids, skip_special_tokens=True):
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def profile_decode(model, tok, ids, tokens: int, top: int = 12) -> list[dict]:
    """Self CPU time per op over ``tokens`` forwards of one token each: the prompt is prefilled unprofiled, then
    the generation continues from its cache state, the second continuation under the profiler."""
    from torch.profiler import ProfilerActivity, profile

    g = attnkit.generate(model, NoEos(tok), ids, max_new_tokens=1, prefill_chunk=512, stop_at_eos=False)
    # the first continuation grows the cache (sized for one new token) once; the profiled one runs inside it
    g = attnkit.generate(model, NoEos(tok), [g.tokens[-1]], cache=g.state, max_new_tokens=tokens,
                         stop_at_eos=False, eos_check_every=1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        attnkit.generate(model, NoEos(tok), [g.tokens[-1]], cache=g.state, max_new_tokens=tokens,
                         stop_at_eos=False, eos_check_every=1)
    rows = [{"op": e.key, "ms_per_token": e.self_cpu_time_total / 1000 / tokens, "calls_per_token": e.count / tokens}
            for e in prof.key_averages()]
    rows.sort(key=lambda r: -r["ms_per_token"])
    total = sum(r["ms_per_token"] for r in rows)
    print(f"  profiled decode: {total:.1f} ms/token of self CPU time (profiler overhead included); top ops:")
    for r in rows[:top]:
        print(f"    {r['op']:<48} {r['ms_per_token']:7.2f} ms  {r['calls_per_token']:6.1f} calls")
    return rows[:40]


def build(spec: str, budget: int):
    """``NAME`` or ``NAME:KEY=VALUE:...`` -> the method at ``budget`` with those settings changed
    (e.g. ``tokenselect:selection_cache=true``)."""
    name, *items = spec.split(":")
    method = method_class(name).for_budget(budget)
    return dataclasses.replace(method, **dict(parse_setting(item) for item in items)) if items else method


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--methods", default="full,window,streaming_llm,h2o,snapkv,tokenselect,quest")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--warmup-tokens", type=int, default=4, help="untimed decode steps after each method's prefill, "
                    "then one untimed continuation, so one-time costs (allocator growth, oneDNN primitives for new "
                    "shapes, the cache growing once) do not land on the timed steps")
    ap.add_argument("--repeats", type=int, default=3, help="timed continuations of --new-tokens each from the same "
                    "cache; the median is reported")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="also profile N decoded tokens per method "
                    "(torch.profiler, CPU) and print the top self-time ops: where a method's extra time goes")
    ap.add_argument("--out", type=Path, default=Path("results/cpu_decode_overhead.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = attnkit.load_model("smollm2-135m")
    ids = tok(essays_text(), return_tensors="pt").input_ids[:, : args.context - 1]
    rows = {}
    for spec in args.methods.split(","):
        method = build(spec, args.budget)
        name = spec if spec not in rows else f"{spec}#{sum(k.split('#')[0] == spec for k in rows) + 1}"
        with attnkit.apply(model, method) as run:
            # one prefill; its decode steps and a first continuation (which grows the cache once) are untimed
            g = attnkit.generate(model, NoEos(tok), ids, max_new_tokens=1 + args.warmup_tokens, prefill_chunk=512,
                                 stop_at_eos=False)
            prefill_s = g.prefill_s
            g = attnkit.generate(model, NoEos(tok), [g.tokens[-1]], cache=g.state, max_new_tokens=args.new_tokens,
                                 stop_at_eos=False, eos_check_every=1)
            samples = []
            for _ in range(args.repeats):
                g = attnkit.generate(model, NoEos(tok), [g.tokens[-1]], cache=g.state,
                                     max_new_tokens=args.new_tokens, stop_at_eos=False, eos_check_every=1)
                samples.append(1000 * g.s_per_token)
            rows[name] = {"ms_per_token": statistics.median(samples), "samples_ms": samples, "prefill_s": prefill_s,
                          "settings": method.settings()}
            extra = method.extra_stats(run)
            if extra:
                rows[name]["stats"] = extra
            print(f"{name}: {rows[name]['ms_per_token']:.1f} ms/token" + (f" {extra}" if extra else ""), flush=True)
            if args.profile:
                rows[name]["profile"] = profile_decode(model, tok, ids, args.profile)
    # full may be listed more than once (between the others, against drift of the machine): its mean is the base
    fulls = [r["ms_per_token"] for k, r in rows.items() if k.split("#")[0] == "full"]
    base = statistics.mean(fulls) if fulls else float("nan")
    print(f"\nSmolLM2-135M float32, CPU ({torch.get_num_threads()} threads), context {ids.shape[1]}, budget "
          f"{args.budget}, {args.new_tokens} new tokens")
    print("| method | ms / token | vs full | prefill s |")
    print("| --- | ---: | ---: | ---: |")
    for name, r in rows.items():
        r["vs_full"] = r["ms_per_token"] / base
        print(f"| {name} | {r['ms_per_token']:.1f} | {r['vs_full']:.2f}x | {r['prefill_s']:.1f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"torch": torch.__version__, "args": vars(args) | {"out": str(args.out)},
                                    "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
