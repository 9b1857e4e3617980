"""Which SDPA path does a decode step take over a slot buffer? Times one 32K-token GQA decode attention for
three key/value layouts: contiguous (B, Hkv, n, D), a prefix view of a larger (B, Hkv, cap, D) buffer, and a
prefix of a sequence-major (B, cap, Hkv, D) buffer seen through a transpose. H200 figures go to notes/gpu.md."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

B, H, HKV, D, N, CAP = 1, 32, 8, 128, 32768, 41472
dev, dt = "cuda", torch.bfloat16
q = torch.randn(B, H, 1, D, device=dev, dtype=dt)
buf = torch.randn(B, HKV, CAP, D, device=dev, dtype=dt)
seq_major = torch.randn(B, CAP, HKV, D, device=dev, dtype=dt)
layouts = {
    "contiguous": buf[:, :, :N].contiguous(),
    "head-major prefix view": buf[:, :, :N],
    "seq-major prefix, transposed": seq_major[:, :N].transpose(1, 2),
}
for name, k in layouts.items():
    row = [name]
    for backend in (None, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
        def run():
            return F.scaled_dot_product_attention(q, k, k, enable_gqa=True)
        try:
            if backend is None:
                t = do_bench(run, return_mode="median")
            else:
                with sdpa_kernel(backend):
                    t = do_bench(run, return_mode="median")
            row.append(f"{1000 * t:.0f} us")
        except Exception as e:  # backend refuses this layout
            row.append("refused")
    print(" | ".join(row))
print("columns: default | flash | efficient | math")
