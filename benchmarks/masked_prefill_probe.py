"""Which SDPA backend serves a masked prefill, and at what memory? Gemma-3-270M's sliding-window layer at 16K (4
query heads, 1 KV head, head_dim 256, window 512, bf16), batch 1 and 4, an unaligned length: SDPA's own reasons
for refusing flash / efficient (`can_use_*_attention(debug=True)`), then time and peak memory of one call through
attnkit's `sdpa` with query chunks (the default) and as one call (`MASKED_SCORE_BYTES` raised). Found in the
twelfth session: the one call allocated 8 GiB per batch row (SDPA's math path). Run on the GPU; figures go to
notes/gpu.md."""

from __future__ import annotations

import argparse
import warnings

import torch
from triton.testing import do_bench

from attnkit.hf import attention


def window_mask(b: int, n: int, window: int, device: str) -> torch.Tensor:
    """(B, 1, n, n) bool: causal, at most ``window`` positions back (attnkit's sliding layer's rule)."""
    pos = torch.arange(n, device=device)
    k, q = pos.view(1, 1, 1, n), pos.view(1, 1, n, 1)
    return ((k <= q) & (k >= q - window)).expand(b, 1, n, n)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=16240)  # a RULER prompt's length: not a multiple of 16
    ap.add_argument("--batches", default="1,4")
    args = ap.parse_args()
    dev, dt = "cuda", torch.bfloat16
    h, hkv, d, window = 4, 1, 256, 512
    default = attention.MASKED_SCORE_BYTES
    for b in (int(x) for x in args.batches.split(",")):
        n = args.length
        q = torch.randn(b, h, n, d, device=dev, dtype=dt)
        k, v = (torch.randn(b, hkv, n, d, device=dev, dtype=dt) for _ in range(2))
        mask = window_mask(b, n, window, dev)
        kk, vv = attention.per_head(k, h), attention.per_head(v, h)  # as attnkit hands them to SDPA
        params = torch.backends.cuda.SDPAParams(q, kk, vv, mask, 0.0, False, False)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            flash = torch.backends.cuda.can_use_flash_attention(params, debug=True)
            eff = torch.backends.cuda.can_use_efficient_attention(params, debug=True)
        print(f"batch {b}, {n} tokens: flash {flash}, efficient {eff}")
        for w in caught:
            print("   ", str(w.message).splitlines()[0][:200])
        for name, limit in (("query chunks", attention.MASKED_SCORE_BYTES), ("one call", 1 << 62)):
            attention.MASKED_SCORE_BYTES = limit
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            try:
                ms = do_bench(lambda: attention.sdpa(q, k, v, mask, d**-0.5), warmup=2, rep=5, return_mode="median")
                peak = (torch.cuda.max_memory_allocated() - base) / 2**30
                print(f"    {name}: {ms:.1f} ms, peak {peak:.2f} GiB above the inputs")
            except torch.OutOfMemoryError as err:
                print(f"    {name}: out of memory ({str(err).splitlines()[0][:100]})")
        attention.MASKED_SCORE_BYTES = default


if __name__ == "__main__":
    main()
