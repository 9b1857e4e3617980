"""Per-token decode latency: attnkit.generate (full, streaming_llm, tokenselect, quest) against model.generate.

The model is Llama-3.1-8B-shaped (32 layers, 32 query / 8 KV heads, head_dim 128) with random bf16 weights:
latency and memory depend on shapes, not on weight values. A random prompt of ``--context`` tokens is prefilled,
then ``--new-tokens`` tokens are decoded greedily with EOS disabled. model.generate's per-token decode time is
(t(N new) - t(1 new)) / (N - 1), so its prefill cancels out. Every figure is a ratio against the dense baselines
measured in the same process; the memory floor is (weights + KV bytes held) over the copy bandwidth measured in
the same run. GPU only in practice (8B parameters).

    python benchmarks/decode_latency.py --context 131072 --batch 1 --new-tokens 64 --out results/decode_128k.json
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import math
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import attnkit
from attnkit.cli import parse_setting

LLAMA_31_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=131072,
    rope_parameters={
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
)


class IdTokenizer:
    """Just enough tokenizer for token-id prompts: no EOS, so every run decodes the same number of steps."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return ""


def build_model(layers: int, device: str) -> torch.nn.Module:
    config = LlamaConfig(**{**LLAMA_31_8B, "num_hidden_layers": layers}, attn_implementation="sdpa")
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def hf_generate_s(model, ids: torch.Tensor, new: int) -> float:
    sync()
    t = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                   do_sample=False, pad_token_id=0)
    sync()
    return time.perf_counter() - t


def hf_static_compiled_ms(model, ids: torch.Tensor, new: int, chunk: int) -> tuple[float, float]:
    """transformers StaticCache + torch.compile(mode="reduce-overhead") decode: (ms per token, compile + warm-up s).

    The prompt is prefilled densely in ``chunk``-token pieces into a DynamicCache and handed to the StaticCache
    through its public ``update`` (a StaticCache prefill would attend over the whole capacity under a mask);
    then each decode step calls the compiled model with static inputs, marks the cudagraph step and clones the
    logits, as transformers' docs ask.
    """
    from transformers import DynamicCache, StaticCache

    batch, length = ids.shape
    dev = ids.device
    dyn = DynamicCache(config=model.config)
    with torch.no_grad():
        for start in range(0, length, chunk):
            logits = model(input_ids=ids[:, start : start + chunk], past_key_values=dyn, use_cache=True,
                           logits_to_keep=1).logits
        cache = StaticCache(config=model.config, max_cache_len=length + new + 8)
        prefix = {"cache_position": torch.arange(length, device=dev)}
        for i, layer in enumerate(dyn.layers):
            cache.update(layer.keys, layer.values, i, prefix)
            layer.keys = layer.values = None  # free the dynamic copy layer by layer
        del dyn
        torch.cuda.empty_cache()
        token = logits[:, -1].argmax(-1, keepdim=True)
        pos = torch.full((batch, 1), length, dtype=torch.long, device=dev)
        cache_pos = torch.full((1,), length, dtype=torch.long, device=dev)
        takes_cache_position = "cache_position" in inspect.signature(model.forward).parameters
        step = torch.compile(model, mode="reduce-overhead")

        def one() -> torch.Tensor:
            torch.compiler.cudagraph_mark_step_begin()
            extra = {"cache_position": cache_pos} if takes_cache_position else {}
            out = step(input_ids=token, position_ids=pos, past_key_values=cache, use_cache=True, **extra)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True).clone()
            pos.add_(1)
            cache_pos.add_(1)
            return nxt

        t0 = time.perf_counter()
        for _ in range(3):  # compile, record, replay
            token = one()
        sync()
        warm = time.perf_counter() - t0
        steps = new - 4
        t0 = time.perf_counter()
        for _ in range(steps):
            token = one()
        sync()
        return 1000 * (time.perf_counter() - t0) / steps, warm


