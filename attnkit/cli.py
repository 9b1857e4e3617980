"""Command line: ``attnkit methods | generate | ppl | eval | calibrate | report | analyze | zoo``.

Every expected error (bad method or setting, unknown model, missing file, method that cannot run on the model)
is reported as one ``attnkit: error: ...`` line with exit code 2 (130 on Ctrl-C); ``--debug`` re-raises instead.
Methods and their settings are validated before the model is loaded, so typos fail instantly.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

import attnkit
from attnkit.inference import encode
from attnkit.methods.base import Method
from attnkit.session import text_config

MiB = 2**20


def load(name: str, device: str, dtype: str | None) -> tuple[torch.nn.Module, Any]:
    """(model, tokenizer) for a model name; the one seam tests monkeypatch."""
    from attnkit.models import load_model  # imported late: loading pulls in GGUF machinery

    return load_model(name, device=device, dtype=dtype)


# -- argument parsing -------------------------------------------------------------------------------------------
def parse_value(text: str) -> Any:
    """A ``--set`` value: int, then float, then bool (true/false), else the string itself."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return text


def parse_setting(item: str) -> tuple[str, Any]:
    """``KEY=VALUE`` -> (key, parsed value)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got '{item}'")
    return key.strip(), parse_value(value.strip())


def parse_method_setting(item: str) -> tuple[str, str, Any]:
    """``METHOD.KEY=VALUE`` -> (method, key, parsed value)."""
    target, sep, value = item.partition("=")
    method, dot, key = target.strip().partition(".")
    if not sep or not dot or not method or not key:
        raise argparse.ArgumentTypeError(f"expected METHOD.KEY=VALUE, got '{item}'")
    return method, key, parse_value(value.strip())


def number_type(kind: type, lo: float, hi: float | None = None, open_lo: bool = False):
    """An argparse ``type``: a finite ``kind`` number >= lo (> lo with ``open_lo``) and <= hi, else a usage error
    naming the value and the accepted range."""

    def check(text: str):
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid {kind.__name__} value: '{text}'") from None
        if not math.isfinite(x):  # nan passes every comparison below
            raise argparse.ArgumentTypeError(f"{text} is out of range; accepted: a finite number")
        if (x <= lo if open_lo else x < lo) or (hi is not None and x > hi):
            bound = f"> {lo}" if open_lo else f">= {lo}"
            raise argparse.ArgumentTypeError(f"{text} is out of range; accepted: {bound}" + (f" and <= {hi}" if hi is not None else ""))
        return x

    return check


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--model", default="smollm2-135m", help="model name (default: %(default)s)")
    model.add_argument("--method", default="full", help="attention method (see `attnkit methods`; default: full)")
    model.add_argument("--set", dest="settings", action="append", default=[], type=parse_setting,
                       metavar="KEY=VALUE", help="method setting, repeatable (e.g. --set window=1020)")
    model.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    model.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                       help="default: float32 on CPU, bfloat16 on CUDA")

    parser = argparse.ArgumentParser(prog="attnkit", description=__doc__.split("\n")[0], parents=[common])
    parser.add_argument("--version", action="version", version=f"attnkit {attnkit.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("methods", parents=[common], help="list registered methods")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("generate", parents=[common, model], help="generate text with a method active")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", type=Path, help="read the prompt from a file ('-' for stdin)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="wrap the prompt in the tokenizer's chat template (default: on)")
    p.add_argument("--max-new-tokens", type=number_type(int, 1), default=64)
    p.add_argument("--prefill-chunk", type=number_type(int, 1), default=512)
    p.add_argument("--max-prompt-tokens", type=number_type(int, 1), help="refuse prompts longer than this")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=number_type(float, 0.0, open_lo=True), default=1.0)
    p.add_argument("--top-p", type=number_type(float, 0.0, 1.0, open_lo=True), default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text + stats")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("ppl", parents=[common, model], help="perplexity of a long text with a method active")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text-file", type=Path, help="text to score")
    src.add_argument("--essays", action="store_true", help="use the bundled essays")
    p.add_argument("--tokens", type=number_type(int, 2), default=4096, help="score at most this many tokens")
    p.add_argument("--chunk", type=number_type(int, 1), default=256, help="tokens per forward")
    p.add_argument("--csv", type=Path, help="write per-token NLL (target_pos,nll) to this file")
    p.set_defaults(func=cmd_ppl)

    p = sub.add_parser("eval", parents=[common], help="sweep models x methods x budgets x tasks x lengths into a "
                       "results database (resumable)")
    p.add_argument("--model", default="smollm2-135m", help="model name(s), comma-separated (default: %(default)s)")
    p.add_argument("--methods", default="full", help="comma-separated methods (default: %(default)s)")
    p.add_argument("--budgets", default="1024",
                   help="KV budgets, comma-separated: tokens (512) or a ratio of the context (0.25 or 25%%); "
                        "methods without a budget (full) run once (default: %(default)s)")
    p.add_argument("--tasks", default="ruler", help="task names or suites (ruler, retrieval, passkey, niah, ppl), "
                   "comma-separated (default: %(default)s)")
    p.add_argument("--lengths", default="4096", help="context lengths in tokens, comma-separated, e.g. 2048,4k "
                   "(default: %(default)s)")
    p.add_argument("--samples", type=number_type(int, 1), default=20, help="samples per cell (default: %(default)s)")
    p.add_argument("--seed", type=int, default=42, help="task seed (default: %(default)s)")
    p.add_argument("--db", type=Path, default=Path("results.db"), help="SQLite results database (default: %(default)s)")
    p.add_argument("--shard", default="0/1", help="run only shard i of n of the grid, e.g. 0/4 (default: all)")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: this process; ray: one Ray task per cell (one per GPU) (default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="wrap inputs in the tokenizer's chat template (default: on; --no-chat for base models)")
    p.add_argument("--prefill-chunk", type=number_type(int, 1), default=512, help="tokens per prefill forward")
    p.add_argument("--set", dest="settings", action="append", default=[], type=parse_method_setting,
                   metavar="METHOD.KEY=VALUE", help="override a method's setting in every cell, on top of its budget "
                   "mapping, e.g. fasa.profile=fasa.json; repeatable")
    p.add_argument("--batch", type=number_type(int, 1), default=1,
                   help="samples per padded generate call; rows of a batch share its timings (default: %(default)s)")
    p.add_argument("--plugin", dest="plugins", action="append", default=[], metavar="MODULE[:FUNC]",
                   help="import a module (and call FUNC) that registers tasks, methods or models; repeatable")
    p.add_argument("--gpu-memory-fraction", type=number_type(float, 0.0, 1.0, open_lo=True),
                   help="cap this process's CUDA memory at this share of the GPU (local executor): N shards "
                        "sharing one GPU each take under 1/N, so none holds cached memory another needs")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="hide the progress bar; print a timestamped line per finished cell instead")
    p.add_argument("--stall-dump", type=number_type(float, 0.0, open_lo=True), metavar="SECONDS",
                   help="when no sample is stored for this long, print every thread's stack on stderr and end with "
                        "status 1 (a hung batch job leaves its whereabouts; stored rows stay for a rerun)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("calibrate", parents=[common], help="calibration runs that methods load as profiles (JSON)")
    p.add_argument("target", choices=["fasa", "tidaldecode", "zerotuning", "act", "razorattention", "token_sparse",
                                       "tca"],
                   help="fasa: dominant frequency chunks per head; tidaldecode: the re-selection layer; "
                        "zerotuning: heads and gamma on a task's calibration split; act: ACT's head filter; "
                        "razorattention: echo / induction head scores; token_sparse: representation drift "
                        "per layer (its sparse layers); tca: per-head budget configurations")
    p.add_argument("--model", default="smollm2-135m", help="model name (default: %(default)s)")
    p.add_argument("-o", "--out", type=Path, required=True, help="profile to write (JSON)")
    p.add_argument("--samples", type=number_type(int, 1),
                   help="calibration prompts (default: 8; zerotuning / act: 64 per task)")
    p.add_argument("--tokens", type=number_type(int, 16), default=2048,
                   help="tokens per prompt, taken from the bundled essays (default: %(default)s)")
    p.add_argument("--new-tokens", type=number_type(int, 1), default=32, help="decode steps per prompt")
    p.add_argument("--budgets", default=",".join(map(str, (128, 256, 512, 1024, 2048, 4096))),
                   help="top-K sizes to calibrate, comma-separated (default: %(default)s)")
    p.add_argument("--dense-layers", type=number_type(int, 0), default=2,
                   help="tidaldecode: dense layers before its selection layer (default: %(default)s, its default)")
    p.add_argument("--task", default="sst2",
                   help="zerotuning / act: choice task(s) whose calibration split is scored, comma-separated "
                        "(default: %(default)s)")
    p.add_argument("--objective", choices=["accuracy", "entropy"], default="accuracy",
                   help="zerotuning / act: supervised accuracy, or ZeroTuning's unsupervised output entropy")
    p.add_argument("--mode", choices=["head", "layer"], default="head",
                   help="zerotuning: probe each (layer, head) or each whole layer (default: %(default)s)")
    p.add_argument("--shots", type=number_type(int, 0), default=0, help="zerotuning / act: demonstrations per prompt")
    p.add_argument("--variants", type=number_type(int, 1),
                   help="zerotuning / act: candidates scored per forward (default: 8 on CUDA, 1 on the CPU; "
                        "lower it if a forward of that many copies of the rows runs out of memory)")
    p.add_argument("--pairing", choices=["rope", "code"], default="rope",
                   help="frequency-chunk pairing: rope (i, i + D/2) or code (2i, 2i + 1) (default: %(default)s)")
    p.add_argument("--length", type=number_type(int, 2), default=2500,
                   help="razorattention: random tokens per repeat, capped to the context (default: %(default)s)")
    p.add_argument("--repeats", type=number_type(int, 2), default=4,
                   help="razorattention: repeats of the random sequence (default: %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("report", parents=[common], help="HTML + Markdown report of a results database")
    p.add_argument("db", type=Path, help="results database written by `attnkit eval`")
    p.add_argument("-o", "--out", type=Path, default=Path("report"), help="output folder (default: %(default)s)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("analyze", parents=[common], help="attention sinks, massive activations, cosine to the first "
                       "token, echo/induction and streaming heads, attention maps -> analysis.json + analysis.html")
    p.add_argument("model", help="model name, as for `attnkit eval` (e.g. smollm2-135m)")
    p.add_argument("-o", "--out", type=Path, required=True, help="output folder")
    p.add_argument("--samples", type=number_type(int, 1), default=100,
                   help="sink metric windows (default: %(default)s)")
    p.add_argument("--tokens", type=number_type(int, 2), default=64, help="tokens per window (default: %(default)s)")
    p.add_argument("--eps", type=number_type(float, 0.0, 1.0), default=0.3,
                   help="sink threshold (default: %(default)s)")
    p.add_argument("--heads-length", type=number_type(int, 2), default=2500,
                   help="random tokens per repeat for echo/induction scores, capped to the context "
                        "(default: %(default)s)")
    p.add_argument("--repeats", type=number_type(int, 2), default=4, help="repeats of the random tokens (default: 4)")
    p.add_argument("--residual-tokens", type=number_type(int, 2), default=256,
                   help="tokens per window for massive activations and cosine to first (default: %(default)s)")
    p.add_argument("--streaming-tokens", type=number_type(int, 70), default=512,
                   help="tokens per window for the streaming-head mass (default: %(default)s)")
    p.add_argument("--layers", help="attention-map layers, comma-separated (default: first, middle, last)")
    p.add_argument("--seed", type=int, default=0, help="seed of the windows and random tokens (default: 0)")
    p.add_argument("--random-init", action="store_true",
                   help="re-initialise the weights at random (a same-shape control model)")
    cmp = p.add_mutually_exclusive_group()
    cmp.add_argument("--compare", metavar="MODEL2", help="analyse a second model and put both side by side")
    cmp.add_argument("--method", default="full", help="compare the model without and with this attnkit method")
    p.add_argument("--set", dest="settings", action="append", default=[], type=parse_setting, metavar="KEY=VALUE",
                   help="setting of --method, repeatable (e.g. --set window=32)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   help="default: float32 on CPU, bfloat16 on CUDA (probabilities are float32 either way)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bars")
    p.set_defaults(func=cmd_analyze)

    from attnkit.zoo.cli import add_parsers as add_zoo_parsers  # `attnkit zoo ...`, kept in its own module

    add_zoo_parsers(sub, common, parse_method_setting)
    return parser


# -- helpers ----------------------------------------------------------------------------------------------------
def method_from(args: argparse.Namespace) -> Method:
    """The method with its settings, validated (raises ValueError) before any model is loaded."""
    return attnkit.make_method(args.method, **dict(args.settings))


def read_text(path: Path) -> str:
    return sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")


def warn_context(model: torch.nn.Module, method: Method, name: str, tokens: int) -> None:
    """One-line warning when an unbounded method runs past the model's trained context (it degrades, not fails)."""
    max_pos = getattr(text_config(model), "max_position_embeddings", None)
    if method.kv_budget() is None and max_pos and tokens > max_pos:
        print(f"attnkit: warning: {tokens} tokens exceed {name}'s context of {max_pos} positions; "
              f"{method.name} keeps them all and will degrade (a method with a KV budget, e.g. streaming_llm, "
              "will not)", file=sys.stderr)


