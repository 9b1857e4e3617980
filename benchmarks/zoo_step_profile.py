"""Where one MQAR training step of attnkit.zoo's TinyLM spends its GPU time at the V 8192 sweep's settings (batch
256, T 256, 64 pairs, no MLP, as `gpu_run.sh zoo8192` trains): ms per CUDA-graph step with float32 matmuls
(Zoology's) and with TF32 (`attnkit zoo sweep --precision tf32`) per mixer at d 64 and 256, then the top kernels of
10 eager float32 steps under torch.profiler at d 64. The CUDA-graph step gained only 1.01-1.03x (sixteenth session,
H100): the step is kernel work, not launches.

    python benchmarks/zoo_step_profile.py        (needs CUDA; figures in notes/gpu.md)
"""

import time

import torch
from torch.profiler import ProfilerActivity, profile

from attnkit.zoo.lm import LMConfig, TinyLM
from attnkit.zoo.mqar import mqar
from attnkit.zoo.step import TrainStep
from attnkit.zoo.train import matmul_precision

assert torch.cuda.is_available(), "zoo_step_profile: needs a CUDA device"
x, y = (t.cuda() for t in mqar(2048, 8192, 256, 64, 0.01, seed=1))
MIXERS = (["base_conv", "softmax"], ["base_conv", "based"], ["base_conv", "sliding_window"])


def build(mixers, d: int, graph: bool = True) -> TrainStep:
    torch.manual_seed(0)
    model = TinyLM(LMConfig(vocab_size=8192, d_model=d, mixers=mixers, n_layers=2, mlp_ratio=0,
                            mixer_settings={"based": {"conv_kernel": 0}})).cuda()  # as the sweep
    opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-3, device="cuda"), fused=True, capturable=True)
    return TrainStep(model, opt, x, y, 256, graph=graph)


def ms_per_step(step: TrainStep, order: torch.Tensor, n: int = 30) -> float:
    for i in range(5):  # the eager warm-up steps and the capture
        step(order[(i % 8) * 256 : (i % 8 + 1) * 256])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(n):
        step(order[(i % 8) * 256 : (i % 8 + 1) * 256])
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e3


order = torch.randperm(2048, device="cuda")
for mixers in MIXERS:
    name = mixers if isinstance(mixers, str) else "+".join(mixers)
    for d in (64, 256):
        ms = {}
        for precision in ("float32", "tf32"):
            with matmul_precision(precision):  # the capture bakes the matmul kernels in: build and capture inside
                ms[precision] = ms_per_step(build(mixers, d), order)
        print(f"{name:28} d {d:3}: float32 {ms['float32']:.2f} ms, tf32 {ms['tf32']:.2f} ms a step "
              f"({ms['float32'] / ms['tf32']:.2f}x)", flush=True)

for mixers in MIXERS:
    with matmul_precision("float32"):
        step = build(mixers, 64, graph=False)  # eager: the profiler names each kernel
        ms_per_step(step, order, 3)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for i in range(10):
                step(order[(i % 8) * 256 : (i % 8 + 1) * 256])
            torch.cuda.synchronize()
    name = mixers if isinstance(mixers, str) else "+".join(mixers)
    print(f"== {name}, d 64, 10 float32 steps of batch 256 x T 256, V 8192")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=70))
