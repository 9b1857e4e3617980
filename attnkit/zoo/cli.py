"""``attnkit zoo mixers | train | sweep | passkey | report``: the trained token mixers on MQAR and passkey."""

from __future__ import annotations

import argparse
import faulthandler
import json
import sys
import time
from typing import Any

TRAIN_FIELDS = ("vocab_size", "train_examples", "test_examples", "epochs", "batch_size", "weight_decay",
                "early_stop", "seed", "mlp_ratio", "power_a")


PASSKEY_FIELDS = {"d_model": int, "n_layers": int, "mlp_ratio": int, "seq_len": int, "digits": int, "steps": int,
                  "batch_size": int, "lr": float, "weight_decay": float, "lm_weight": float, "train_lengths": str,
                  "eval_examples": int, "seed": int}


def _settings(items: list[tuple[str, str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for mixer, key, value in items:
        out.setdefault(mixer, {})[key] = value
    return out


def add_parsers(sub, common: argparse.ArgumentParser, parse_method_setting) -> None:
    """Register ``zoo`` and its subcommands on the main CLI's subparsers."""
    zoo = sub.add_parser("zoo", parents=[common], help="trained token mixers (BASED, delta rule, RLS, ...) on MQAR")
    zsub = zoo.add_subparsers(dest="zoo_command", required=True, metavar="ZOO_COMMAND")

    p = zsub.add_parser("mixers", parents=[common], help="list the registered mixers")
    p.set_defaults(func=cmd_mixers)

    stored = argparse.ArgumentParser(add_help=False)  # what every training command takes
    stored.add_argument("--set", dest="settings", action="append", default=[], type=parse_method_setting,
                        metavar="MIXER.KEY=VALUE", help="mixer setting, repeatable (e.g. --set based.feature_dim=16)")
    stored.add_argument("--db", default="results/zoo.db", help="results database (default: %(default)s)")
    stored.add_argument("--checkpoints", default="results/zoo-checkpoints",
                        help="checkpoints of unfinished runs, for resuming (default: %(default)s)")

    shared = argparse.ArgumentParser(add_help=False, parents=[stored])
    shared.add_argument("--task", default="mqar", choices=["mqar"])
    shared.add_argument("--device", default="cpu")
    shared.add_argument("--eager", action="store_true", help="on CUDA, launch each training step's kernels one by "
                        "one instead of replaying the step from a CUDA graph")
    shared.add_argument("--n-layers", type=int, default=2, help="layers when one mixer name is given")
    shared.add_argument("--precision", choices=["float32", "tf32"], default="float32",
                        help="float32: Zoology's; tf32: CUDA matmuls on TF32 tensor cores, faster, a stated deviation "
                             "(stored in the run's config)")
    for name in TRAIN_FIELDS:
        shared.add_argument("--" + name.replace("_", "-"), type=float if name in ("weight_decay", "early_stop",
                                                                              "power_a") else int)
    shared.add_argument("--train-mix", help="train on a data mixture: TxN:EXAMPLES,... segments, or 'zoology' "
                        "(Zoology's five, T 64-256); replaces the shape and --train-examples")
    shared.add_argument("--test-mix", help="test configs TxN:EXAMPLES,..., or 'zoology' (Zoology's seven, T "
                        "64-1024; default: the training shapes)")

    p = zsub.add_parser("train", parents=[common, shared], help="train one model on MQAR; result into --db")
    p.add_argument("--mixer", required=True, help="one name for every layer, or NAME+NAME per layer")
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--kv-pairs", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.set_defaults(func=cmd_train)

    p = zsub.add_parser("sweep", parents=[common, shared], help="mixers x widths x (T, N) x learning rates")
    p.add_argument("--mixers", required=True, help="comma-separated specs, e.g. softmax,base_conv+based")
    p.add_argument("--d-models", default="64", help="comma-separated widths")
    p.add_argument("--shapes", help="comma-separated SEQ_LENxKV_PAIRS, e.g. 64x4,256x16 (default: 64x4; not with "
                   "--train-mix)")
    p.add_argument("--lrs", default="1e-3", help="comma-separated learning rates (the best run per model counts)")
    p.add_argument("--shard", help="I/N: run every N-th configuration from the I-th (several processes, one db)")
    p.add_argument("--concurrent", type=int, default=1, help="runs trained side by side in this process, each on a "
                   "CUDA stream of its own (their kernels overlap, processes only time-slice a GPU: 1.1-1.24x on "
                   "an H100)")
    p.add_argument("--time-limit", type=float, help="seconds: start no run after them and stop running ones "
                   "before an epoch that would end after them, checkpoints kept (a bounded GPU call)")
    p.add_argument("--whole-runs", action="store_true", help="with --time-limit: a run whose remaining epochs "
                   "would not fit (at its first epoch's pace) stops after that epoch and the next run starts")
    p.add_argument("--executor", choices=["local", "ray"], default="local")
    p.add_argument("--list", action="store_true", help="train nothing: print where each run of this shard stands "
                   "(stored, checkpointed at an epoch, or to train), to plan bounded calls")
    p.add_argument("--no-progress", action="store_true", help="no bars: one timestamped line per run start, "
                   "epoch and stop on stderr instead (logs of batch jobs)")
    p.add_argument("--stall-dump", type=float, metavar="SECONDS", help="when no run starts, ends an epoch or stops "
                   "for this long (or, within twice it, one of the runs side by side), print every thread's stack on "
                   "stderr and end with status 1 (a hung batch job leaves its whereabouts; stored runs and "
                   "checkpoints stay for a rerun)")
    p.set_defaults(func=cmd_sweep)

    p = zsub.add_parser("passkey", parents=[common, stored], help="train one model on passkey at one length, test "
                        "at multiples of it (length generalisation; CPU); result into --db")
    p.add_argument("--mixer", required=True, help="one name for every layer, or NAME+NAME per layer")
    p.add_argument("--haystack", choices=["noise", "essay"], default="essay")
    p.add_argument("--multiples", default="1,2,4", help="evaluation lengths as multiples of --seq-len")
    p.add_argument("--decode", action="store_true", help="also evaluate by greedy generation through the mixers' "
                   "decode paths (landmark's top-k block retrieval lives there)")
    p.add_argument("--no-progress", action="store_true")
    for name, kind in PASSKEY_FIELDS.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind)
    p.set_defaults(func=cmd_passkey)

    p = zsub.add_parser("report", parents=[common], help="the accuracy vs state-size frontier of a database")
    p.add_argument("db")
    p.add_argument("-o", "--out", default="results/zoo-report")
    p.set_defaults(func=cmd_report)


def _base(args: argparse.Namespace) -> dict[str, Any]:
    from attnkit.zoo.train import ZOOLOGY_TEST_MIX, ZOOLOGY_TRAIN_MIX

    base = {name: getattr(args, name) for name in TRAIN_FIELDS if getattr(args, name) is not None}
    for name, zoology in (("train_mix", ZOOLOGY_TRAIN_MIX), ("test_mix", ZOOLOGY_TEST_MIX)):
        if (value := getattr(args, name)) is not None:
            base[name] = zoology if value == "zoology" else value
    return {**base, "task": args.task, "mixer_settings": _settings(args.settings), "n_layers": args.n_layers,
            "precision": args.precision}


def cmd_mixers(args: argparse.Namespace) -> int:
    from attnkit.zoo import mixers

    for m in mixers():
        print(f"{m['name']:18} {m['paper']:36} {json.dumps(m['defaults'])}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from attnkit.eval.store import Store
    from attnkit.zoo.sweep import grid
    from attnkit.zoo.train import train

    (cfg,) = grid([args.mixer], [args.d_model], [(args.seq_len, args.kv_pairs)], [args.lr], **_base(args))
    with Store(args.db) as store:
        try:
            row = train(cfg, store, args.checkpoints, args.device, graph=False if args.eager else None)
        except KeyboardInterrupt:
            if getattr(args, "debug", False):
                raise
            print(f"attnkit: interrupted: the run keeps its last epoch's checkpoint in {args.checkpoints}; run the "
                  "same command again to resume", file=sys.stderr)
            return 130
    print(f"{row['mixers']} d_model {row['d_model']} T {row['seq_len']} N {row['num_kv_pairs']}: accuracy "
          f"{row['accuracy']:.4f} after {row['epochs']} epochs, state {row['state_size']:,} floats, "
          f"{row['params']:,} parameters, {row['wall_s']:.1f} s -> {args.db}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from attnkit.watchdog import beat, check_seconds, stall_dump
    from attnkit.zoo.sweep import grid, parse_shape, parse_shard, run_status, run_sweep
    from attnkit.zoo.train import run_name

    if args.train_mix and args.shapes:
        raise ValueError(f"zoo sweep: --shapes {args.shapes} and --train-mix exclude each other; a mixture run takes "
                         "its shapes from --train-mix and --test-mix")
    shapes = [parse_shape(s) for s in (args.shapes or "64x4").split(",") if s]
    configs = grid([m for m in args.mixers.split(",") if m], _numbers(args.d_models, int, "--d-models", "64,128"),
                   shapes, _numbers(args.lrs, float, "--lrs", "1e-3,1e-2"), **_base(args))
    if args.whole_runs and args.time_limit is None:
        raise ValueError("zoo sweep: --whole-runs needs --time-limit")
    shard = parse_shard(args.shard)
    if args.list:
        status = run_status(configs, args.db, args.checkpoints, shard)
        width = max((len(run_name(cfg)) for cfg, _ in status), default=0)
        for cfg, where in status:
            print(f"{run_name(cfg):{width}}  {where}")
        left = sum(not where.startswith("stored") for _, where in status)
        print(f"{len(status) - left} of this shard's {len(status)} runs stored, {left} left")
        return 0
    seconds = None if args.stall_dump is None else check_seconds(args.stall_dump, "zoo sweep")

    def log(text: str) -> None:  # a run's start, epochs and stop: the stall dump's signs of progress
        if args.no_progress:
            _stderr_line(text)
        beat()

    past_limit = args.time_limit is not None and seconds is None
    if past_limit:  # still running 30 s past the limit: every thread's stack on stderr, once
        faulthandler.dump_traceback_later(args.time_limit + 30, exit=False)
    try:
        with stall_dump(seconds, "zoo sweep"):
            rows = run_sweep(configs, args.db, args.checkpoints, shard, args.executor, args.device,
                             progress=not args.no_progress, graph=False if args.eager else None,
                             concurrent=args.concurrent, time_limit=args.time_limit, whole=args.whole_runs,
                             log=log if args.no_progress or seconds else None)
    except KeyboardInterrupt:
        if getattr(args, "debug", False):
            raise
        status = run_status(configs, args.db, args.checkpoints, shard)
        stored = sum(where.startswith("stored") for _, where in status)
        print(f"attnkit: interrupted: {stored} of this shard's {len(status)} runs are stored in {args.db}, "
              f"unfinished ones keep their last epoch's checkpoint in {args.checkpoints}; run the same command "
              "again to resume", file=sys.stderr)
        return 130
    finally:
        if past_limit:
            faulthandler.cancel_dump_traceback_later()
    for r in rows:
        left = "" if r["finished"] else f" (unfinished: {r['epochs']} epochs, checkpoint kept)" if r["epochs"] \
            else " (unfinished: no epoch done)"
        print(f"{r['mixers']:28} d{r['d_model']:<4} {r['seq_len']}x{r['num_kv_pairs']:<4} "
              f"acc {r['accuracy']:.3f} state {r['state_size']:>10,}{left}")
    mine = len(configs[shard[0]::shard[1]])
    print(f"{sum(1 for r in rows if r['finished'])} of this shard's {mine} runs finished")
    return 0


def _numbers(text: str, kind: type, flag: str, example: str) -> list:
    """A comma-separated list of ints or floats (each checked again where it is used), or one clear error."""
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        noun = "integers" if kind is int else "numbers"
        raise ValueError(f"zoo sweep: {flag} {text!r} is invalid; accepted: comma-separated {noun}, e.g. "
                         f"{example}") from None


def _stderr_line(text: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} zoo: {text}", file=sys.stderr, flush=True)


def cmd_passkey(args: argparse.Namespace) -> int:
    from attnkit.eval.store import Store
    from attnkit.zoo.passkey import PasskeyConfig, run_passkey
    from attnkit.zoo.sweep import parse_mixers

    mixers = parse_mixers(args.mixer)
    given = {name: getattr(args, name) for name in PASSKEY_FIELDS if getattr(args, name) is not None}
    try:
        multiples = tuple(int(m) for m in args.multiples.split(",") if m)
    except ValueError:
        raise ValueError(f"--multiples {args.multiples!r} is invalid; accepted: comma-separated integers >= 1") from None
    cfg = PasskeyConfig(mixers=mixers, mixer_settings=_settings(args.settings), haystack=args.haystack,
                        eval_lengths=multiples, **given)
    with Store(args.db) as store:
        row = run_passkey(cfg, store, args.checkpoints, args.decode, progress=not args.no_progress)
    history = json.loads(row["history_json"])
    for kind in ("exact_match", "exact_match_decode"):
        if kind in history:
            cells = ", ".join(f"{n}: {100 * v:.1f}%" for n, v in history[kind].items())
            print(f"{row['mixers']} passkey ({args.haystack}), trained at {row['seq_len']}: {kind.replace('_', ' ')} "
                  f"{cells}")
    print(f"{row['params']:,} parameters, {row['epochs']} steps, {row['wall_s']:.1f} s -> {args.db}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from attnkit.zoo.report import write_report

    if not Path(args.db).exists():
        raise ValueError(f"no database at {args.db}")
    write_report(args.db, args.out)
    print((Path(args.out) / "frontier.md").read_text(), end="")
    print(f"report: {args.out}/frontier.svg, frontier.md, frontier.json")
    return 0