# -- commands ---------------------------------------------------------------------------------------------------
def cmd_methods(args: argparse.Namespace) -> int:
    rows = attnkit.methods()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = [("NAME", "KIND", "DEFAULTS", "SUMMARY")]
    for m in rows:
        defaults = " ".join(f"{k}={v}" for k, v in m["defaults"].items()) or "-"
        table.append((m["name"], m["kind"], defaults, m["summary"]))
    widths = [max(len(r[i]) for r in table) for i in range(3)]
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[3])
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    method = method_from(args)
    if args.prompt is None and args.prompt_file is None:
        raise ValueError("give a prompt with --prompt TEXT or --prompt-file FILE")
    prompt = args.prompt if args.prompt is not None else read_text(args.prompt_file)
    model, tok = load(args.model, args.device, args.dtype)
    ids = encode(tok, prompt, args.chat, next(model.parameters()).device)
    n = ids.shape[-1]
    if args.max_prompt_tokens is not None and n > args.max_prompt_tokens:
        raise ValueError(f"the prompt holds {n} tokens, more than --max-prompt-tokens {args.max_prompt_tokens}")
    warn_context(model, method, args.model, n + args.max_new_tokens)
    with attnkit.apply(model, method) as run:
        gen = attnkit.generate(model, tok, ids, max_new_tokens=args.max_new_tokens, prefill_chunk=args.prefill_chunk,
                               do_sample=args.sample, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
        peak = run.peak_kv_bytes
    if args.json:
        out = {"text": gen.text, "new_tokens": len(gen.tokens), "prompt_tokens": gen.prompt_tokens,
               "prefill_s": gen.prefill_s, "decode_s": gen.decode_s, "s_per_token": gen.s_per_token,
               "kv_bytes": gen.kv_bytes, "stats": gen.stats}
        print(json.dumps(out))
        return 0
    print(gen.text)
    print(f"[{method}] prompt {gen.prompt_tokens} tok | prefill {gen.prefill_s:.2f} s | "
          f"{1000 * gen.s_per_token:.1f} ms/token ({len(gen.tokens)} tok) | "
          f"KV {gen.kv_bytes / MiB:.2f} MiB held (peak {peak / MiB:.2f})")
    return 0


def cmd_ppl(args: argparse.Namespace) -> int:
    method = method_from(args)
    text = read_text(args.text_file) if args.text_file is not None else None
    model, tok = load(args.model, args.device, args.dtype)
    if text is None:
        from attnkit.data import essay_tokens

        ids = essay_tokens(tok, args.tokens)
    else:
        ids = tok(text, return_tensors="pt").input_ids[:, : args.tokens]
    warn_context(model, method, args.model, ids.shape[-1])
    with attnkit.apply(model, method) as run:
        nll = attnkit.perplexity(model, tok, ids, chunk=args.chunk, progress=True)
        held = run.kv_bytes()
    print(f"{method} on {args.model}: {nll.numel() + 1} tokens, chunk {args.chunk}, KV {held / MiB:.2f} MiB held")
    print(f"ppl {math.exp(nll.mean().item()):.3f}")
    start = 1
    for i, part in enumerate(torch.tensor_split(nll, 4)):
        if part.numel():
            end = start + part.numel() - 1
            print(f"  quarter {i + 1} (tokens {start}-{end}): ppl {math.exp(part.mean().item()):.3f}")
            start = end + 1
    if args.csv is not None:
        with open(args.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["target_pos", "nll"])
            w.writerows((i + 1, f"{v:.6f}") for i, v in enumerate(nll.tolist()))
    return 0


def sweep_config(args: argparse.Namespace):
    """The sweep described by ``attnkit eval`` arguments, every name validated (nothing loaded)."""
    from attnkit.eval import runner
    from attnkit.eval.tasks import expand_tasks

    runner.import_plugins(args.plugins)
    config = runner.SweepConfig(
        models=runner.split_list(args.model), methods=runner.split_list(args.methods),
        budgets=runner.split_list(args.budgets), tasks=expand_tasks(args.tasks),
        lengths=runner.parse_lengths(args.lengths),
        samples=args.samples, seed=args.seed, chat=args.chat, device=args.device, dtype=args.dtype,
        prefill_chunk=args.prefill_chunk, shard=runner.parse_shard(args.shard), plugins=list(args.plugins),
        batch=args.batch, overrides=runner.group_overrides(args.settings),
    )
    runner.validate(config)
    return config


def limit_gpu_memory(fraction: float | None, device: str, executor: str) -> None:
    """``--gpu-memory-fraction``: cap the caching allocator of this process (it frees its cache and retries before
    it passes the cap). Without a cap, shards sharing a GPU starve one another: each keeps what its longest sample
    cached, and the next one's allocation fails although nothing is in use."""
    if fraction is None:
        return
    if executor != "local":
        raise ValueError(f"--gpu-memory-fraction applies to the local executor, not --executor {executor} "
                         "(Ray gives each cell a GPU of its own)")
    if not device.startswith("cuda") or not torch.cuda.is_available():
        raise ValueError(f"--gpu-memory-fraction {fraction} needs a CUDA device; --device is {device!r}"
                         + ("" if torch.cuda.is_available() else " and no GPU is visible"))
    index = torch.device(device).index  # torch refuses a bare "cuda" here (no index): the current device is meant
    torch.cuda.set_per_process_memory_fraction(fraction, torch.cuda.current_device() if index is None else index)


def cmd_eval(args: argparse.Namespace) -> int:
    import sqlite3

    from attnkit.eval import runner
    from attnkit.eval.executors import get_executor
    from attnkit.eval.store import Store
    from attnkit.watchdog import stall_dump

    config = sweep_config(args)
    limit_gpu_memory(args.gpu_memory_fraction, config.device, args.executor)
    execute = get_executor(args.executor)
    runner.check(config)  # before the database is created
    with Store(args.db) as store:  # a file SQLite cannot read: one ValueError (Store)
        cells, mine = runner.prepare(config, store)
        i, n = config.shard
        shard = f" (shard {i}/{n}: {len(mine)} of {len(cells)} cells)" if n > 1 else ""
        print(f"attnkit eval: {len(cells)} cells x {config.samples} samples{shard} -> {args.db}", file=sys.stderr)
        try:
            with stall_dump(args.stall_dump, "attnkit eval"):
                written = execute(mine, config, store, args.progress)
        except KeyboardInterrupt:
            if getattr(args, "debug", False):
                raise
            done = store.done_many(c.key for c in mine)
            have = sum(len(done[c.key] & set(range(config.samples))) for c in mine)
            print(f"attnkit: interrupted: {have}/{len(mine) * config.samples} samples are stored in {args.db}; "
                  "run the same command again to resume", file=sys.stderr)
            return 130
        except sqlite3.Error as exc:
            raise ValueError(f"{args.db}: {exc}") from None
        print(f"attnkit eval: {written} new rows, {store.count()} in {args.db}", file=sys.stderr)
        print(runner.summary_table(store, cells))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from attnkit.calibrate import calibrate_fasa, calibrate_tidaldecode, write_profile
    from attnkit.data import essay_tokens

    if args.target in ("zerotuning", "act"):
        return calibrate_heads(args)
    if args.target == "razorattention":
        from attnkit.methods.stored.razorattention import calibrate

        model, tok = load(args.model, args.device, args.dtype)
        print(calibrate(model, tok, args.out, args.length, args.repeats, args.model))
        return 0
    args.samples = args.samples or 8

    try:
        budgets = tuple(int(b) for b in args.budgets.split(",") if b.strip())
    except ValueError:
        raise ValueError(f"--budgets {args.budgets!r} is invalid; accepted: comma-separated integers") from None
    if not budgets or min(budgets) < 1:
        raise ValueError(f"--budgets {args.budgets!r} is invalid; accepted: integers >= 1")
    model, tok = load(args.model, args.device, args.dtype)
    ids = essay_tokens(tok, args.samples * args.tokens).to(next(model.parameters()).device)
    prompts = list(ids.view(args.samples, args.tokens).split(1))  # consecutive, non-overlapping essay windows
    if args.target == "token_sparse":
        from attnkit.calibrate import calibrate_token_sparse

        profile = calibrate_token_sparse(model, prompts, progress=True)
        profile.update(model=args.model, samples=args.samples, tokens=args.tokens)
        path = write_profile(profile, args.out)
        print(f"token_sparse drift for {args.model}: sparse layers at delta 0.5 {profile['sparse_at_delta_0.5']} -> "
              f"{path}; use it as --set token_sparse.profile={path}")
        return 0
    if args.target == "tca":
        from attnkit.calibrate import calibrate_tca

        window = min(4096, args.tokens // 4)
        profile = calibrate_tca(model, prompts, window=window, progress=True)
        profile.update(model=args.model, samples=args.samples, tokens=args.tokens)
        path = write_profile(profile, args.out)
        print(f"tca budgets for {args.model} ({args.samples} x {args.tokens} tokens, local window {window}) -> {path}; "
              f"use it as --set tca.profile={path}")
        return 0
    if args.target == "tidaldecode":
        profile = calibrate_tidaldecode(model, prompts, budgets, args.new_tokens, args.dense_layers, progress=True)
        profile.update(model=args.model, samples=args.samples, tokens=args.tokens, new_tokens=args.new_tokens)
        path = write_profile(profile, args.out)
        best = ", ".join(f"top_k {kk}: layer {r}" for kk, r in zip(profile["budgets"], profile["best_reselect"]))
        print(f"tidaldecode re-selection layer for {args.model} (selection at layer {profile['selection_layer']}): "
              f"{best} -> {path}; use it as --set tidaldecode.reselect_layer=N")
        return 0
    profile = calibrate_fasa(model, prompts, budgets, args.new_tokens, args.pairing, progress=True)
    profile.update(model=args.model, samples=args.samples, tokens=args.tokens, new_tokens=args.new_tokens)
    path = write_profile(profile, args.out)
    print(f"fasa profile for {args.model}: {len(profile['layers'])} layers, budgets {profile['budgets']}, "
          f"{args.samples} x {args.tokens} tokens, {args.new_tokens} decode steps each -> {path}")
    return 0


def calibrate_heads(args: argparse.Namespace) -> int:
    """`attnkit calibrate zerotuning|act`: a head search on the calibration split of --task (attnkit.calibrate_heads)."""
    from attnkit.calibrate_heads import calibrate_act, calibrate_zerotuning, write_json
    from attnkit.eval.tasks.choice import choice_samples

    tasks = [t.strip() for t in args.task.split(",") if t.strip()]
    if not tasks:
        raise ValueError(f"--task {args.task!r} is invalid; accepted: choice task names, comma-separated")
    model, tok = load(args.model, args.device, args.dtype)
    n = args.samples or 64
    samples = [s for t in tasks for s in choice_samples(t, tok, n, 0, split="calib", shots=args.shots)]
    if args.target == "zerotuning":
        profile = calibrate_zerotuning(model, tok, samples, args.objective, args.mode, progress=True,
                                       variants=args.variants)
        chosen = f"{len(profile['gammas'])} heads at gamma {profile['gammas'][0][2]}" if profile["gammas"] else \
            "no head (nothing beat the unmodified model)"
    else:
        profile = calibrate_act(model, tok, samples, args.objective, progress=True, variants=args.variants)
        chosen = f"{len(profile['heads'])} heads"
    profile.update(model=args.model, tasks=tasks, shots=args.shots, split="calib")
    path = write_json(profile, args.out)
    print(f"{args.target} profile for {args.model} on {','.join(tasks)} ({len(samples)} calibration samples, "
          f"{args.objective}): {chosen}; calibration accuracy {profile['baseline_accuracy']:.3f} -> "
          f"{profile['calib_accuracy']:.3f} -> {path}; use it as --set {args.target}.profile={path}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    if not args.db.is_file():
        raise FileNotFoundError(2, "No such file or directory", str(args.db))
    try:
        from attnkit.eval.report import write_report
    except ImportError as exc:
        if exc.name and exc.name.startswith("attnkit.eval.report"):
            raise ValueError("this attnkit has no report module (attnkit.eval.report)") from None
        raise ValueError(f"the report needs {exc.name or 'a missing package'}: {exc}") from None
    args.out.mkdir(parents=True, exist_ok=True)
    html, md = write_report(args.db, args.out)
    print(f"wrote {html}")
    print(f"wrote {md}")
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from attnkit.analysis import analyze_compare, compute, write
    from attnkit.analysis.run import random_weights_like, run_label

    settings = dict(args.settings)
    if settings and args.method == "full":
        raise ValueError("--set needs --method NAME (the method to compare against full attention)")
    if args.method != "full":
        attnkit.make_method(args.method, **settings)  # a typo fails before the model loads
    try:
        layers = None if args.layers is None else [int(x) for x in args.layers.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--layers {args.layers!r} is invalid; accepted: comma-separated layer indices") from None
    opts = dict(samples=args.samples, tokens=args.tokens, eps=args.eps, heads_length=args.heads_length,
                repeats=args.repeats, layers=layers, seed=args.seed, progress=args.progress,
                residual_tokens=args.residual_tokens, streaming_tokens=args.streaming_tokens)

    def loaded(name: str):
        model, tok = load(name, args.device, args.dtype)
        if args.random_init:
            return random_weights_like(model, args.seed), tok, f"{name} (random init)"
        return model, tok, name

    model, tok, label = loaded(args.model)
    runs = [compute(model, tok, label, **opts)]
    if args.method != "full":
        runs.append(compute(model, tok, label, method=args.method, settings=settings, **opts))
    elif args.compare:
        del model  # one model in memory at a time
        model, tok, label = loaded(args.compare)
        runs.append(compute(model, tok, label, **opts))
    json_path, html_path = analyze_compare(*runs, args.out) if len(runs) == 2 else write(runs[0], args.out)
    for d in runs:
        s = d["sinks"]
        first = "BOS" if s["first_is_bos"] else "first token"
        print(f"{run_label(d)}: Sink_0^{s['eps']:g} ({first}) {s['sink_pct']['0']:.1f}%; massive activations in "
              f"layers {d['massive']['massive_layers'] or 'none'}; retrieval heads "
              f"{len(d['heads']['retrieval_heads'])}; streaming candidates {len(d['streaming']['candidates'])}")
    print(f"wrote {json_path}")
    print(f"wrote {html_path}")
    return 0


# -- entry point ------------------------------------------------------------------------------------------------
def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.strerror}: {exc.filename}"
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("attnkit: error: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, NotImplementedError, MemoryError) as exc:  # ModelLoadError is a ValueError
        if debug:
            raise
        print(f"attnkit: error: {_one_line(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
