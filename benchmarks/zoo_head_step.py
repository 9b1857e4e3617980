"""One MQAR training step of attnkit.zoo's TinyLM with the head over every position against the head at the
labelled positions only (what ``attnkit zoo train`` does): the same loss and gradients, less work at V 8192.

    python benchmarks/zoo_head_step.py            (CPU figures in notes/session-2026-12-06n.md)
"""

import time

import torch

from attnkit.zoo.lm import LMConfig, TinyLM
from attnkit.zoo.mqar import mqar

torch.manual_seed(0)
device = "cuda" if torch.cuda.is_available() else "cpu"
for d, kv in ((64, 16), (128, 64)):
    model = TinyLM(LMConfig(vocab_size=8192, d_model=d, mixers=["base_conv", "based"], n_layers=2)).to(device)
    x, y = (t.to(device) for t in mqar(32, 8192, 256, kv, 0.01, seed=1))
    at = y != -100
    loss_fn = torch.nn.CrossEntropyLoss(ignore_index=-100)
    res = {}
    for name, f in (("all positions", lambda: loss_fn(model(x).flatten(0, 1), y.flatten())),
                    ("labelled only", lambda: loss_fn(model(x, at=at), y[at]))):
        f().backward()
        sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
        sync()
        t0 = time.perf_counter()
        for _ in range(5):
            model.zero_grad()
            f().backward()
        sync()
        res[name] = (time.perf_counter() - t0) / 5 * 1e3
    times = ", ".join(f"{k} {v:.1f} ms" for k, v in res.items())
    print(f"d {d}, {kv} pairs, batch 32, T 256, V 8192 ({device}, {torch.get_num_threads()} threads): {times} -> "
          f"{res['all positions'] / res['labelled only']:.2f}x")
