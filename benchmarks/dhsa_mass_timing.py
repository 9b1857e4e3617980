"""Where DHSA's attention-mass boundaries spend their time at one length (Llama-3.1-8B heads: 32 query heads over 8
KV heads, head_dim 128, bf16, random q / k): the two Triton passes (row log-sum-exp, far mass), the whole
``mass_ratios`` (with the band sums and the ratio), and ``mass_chunks`` on the host. Median of 3 after a warm-up.

    python benchmarks/dhsa_mass_timing.py [--length 131072]      (needs CUDA; figures in notes/gpu.md)
"""

import argparse
import statistics
import time

import torch

from attnkit.kernels.triton_mass import far_mass, row_lse
from attnkit.methods.read.dhsa import mass_chunks, mass_ratios

parser = argparse.ArgumentParser()
parser.add_argument("--length", type=int, default=131072)
args = parser.parse_args()
assert torch.cuda.is_available(), "dhsa_mass_timing: needs a CUDA device"
n, h, hkv, d = args.length, 32, 8, 128
torch.manual_seed(0)
q = torch.randn(1, h, n, d, device="cuda", dtype=torch.bfloat16)
k = torch.randn(1, hkv, n, d, device="cuda", dtype=torch.bfloat16)
pos = torch.arange(n, device="cuda")[None]
scaling = d**-0.5


def timed(fn) -> float:
    fn()
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


lse = row_lse(q, k, pos, pos, scaling)
ratio = mass_ratios(q, k, None, pos, pos, scaling, kernel="triton")
rows = {
    "row_lse (Triton)": timed(lambda: row_lse(q, k, pos, pos, scaling)),
    "far_mass (Triton)": timed(lambda: far_mass(q, k, pos, pos, scaling, 8, lse)),
    "mass_ratios (all)": timed(lambda: mass_ratios(q, k, None, pos, pos, scaling, kernel="triton")),
    "mass_chunks (host)": timed(lambda: mass_chunks(ratio, pos, max(2, (n // 128) * 8), tail=64)),  # its defaults
}
flops = 4 * n * n / 2 * h * d / 2  # one causal q.k pass: 2 x pairs x heads x d
for name, s in rows.items():
    extra = f", {flops / s / 1e12:.0f} TFLOP/s (q.k only)" if "Triton" in name else ""
    print(f"{n} tokens, {name}: {s * 1e3:.1f} ms{extra}", flush=True)
