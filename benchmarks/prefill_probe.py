"""One 128K prefill chunk's attention on the H200: attnkit's causal_prefill (flash, bottom-right) vs SDPA with a
lower-right CausalBias vs one full causal flash pass per token count; says which path causal_prefill took.

    python benchmarks/prefill_probe.py
"""

from __future__ import annotations

import torch
from torch.nn.attention.bias import causal_lower_right

from attnkit.hf import attention


def timed(fn, reps: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main() -> None:
    dev, dt = "cuda", torch.bfloat16
    n, q = 131072, 4096
    query = torch.randn(1, 32, q, 128, device=dev, dtype=dt)
    key = torch.randn(1, 8, n, 128, device=dev, dtype=dt)
    value = torch.randn_like(key)
    try:
        torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, True, False, scale=0.088)
        print("aten flash op with GQA, q < n: ok")
    except Exception as exc:
        print(f"aten flash op failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    ours = timed(lambda: attention.causal_prefill(query, key, value, 0.088))
    print(f"causal_prefill flash enabled after call: {attention._FLASH_OK[0]}")
    bias = timed(lambda: attention.sdpa(query, key, value, causal_lower_right(q, n), 0.088))
    # the whole 128K causal pass once, per chunk of work: 32 chunks of 4096 sum to one pass
    full_q = torch.randn(1, 32, n, 128, device=dev, dtype=dt)
    one = timed(lambda: attention.sdpa(full_q, key, value, None, 0.088, causal=True), reps=2)
    print(f"last 4096-query chunk over 128K keys: causal_prefill {ours:.2f} ms, SDPA CausalBias {bias:.2f} ms; "
          f"one causal SDPA pass over 128K: {one:.1f} ms per layer")


if __name__ == "__main__":
    main()
