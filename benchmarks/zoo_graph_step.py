"""One MQAR training step of attnkit.zoo's TinyLM, eager against replayed from a CUDA graph (attnkit.zoo.step), at the
V 8192 sweep's settings (batch 256, T 256): ms per step, median of 3 timings of 50 steps each.

    python benchmarks/zoo_graph_step.py          (needs CUDA; figures in notes/gpu.md)
"""

import statistics
import time

import torch

from attnkit.zoo.lm import LMConfig, TinyLM
from attnkit.zoo.mqar import mqar
from attnkit.zoo.step import TrainStep

assert torch.cuda.is_available(), "zoo_graph_step: needs a CUDA device"
x, y = (t.cuda() for t in mqar(2048, 8192, 256, 64, 0.01, seed=1))
for mixers in (["base_conv", "softmax"], ["base_conv", "based"], ["base_conv", "sliding_window"]):
    for d in (64, 128, 256):
        row = []
        for graph in (False, True):
            torch.manual_seed(0)
            model = TinyLM(LMConfig(vocab_size=8192, d_model=d, mixers=mixers, n_layers=2)).cuda()
            opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-3, device="cuda"), fused=True,
                                    capturable=True)
            step = TrainStep(model, opt, x, y, 256, graph=graph)
            order = torch.randperm(2048, device="cuda")
            for i in range(8):  # warm-up and capture
                step(order[(i % 8) * 256 : (i % 8 + 1) * 256])
            times = []
            for _ in range(3):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                for i in range(50):
                    step.set_lr(1e-3)
                    step(order[(i % 8) * 256 : (i % 8 + 1) * 256])
                torch.cuda.synchronize()
                times.append((time.perf_counter() - t0) / 50 * 1e3)
            row.append(statistics.median(times))
        name = mixers if isinstance(mixers, str) else "+".join(mixers)
        print(f"{name:28} d {d:3}: eager {row[0]:.2f} ms, graph {row[1]:.2f} ms -> {row[0] / row[1]:.2f}x", flush=True)
