"""Where one MQAR training step of attnkit.zoo's TinyLM spends its GPU time at the V 8192 sweep's settings (batch
256, T 256, 64 pairs): the top kernels of 10 steps under torch.profiler, per mixer at d 64. The CUDA-graph step
gained only 1.01-1.03x (sixteenth session, H100): the step is 8-33 ms of kernel work, not launches.

    python benchmarks/zoo_step_profile.py        (needs CUDA; figures in notes/gpu.md)
"""

import torch
from torch.profiler import ProfilerActivity, profile

from attnkit.zoo.lm import LMConfig, TinyLM
from attnkit.zoo.mqar import mqar
from attnkit.zoo.step import TrainStep

assert torch.cuda.is_available(), "zoo_step_profile: needs a CUDA device"
x, y = (t.cuda() for t in mqar(2048, 8192, 256, 64, 0.01, seed=1))
for mixers in ("softmax", ["base_conv", "based"], ["base_conv", "sliding_window"]):
    torch.manual_seed(0)
    model = TinyLM(LMConfig(vocab_size=8192, d_model=64, mixers=mixers, n_layers=2)).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    step = TrainStep(model, opt, x, y, 256)
    order = torch.randperm(2048, device="cuda")
    for i in range(3):
        step(order[i * 256 : (i + 1) * 256])
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(10):
            step(order[(i % 8) * 256 : (i % 8 + 1) * 256])
        torch.cuda.synchronize()
    name = mixers if isinstance(mixers, str) else "+".join(mixers)
    print(f"== {name}, d 64, 10 steps of batch 256 x T 256, V 8192")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70))
