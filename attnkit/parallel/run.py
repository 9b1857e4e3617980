"""torchrun entry: context-parallel prefill of a model, timed, and checked against one process.

    python -m attnkit.parallel.run --nproc 2 --model meta-llama/Llama-3.1-8B --length 32768 \\
        --strategy ring,ulysses,torch_ring --check
    torchrun --nproc-per-node 2 -m attnkit.parallel.run --model smollm2-135m --length 512 --strategy ring

Without torchrun's environment and with ``--nproc`` it re-launches itself under ``torch.distributed.run``
(NCCL on GPUs with ``NCCL_NVLS_ENABLE=0``, gloo on CPU). Every rank loads the whole model (weights are
replicated) and prefills random token ids (seeded, the same on every rank) with the sequence split over the ranks;
rank 0 prints, per strategy, the wall time of ``cp_prefill(..., logits="last")`` and, with ``--check``, the
largest difference of the last token's logits from rank 0's one-process prefill (run alone while the others
wait; a sparse method through ``attnkit.apply``), relative to the largest logit, and whether their top-1
tokens agree. In half precision on CUDA rank 0 also prefills with SDPA's memory-efficient kernel instead of
flash: a check passes within ``--rtol`` or within twice that one-GPU kernel difference. Bad strategies, methods,
settings and lengths are refused before any process starts; the exit status is 1 when a check fails or a rank
refuses a strategy (heads that do not split over the ranks).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.attention import SDPBackend, sdpa_kernel

from attnkit.cli import number_type
from attnkit.parallel.launch import init_distributed, relaunch, under_torchrun
from attnkit.parallel.layout import SeqLayout
from attnkit.parallel.prefill import DEFAULT_LAYOUT, METHODS, STRATEGIES, check_strategy, cp_prefill


def parse_setting(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, value


def preflight(args: argparse.Namespace, world: int) -> None:
    """The strategies, the method and its settings, and each strategy's layout of ``--length`` over ``world``
    ranks (when known): ValueError naming the first bad one."""
    from attnkit.registry import make_method

    method = make_method(args.method, **dict(parse_setting(s) for s in args.setting))
    for strategy in args.strategy.split(","):
        check_strategy(strategy, method)
        if world >= 1:
            SeqLayout(args.length, world, 0, args.layout or DEFAULT_LAYOUT[strategy])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m attnkit.parallel.run", description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=number_type(int, 0), default=0,
                    help="processes to launch when not started by torchrun")
    ap.add_argument("--model", default="smollm2-135m",
                    help="an attnkit model name, a folder, a Hub id, or tiny-llama (random, Llama-3.1-8B heads)")
    ap.add_argument("--length", type=number_type(int, 1), default=4096)
    ap.add_argument("--batch", type=number_type(int, 1), default=1)
    ap.add_argument("--strategy", default="ring,ulysses", help=f"comma list of {', '.join(STRATEGIES)}")
    ap.add_argument("--method", default="full", help=f"one of {', '.join(METHODS)}")
    ap.add_argument("--setting", action="append", default=[], help="a method setting key=value (repeatable)")
    ap.add_argument("--layout", default=None, help="zigzag | contiguous (default: per strategy)")
    ap.add_argument("--repeats", type=number_type(int, 1), default=3)
    ap.add_argument("--check", action="store_true", help="compare with rank 0's one-process prefill")
    ap.add_argument("--rtol", type=float, default=None,
                    help="largest |cp - one process| / largest |one process| of the last logits (default: 2e-2 "
                         "in half precision, 1e-5 in float32)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    world = args.nproc if not under_torchrun() else int(os.environ.get("WORLD_SIZE", "1"))
    try:  # what every rank would refuse alike, refused here: no processes are started for it
        preflight(args, world)
    except ValueError as exc:
        ap.error(str(exc))
    if not under_torchrun():
        if not args.nproc:
            ap.error("not started by torchrun: pass --nproc N (or run it under torchrun)")
        forwarded = without_nproc(sys.argv[1:] if argv is None else argv)
        return relaunch(args.nproc, forwarded, module="attnkit.parallel.run")

    from attnkit.models import load_model
    from attnkit.session import apply

    dev = init_distributed(args.device)
    rank = dist.get_rank()
    model = tiny_llama(dev) if args.model == "tiny-llama" else load_model(args.model, device=dev)[0]
    settings = dict(parse_setting(s) for s in args.setting)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.length), generator=g).to(dev)
    ref, noise = None, 0.0
    if args.check:
        if rank == 0:  # alone on its device (the others wait at the barrier); a sparse method through attnkit.apply
            with torch.no_grad():
                if args.method == "full":
                    ref = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1].float()
                    if dev.type == "cuda" and model.dtype != torch.float32:  # what two one-GPU kernels differ by
                        with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
                            other = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[:, -1].float()
                        noise = float((other - ref).abs().max())
                        print(f"one GPU, flash vs memory-efficient SDPA: last logits max |diff| {noise:.3g}",
                              flush=True)
                else:
                    with apply(model, args.method, **settings):
                        ref = model(input_ids=ids, logits_to_keep=1).logits[:, -1].float()
        dist.barrier()
    rtol = args.rtol if args.rtol is not None else (1e-5 if model.dtype == torch.float32 else 2e-2)
    failed = False
    for strategy in args.strategy.split(","):
        times = []
        try:
            for _ in range(max(1, args.repeats)):
                sync(dev)
                dist.barrier()
                t = time.perf_counter()
                last = cp_prefill(model, ids, strategy, method=args.method, layout=args.layout, logits="last",
                                  **settings)
                sync(dev)
                times.append(time.perf_counter() - t)
        except ValueError as exc:  # raised alike on every rank before any communication
            if rank == 0:
                print(f"{strategy}: refused: {exc}", flush=True)
            failed = True  # a strategy that did not run is no success
            continue
        if rank != 0:
            continue
        line = f"{strategy}: {args.length} tokens on {dist.get_world_size()} ranks, {min(times) * 1000:.1f} ms (best)"
        if ref is not None:
            diff = float((last.float() - ref).abs().max())
            rel = diff / float(ref.abs().max())
            same = bool((last.float().argmax(-1) == ref.argmax(-1)).all())
            # within rtol of the largest logit, or within twice what two one-GPU kernels differ by; top-1 is
            # reported only (random weights give near-ties that bf16 may flip)
            ok = rel <= rtol or diff <= 2 * noise
            failed |= not ok
            line += f"; last logits max |diff| {diff:.3g} (relative {rel:.3g}, rtol {rtol:g}): " \
                    f"{'ok' if ok else 'FAILED'}; top-1 {'equal' if same else 'different'}"
        print(line, flush=True)
    dist.destroy_process_group()
    return int(failed)


def tiny_llama(dev: torch.device) -> torch.nn.Module:
    """A random 2-layer Llama with Llama-3.1-8B's attention shapes (32 query / 8 KV heads of 128), small
    elsewhere; seeded, so every rank builds the same weights; no download. bf16 on CUDA, float32 on CPU."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1024, hidden_size=1024, intermediate_size=2048, num_hidden_layers=2,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=1 << 20,
                         attn_implementation="sdpa")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    return AutoModelForCausalLM.from_config(config, dtype=dtype).to(dev).eval()


def without_nproc(argv: list[str]) -> list[str]:
    """argv less ``--nproc N``: torchrun's parser reads every option, and ``--nproc`` is ambiguous to it."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


if __name__ == "__main__":
    raise SystemExit(main())
