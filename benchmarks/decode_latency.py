"""Per-token decode latency: attnkit.generate (full, streaming_llm) against model.generate, in one run.

The model is Llama-3.1-8B-shaped (32 layers, 32 query / 8 KV heads, head_dim 128) with random bf16 weights:
latency and memory depend on shapes, not on weight values. A random prompt of ``--context`` tokens is prefilled,
then ``--new-tokens`` tokens are decoded greedily with EOS disabled. model.generate's per-token decode time is
(t(N new) - t(1 new)) / (N - 1), so its prefill cancels out. Every figure is a ratio against the dense baselines
measured in the same process. GPU only in practice (8B parameters).

    python benchmarks/decode_latency.py --context 32768 --new-tokens 64 --out results/decode_latency.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import attnkit

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


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--prefill-chunk", type=int, default=4096)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--window", type=int, default=2044)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path, default=Path("results/decode_latency.json"))
    args = ap.parse_args(argv)

    model = build_model(args.layers, args.device)
    tok = IdTokenizer()
    ids = torch.randint(0, LLAMA_31_8B["vocab_size"], (1, args.context), device=args.device)
    rows: dict[str, dict] = {}

    # warm-up: kernels, allocator, cuBLAS handles
    attnkit.generate(model, tok, ids[:, :256], max_new_tokens=4, prefill_chunk=256, stop_at_eos=False)

    t1 = hf_generate_s(model, ids, 1)
    tn = hf_generate_s(model, ids, args.new_tokens)
    rows["model.generate (dense)"] = {"ms_per_token": 1000 * (tn - t1) / (args.new_tokens - 1), "prefill_s": t1}

    g = attnkit.generate(model, tok, ids, max_new_tokens=args.new_tokens, prefill_chunk=args.prefill_chunk,
                         stop_at_eos=False)
    rows["attnkit.generate (no method)"] = {"ms_per_token": 1000 * g.s_per_token, "prefill_s": g.prefill_s,
                                            "kv_bytes": g.kv_bytes}
    for name, settings in [("full", {}), ("streaming_llm", {"sinks": args.sinks, "window": args.window})]:
        with attnkit.apply(model, name, **settings) as run:
            g = attnkit.generate(model, tok, ids, max_new_tokens=args.new_tokens, prefill_chunk=args.prefill_chunk,
                                 stop_at_eos=False)
            rows[f"attnkit {name}"] = {"ms_per_token": 1000 * g.s_per_token, "prefill_s": g.prefill_s,
                                       "kv_bytes": run.kv_bytes(), "settings": settings}
        torch.cuda.empty_cache() if torch.cuda.is_available() else None

    base = rows["model.generate (dense)"]["ms_per_token"]
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"\nLlama-3.1-8B-shaped ({args.layers} layers), random bf16 weights, batch 1, context {args.context}, "
          f"{args.new_tokens} new tokens, {device}, torch {torch.__version__}")
    print("| run | ms / token | vs model.generate | prefill s | KV MiB held |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, r in rows.items():
        kv = f"{r['kv_bytes'] / 2**20:.0f}" if "kv_bytes" in r else "-"
        print(f"| {name} | {r['ms_per_token']:.2f} | {base / r['ms_per_token']:.2f}x | {r['prefill_s']:.2f} | {kv} |")
    result = {"device": device, "torch": torch.__version__, "args": {k: str(v) for k, v in vars(args).items()},
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