def settings_for(budget: int, sinks: int = 4, window: int | None = None) -> dict[str, dict]:
    """Each method's settings at ``budget`` tokens read or held per step (streaming_llm: sinks + window)."""
    k = budget
    return {
        "full": {},
        "streaming_llm": {"sinks": sinks, "window": k - sinks if window is None else window},
        "tokenselect": {"top_k": k - k // 21 - 4 * k // 21, "sinks": k // 21, "local": 4 * k // 21},
        "quest": {"budget": k, "page": 16},
        "tidaldecode": {"top_k": k},
        "window": {"window": k},
        "h2o": {"heavy": k // 2, "recent": k - k // 2},
        "snapkv": {"budget": k, "window": 32},
        "pyramidkv": {"budget": k, "window": 32},
        "fasa": {"budget": k},
        "recycled_attention": {"recycled": k},
        "spatten": {"budget": k},
        # sparse prefill (decode dense): the papers' defaults; DHSA with fixed chunks (its mass labelling is an
        # eager attention pass over the first layer); TCA without a profile takes its middle configuration
        "token_sparse": {},
        "dhsa": {"budget": k, "boundaries": "fixed", "chunk": 32},
        "rectified": {},
        "tca": {},
    }


def shape_arguments(ap: argparse.ArgumentParser) -> None:
    """The model-shape and prompt arguments every decode benchmark takes."""
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--prefill-chunk", type=int, default=4096)
    ap.add_argument("--budget", type=int, default=2048, help="tokens read or held per step by the sparse methods")
    ap.add_argument("--methods", default="full,streaming_llm,tokenselect,quest",
                    help="comma-separated registered methods (settings at --budget: see settings_for); quest/p64 is "
                         "Quest with 64-token pages, NAME:KEY=VALUE:... other settings (dhsa:boundaries=mass), "
                         "NAME+c the method compiled (attnkit.generate(compile=True))")


def setting(text: str) -> tuple[str, object]:
    """'chunk=64' -> ('chunk', 64), parsed as ``attnkit eval --set`` parses values."""
    try:
        return parse_setting(text)
    except argparse.ArgumentTypeError as err:
        raise SystemExit(f"method setting: {err}") from None


def copy_bandwidth_gbs(device: str) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), measured now: the floor's yardstick."""
    if not device.startswith("cuda"):
        return float("nan")
    src = torch.empty(2 * 2**30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    sync()
    return 2 * src.numel() * 10 / (start.elapsed_time(end) / 1000) / 1e9


def dense_kv_bytes(config: LlamaConfig, tokens: int, batch: int) -> int:
    d = config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * d * 2 * tokens * batch


@torch.inference_mode()
def flash_prefill_s(model, ids: torch.Tensor) -> float:
    """Seconds for one forward over all of ``ids`` (causal SDPA restricted to the flash kernel, last logits only)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION] if ids.is_cuda else [SDPBackend.MATH]):
        model(input_ids=ids[:, :256], logits_to_keep=1)  # warm-up
        sync()
        start = time.perf_counter()
        model(input_ids=ids, logits_to_keep=1)
        sync()
    return time.perf_counter() - start


def free_caches() -> None:
    """Free the last run's cache: its layers and the run reference each other, so only a collection frees them."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_method(model, tok, ids: torch.Tensor, name: str, settings: dict, args, compiled: bool) -> dict:
    """One attnkit.generate of ``name``: steady-state ms per token (the CUDA-graph replays), prefill, KV held."""
    try:
        with attnkit.apply(model, name, **settings) as run:
            timer = run.time_attention()  # prefill attention (the method's selection included), apart
            if torch.cuda.is_available():
                sync()
                torch.cuda.reset_peak_memory_stats()
            start_bytes = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
            g = attnkit.generate(model, tok, list(ids.unbind(0)) if args.batch > 1 else ids,
                                 max_new_tokens=args.new_tokens, prefill_chunk=args.prefill_chunk,
                                 stop_at_eos=False, cuda_graphs=not args.no_graphs,
                                 compile=(args.compile_mode if args.compile_mode != "default" else True) if compiled else False)
            g = g[0] if isinstance(g, list) else g
            # steady state: the CUDA-graph replays (warm-up steps, compile and the one-off capture reported apart)
            per_token = g.stats.get("steady_s_per_token", g.s_per_token)
            # peak memory above what was allocated before (weights, prompt): with few new tokens, the prefill's
            peak = torch.cuda.max_memory_allocated() - start_bytes if torch.cuda.is_available() else float("nan")
            return {"ms_per_token": 1000 * per_token, "prefill_s": g.prefill_s, "all_steps_ms": 1000 * g.s_per_token,
                    "capture_s": g.stats.get("capture_s"), "kv_bytes": run.kv_bytes(), "settings": settings,
                    "decode": g.stats.get("decode"), "prefill_attention_s": timer.seconds()["prefill"],
                    "peak_bytes": peak}
    except torch.OutOfMemoryError as exc:  # one method out of memory: say so, measure the others
        print(f"{name}: out of memory ({str(exc).splitlines()[0][:160]})", flush=True)
        return {"ms_per_token": float("nan"), "prefill_s": float("nan"), "kv_bytes": 0, "settings": settings,
                "decode": "out of memory"}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shape_arguments(ap)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--window", type=int, default=2044)
    ap.add_argument("--skip-hf", action="store_true", help="skip model.generate (two extra prefills)")
    ap.add_argument("--flash-prefill", action="store_true",
                    help="also time one forward over the whole prompt with SDPA's flash kernel only (the chunked "
                         "prefill's yardstick)")
    ap.add_argument("--skip-compile", action="store_true", help="skip StaticCache + torch.compile (a prefill and "
                    "a compile)")
    ap.add_argument("--no-graphs", action="store_true", help="attnkit decodes without CUDA graphs")
    ap.add_argument("--compile-mode", choices=["default", "max-autotune-no-cudagraphs"], default="default",
                    help="torch.compile mode of the compiled rows (max-autotune also times Triton GEMVs)")
    ap.add_argument("--compile", choices=["off", "on", "both"], default="off",
                    help="attnkit.generate(compile=...): the decode step through torch.compile (both: each method "
                         "twice, rows 'attnkit NAME' and 'attnkit NAME compiled')")
    ap.add_argument("--warm", action="store_true",
                    help="run each method once untimed first and report the second run (compiled FlexAttention "
                         "kernels of the sparse prefill methods are specialised to the prompt's shape); the first "
                         "run's prefill seconds are kept as cold_prefill_s")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=Path("results/decode_latency.json"))
    args = ap.parse_args(argv)

    model = build_model(args.layers, args.device)
    tok = IdTokenizer()
    ids = torch.randint(0, LLAMA_31_8B["vocab_size"], (args.batch, args.context), device=args.device)
    rows: dict[str, dict] = {}
    bandwidth = copy_bandwidth_gbs(args.device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    # warm-up: kernels, allocator, cuBLAS handles
    attnkit.generate(model, tok, ids[:1, :256], max_new_tokens=4, prefill_chunk=256, stop_at_eos=False)

    if not args.skip_hf:
        t1 = hf_generate_s(model, ids, 1)
        tn = hf_generate_s(model, ids, args.new_tokens)
        rows["model.generate (dense)"] = {"ms_per_token": 1000 * (tn - t1) / (args.new_tokens - 1), "prefill_s": t1,
                                          "kv_bytes": dense_kv_bytes(model.config, args.context, args.batch)}
        torch.cuda.empty_cache() if torch.cuda.is_available() else None

    if args.flash_prefill:
        try:
            rows["one SDPA flash pass (prefill only)"] = {"ms_per_token": float("nan"), "kv_bytes": 0,
                                                          "prefill_s": flash_prefill_s(model, ids)}
        except Exception as exc:  # report, keep measuring the rest
            print(f"one SDPA flash pass failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        torch.cuda.empty_cache() if torch.cuda.is_available() else None

    if not args.skip_compile and args.device.startswith("cuda"):
        try:
            ms, warm = hf_static_compiled_ms(model, ids, args.new_tokens, args.prefill_chunk)
            rows["StaticCache + torch.compile"] = {"ms_per_token": ms, "prefill_s": float("nan"), "compile_s": warm,
                                                   "kv_bytes": dense_kv_bytes(model.config, args.context, args.batch)}
        except Exception as exc:  # report, keep measuring the rest
            print(f"StaticCache + torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        torch._dynamo.reset()
        torch.cuda.empty_cache()

    method_settings = settings_for(args.budget, args.sinks, args.window)
    variants = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    for spec in [m for m in args.methods.split(",") if m]:
        name = spec.removesuffix("+c")  # NAME+c: that method compiled only, whatever --compile says
        for compiled in [True] if spec.endswith("+c") else variants:
            label = f"attnkit {name}" + (" compiled" if compiled else "")
            method, _, page = name.partition("/p")  # quest/p64: Quest with 64-token pages
            method, *sets = method.split(":")  # dhsa:boundaries=mass:chunk=64: settings over the ones below
            settings = dict(method_settings[method], **({"page": int(page)} if page else {}),
                            **dict(setting(s) for s in sets))
            cold = run_method(model, tok, ids, method, settings, args, compiled) if args.warm else None
            if cold is not None:  # the untimed run's cache goes before the timed one (else 128K runs out of memory)
                free_caches()
            rows[label] = run_method(model, tok, ids, method, settings, args, compiled)
            if cold is not None:
                rows[label]["cold_prefill_s"] = cold["prefill_s"]
            free_caches()
            args.out.parent.mkdir(parents=True, exist_ok=True)  # rows so far survive a later failure
            args.out.with_suffix(".partial.json").write_text(json.dumps(rows, indent=2, default=str))
            print(f"{label}: {rows[label]['ms_per_token']:.2f} ms/token ({rows[label]['decode']})", flush=True)

    base = rows.get("attnkit full", next(iter(rows.values())))["ms_per_token"]
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"\nLlama-3.1-8B-shaped ({args.layers} layers), random bf16 weights, batch {args.batch}, context "
          f"{args.context}, {args.new_tokens} new tokens, {device}, torch {torch.__version__}, copy bandwidth "
          f"{bandwidth:.0f} GB/s, weights {weight_bytes / 1e9:.1f} GB")
    print("| run | ms / token | tokens/s | vs attnkit full | vs floor | prefill s | prefill attention s | "
          "KV MiB held | peak MiB above start |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    weights_floor = 1000 * weight_bytes / (bandwidth * 1e9)
    for name, r in rows.items():
        kv = r.get("kv_bytes", 0)
        floor_ms = 1000 * (weight_bytes + kv) / (bandwidth * 1e9)  # bytes read once at the copy's read + write rate
        r["floor_ms"] = floor_ms
        r["tokens_per_s"] = 1000 * args.batch / r["ms_per_token"]
        print(f"| {name} | {r['ms_per_token']:.2f} | {r['tokens_per_s']:.1f} | {base / r['ms_per_token']:.2f}x | "
              f"{r['ms_per_token'] / floor_ms:.2f}x | {r['prefill_s']:.2f} | "
              f"{r.get('prefill_attention_s', math.nan):.2f} | "
              f"{kv / 2**20:.0f} | {r.get('peak_bytes', math.nan) / 2**20:.0f} |")
    print(f"weights-only floor {weights_floor:.2f} ms; decode modes: "
          + ", ".join(f"{n}: {r['decode']}" for n, r in rows.items() if r.get("decode")))
    cold = {n: r["cold_prefill_s"] for n, r in rows.items() if "cold_prefill_s" in r}
    if cold:
        print("first (untimed) run's prefill s, compile included: " + ", ".join(f"{n}: {c:.2f}" for n, c in cold.items()))
    flash = rows.get("one SDPA flash pass (prefill only)")
    if flash and "attnkit full" in rows:
        print(f"prefill: attnkit full, {args.prefill_chunk}-token chunks, {rows['attnkit full']['prefill_s']:.2f} s vs "
              f"one SDPA flash pass {flash['prefill_s']:.2f} s: {rows['attnkit full']['prefill_s'] / flash['prefill_s']:.2f}x")
    dense = rows.get("model.generate (dense)")
    if dense and "attnkit full" in rows:
        print(f"prefill: attnkit full, {args.prefill_chunk}-token chunks, {rows['attnkit full']['prefill_s']:.2f} s vs "
              f"one SDPA pass (model.generate, 1 token) {dense['prefill_s']:.2f} s: "
              f"{rows['attnkit full']['prefill_s'] / dense['prefill_s']:.2f}x")
    result = {"device": device, "torch": torch.__version__, "weights_floor_ms": weights_floor, "args": {k: str(v) for k, v in vars(args).items()},
              "copy_bandwidth_gbs": bandwidth, "weight_bytes": weight_bytes, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
