"""Where an eval batch's GPU memory goes: one left-padded batch of a model through ``attnkit.generate`` with a
method active, as ``attnkit eval`` runs it, with the allocator's peak after loading, after the prefill and after the
decode steps, and the largest blocks alive at the prefill's peak (the CUDA allocator's recorded trace). With
``--timing``, also where the prefill's time goes: its wall time at each ``--score-bytes`` (the masked attention's
query-chunk size), the ops with the most device time under torch.profiler, and why SDPA's fused kernels refused
the first masked call.

Found in the thirteenth session: Gemma-3-270M at 16K, batch 4 held 10.9 GB (``full``) to 18.3 GB (tokenselect) per
process in eval rows. This probe measured one such batch at 3.1 / 4.25 GiB on the H100 (fourteenth session), with
every masked chunk of the prefill on SDPA's float32 math path. Figures go to notes/gpu.md.

    python benchmarks/eval_memory_probe.py --model gemma3-270m --length 16384 --batch 4 --methods full,tokenselect
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import attnkit
from attnkit.data import essay_tokens
from attnkit.models import load_model
from attnkit.registry import method_class


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def blocks_at_peak(n: int = 10) -> list[dict]:
    """The largest blocks alive at the recorded history's peak, with the attnkit / transformers frames that
    allocated them: the allocator's trace replayed (alloc adds a block, free_completed removes it)."""
    snap = torch.cuda.memory._snapshot()
    live, total, best, at_peak = {}, 0, -1, {}
    for e in snap["device_traces"][torch.cuda.current_device()]:
        if e["action"] == "alloc":
            live[e["addr"]] = e
            total += e["size"]
        elif e["action"] == "free_completed" and e["addr"] in live:
            total -= live.pop(e["addr"])["size"]
        if total > best:
            best, at_peak = total, dict(live)
    out = []
    for e in sorted(at_peak.values(), key=lambda e: -e["size"])[:n]:
        frames = [f"{f['filename'].split('/')[-1]}:{f['line']} {f['name']}" for f in e.get("frames") or []
                  if "attnkit" in f["filename"] or "transformers" in f["filename"]][:3]
        out.append(dict(mib=round(e["size"] / 2**20, 1), where=frames))
    return out


def prefill_seconds(model, tok, prompts, length: int, device: torch.device) -> float:
    """Wall seconds of one prefill (one new token), synchronised."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    attnkit.generate(model, tok, prompts, max_new_tokens=1, prefill_chunk=length)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return round(time.perf_counter() - t0, 3)


def sdpa_choice(model, tok, prompts, length: int) -> dict:
    """What SDPA was given in the prefill's first masked call (shapes, dtypes, strides) and why its fused kernels
    refused it: the fourteenth session's profile showed every masked chunk on the math path, in float32
    (torch.backends.cuda.can_use_*_attention with debug=True, whose reasons come as warnings); the same checks and
    a timed call per backend for that call's inputs as given, with a float mask and made contiguous."""
    import torch.nn.functional as F

    seen = {}
    real = F.scaled_dot_product_attention

    def spy(query, key, value, attn_mask=None, *args, **kwargs):
        if not seen and isinstance(attn_mask, torch.Tensor) and query.shape[2] > 1:
            seen.update(q=query, k=key, v=value, mask=attn_mask, gqa=kwargs.get("enable_gqa", False))
        return real(query, key, value, attn_mask, *args, **kwargs)

    F.scaled_dot_product_attention = spy
    try:
        attnkit.generate(model, tok, prompts, max_new_tokens=1, prefill_chunk=length)
    finally:
        F.scaled_dot_product_attention = real
    if not seen:
        return dict(note="no masked call with more than one query")
    out = {n: dict(shape=list(seen[n].shape), dtype=str(seen[n].dtype), stride=list(seen[n].stride()))
           for n in ("q", "k", "v", "mask")}
    out["enable_gqa"] = seen["gqa"]
    if seen["q"].is_cuda:
        q, k, v, m = seen["q"], seen["k"], seen["v"], seen["mask"]
        bias = torch.zeros(m.shape, dtype=q.dtype, device=q.device).masked_fill_(~m, float("-inf"))
        variants = {"as given": (q, k, v, m), "float mask": (q, k, v, bias),
                    "contiguous": (q.contiguous(), k.contiguous(), v.contiguous(), m.contiguous()),
                    "contiguous, float mask": (q.contiguous(), k.contiguous(), v.contiguous(), bias.contiguous())}
        for name, (vq, vk, vv, vm) in variants.items():
            out[name] = sdpa_checks(vq, vk, vv, vm, seen["gqa"])
    return out


