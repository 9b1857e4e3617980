"""Training steps per second of K zoo runs side by side in one process (`attnkit zoo sweep --concurrent K`), each
a thread replaying its CUDA-graph step on a stream of its own, against one run alone, at the V 8192 sweep's settings
(batch 256, T 256, 64 pairs, no MLP, float32). Separate processes only time-slice a GPU (fifteenth session: 9
processes finished none of their runs in 500 s), while one process's streams can overlap; how much depends on how
much of the card one run's kernels leave idle. On an H100: 1.10-1.24x for 4-8 runs (twentieth session).

    python benchmarks/zoo_concurrent.py        (needs CUDA; figures in notes/gpu.md)
"""

import threading
import time

import torch

from attnkit.zoo.lm import LMConfig, TinyLM
from attnkit.zoo.mqar import mqar
from attnkit.zoo.step import TrainStep, own_stream
from attnkit.zoo.train import matmul_precision

assert torch.cuda.is_available(), "zoo_concurrent: needs a CUDA device"
x, y = (t.cuda() for t in mqar(2048, 8192, 256, 64, 0.01, seed=1))
MIXERS = (["base_conv", "softmax"], ["base_conv", "based"], ["base_conv", "sliding_window"])
STEPS = 40


def build(mixers, d: int) -> TrainStep:
    torch.manual_seed(0)
    model = TinyLM(LMConfig(vocab_size=8192, d_model=d, mixers=mixers, n_layers=2, mlp_ratio=0,
                            mixer_settings={"based": {"conv_kernel": 0}})).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(1e-3, device="cuda"), fused=True, capturable=True)
    return TrainStep(model, opt, x, y, 256, graph=True)


def worker(step: TrainStep, order: torch.Tensor, n: int, ready: threading.Barrier, times: list) -> None:
    with own_stream() as stream:  # never a stream another worker holds (torch's pool is round-robin)
        for i in range(5):  # the eager warm-up steps and the capture
            step(order[(i % 8) * 256 : (i % 8 + 1) * 256])
        stream.synchronize()
        ready.wait()
        t0 = time.perf_counter()
        for i in range(n):
            step(order[(i % 8) * 256 : (i % 8 + 1) * 256])
        stream.synchronize()
        times.append((t0, time.perf_counter()))


def steps_per_second(mixers, d: int, k: int) -> float:
    order = torch.randperm(2048, device="cuda")
    steps = [build(mixers, d) for _ in range(k)]
    ready, times = threading.Barrier(k), []
    threads = [threading.Thread(target=worker, args=(s, order, STEPS, ready, times)) for s in steps]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = max(e for _, e in times) - min(s for s, _ in times)
    return k * STEPS / wall


with matmul_precision("float32"):
    for mixers in MIXERS:
        for d in (64, 256):
            rates = {k: steps_per_second(mixers, d, k) for k in (1, 2, 4, 8)}
            base = rates[1]
            print(f"{'+'.join(mixers):28} d {d:3}: " + ", ".join(
                f"K {k}: {r:6.1f} steps/s ({r / base:.2f}x)" for k, r in rates.items()), flush=True)