def sdpa_checks(q, k, v, mask, gqa: bool) -> dict:
    """can_use_{flash,efficient,cudnn}_attention on these inputs with their reasons, and the milliseconds of one
    call forced onto each backend (or the error it raised)."""
    import warnings

    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        params = torch.backends.cuda.SDPAParams(q, k, v, mask, 0.0, False, gqa)
    except TypeError:  # older signature, no enable_gqa
        params = torch.backends.cuda.SDPAParams(q, k, v, mask, 0.0, False)
    out = {}
    sync = torch.cuda.synchronize if q.is_cuda else (lambda: None)
    for kernel, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                            ("cudnn", SDPBackend.CUDNN_ATTENTION), ("math", SDPBackend.MATH)):
        check = getattr(torch.backends.cuda, f"can_use_{kernel}_attention", None)
        row = {}
        if check is not None:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                row["ok"] = bool(check(params, True))
            row["why"] = [str(w.message)[:300] for w in caught]
        try:
            with sdpa_kernel([backend]):
                torch.nn.functional.scaled_dot_product_attention(q, k, v, mask, enable_gqa=gqa)
                sync()
                t0 = time.perf_counter()
                for _ in range(5):
                    torch.nn.functional.scaled_dot_product_attention(q, k, v, mask, enable_gqa=gqa)
                sync()
            row["ms"] = round((time.perf_counter() - t0) / 5 * 1e3, 3)
        except Exception as exc:  # a diagnostic: whatever a backend raises is what we want to read
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        out[kernel] = row
    return out


def prefill_timing(model, tok, prompts, length: int, device: torch.device, score_bytes: list[int]) -> dict:
    """The prefill's wall time at each masked-attention chunk size (attnkit.hf.attention.MASKED_SCORE_BYTES), and
    the 15 ops with the most self device time (CPU time on the CPU) at the default size, with their call counts."""
    from torch.profiler import ProfilerActivity, profile

    from attnkit.hf import attention
    default = attention.MASKED_SCORE_BYTES
    walls = {}
    try:
        for b in score_bytes:
            attention.MASKED_SCORE_BYTES = b
            prefill_seconds(model, tok, prompts, length, device)  # warm (allocator, any compile)
            walls[str(b)] = prefill_seconds(model, tok, prompts, length, device)
    finally:
        attention.MASKED_SCORE_BYTES = default
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        prefill_seconds(model, tok, prompts, length, device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    ops = sorted(prof.key_averages(), key=lambda e: -getattr(e, key))[:15]
    top = [dict(op=e.key, calls=e.count, self_ms=round(getattr(e, key) / 1e3, 2),
                cpu_ms=round(e.self_cpu_time_total / 1e3, 2)) for e in ops]
    return dict(wall_s_by_score_bytes=walls, top_ops=top)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--length", type=int, default=16384, help="tokens in the longest prompt")
    ap.add_argument("--batch", type=int, default=4, help="prompts, left-padded (each 1/8 shorter than the last)")
    ap.add_argument("--methods", default="full")
    ap.add_argument("--budget", type=int, default=4096)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--timing", action="store_true", help="also time the prefill and profile its ops")
    ap.add_argument("--score-bytes", default="268435456,2147483648",
                    help="masked-attention chunk sizes (bytes of float32 scores) to time the prefill at")
    ap.add_argument("--out", help="JSON with every figure")
    args = ap.parse_args()
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model, tok = load_model(args.model, device=args.device, dtype=dtype)
    device = next(model.parameters()).device
    ids = essay_tokens(tok, args.length)[0].tolist()
    prompts = [tok.decode(ids[: args.length - i * args.length // 8], skip_special_tokens=True)
               for i in range(args.batch)]
    rows = []
    for name in args.methods.split(","):
        method = method_class(name).for_budget(args.budget) if name != "full" else name
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        loaded = peak_gib(device)
        t0 = time.perf_counter()
        with attnkit.apply(model, method):
            gen = attnkit.generate(model, tok, prompts, max_new_tokens=1, prefill_chunk=args.length)
            prefill = peak_gib(device)
            top = blocks_at_peak() if device.type == "cuda" else []
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            attnkit.generate(model, tok, prompts, max_new_tokens=args.new_tokens, prefill_chunk=args.length)
        whole = peak_gib(device)
        if device.type == "cuda":
            torch.cuda.memory._record_memory_history(enabled=None)
        row = dict(method=name, batch=args.batch, length=args.length, prompt_tokens=gen[0].prompt_tokens,
                   loaded_gib=loaded, prefill_peak_gib=prefill, generate_peak_gib=whole,
                   seconds=round(time.perf_counter() - t0, 1), top_blocks=top)
        if args.timing:
            with attnkit.apply(model, method):
                row["sdpa_choice"] = sdpa_choice(model, tok, prompts, args.length)
                row["timing"] = prefill_timing(model, tok, prompts, args.length, device,
                                               [int(b) for b in args.score_bytes.split(",")])
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "top_blocks"}))
        for b in top:
            print(f"    {b['mib']:9.1f} MiB  {' <- '.join(b['where'])}")
        if args.timing:
            print("    first masked SDPA call:", json.dumps(row["sdpa_choice"])[:1500])
            print("    prefill s by score bytes:", row["timing"]["wall_s_by_score_bytes"])
            for o in row["timing"]["top_ops"]:
                print(f"    {o['self_ms']:10.2f} ms {o['calls']:7d} calls  cpu {o['cpu_ms']:9.2f} ms  {o['op'][:70]}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
