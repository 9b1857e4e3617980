"""The hazard that ``attnkit.zoo.step.own_stream`` avoids, shown on a GPU in a second.

torch hands out its 32 pool streams per priority round-robin, so a ``torch.cuda.Stream()`` made 32 requests after
another is the same CUDA stream. Before ``own_stream``, a zoo sweep with runs side by side made one stream per run,
per warm-up step and per capture, so one run could capture its graph on the stream another run was launching on.
Here thread A adds 1 to ``x`` on its stream while the main thread captures a graph on the stream it got 32 requests
later. If A's kernel went into the capture, A's add never ran when launched, and every replay of the graph runs it.
Then the same with two ``own_stream`` blocks, which never share a stream.

    python benchmarks/zoo_stream_hazard.py        (needs CUDA; figures in notes/gpu.md)
"""

import threading

import torch

from attnkit.zoo.step import own_stream


def capture_beside(a: torch.cuda.Stream, b: torch.cuda.Stream) -> tuple[float, float]:
    """Thread A adds 1 to x on ``a`` while a graph adding 1 to y is captured on ``b``; returns x after A's add and
    x after one replay of the graph."""
    x, y = torch.zeros(1, device="cuda"), torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    graph, capturing, launched = torch.cuda.CUDAGraph(), threading.Event(), threading.Event()

    def other() -> None:
        capturing.wait(5)
        with torch.cuda.stream(a):
            x.add_(1)
        launched.set()

    thread = threading.Thread(target=other)
    thread.start()
    with torch.cuda.graph(graph, stream=b, capture_error_mode="thread_local"):
        y.add_(1)
        capturing.set()
        launched.wait(5)
    thread.join()
    torch.cuda.synchronize()
    after_add = x.item()
    graph.replay()
    torch.cuda.synchronize()
    return after_add, x.item()


assert torch.cuda.is_available(), "zoo_stream_hazard: needs a CUDA device"
a = torch.cuda.Stream()
for _ in range(31):
    torch.cuda.Stream()
b = torch.cuda.Stream()
print(f"plain streams 32 requests apart are one stream: {a.cuda_stream == b.cuda_stream}")
try:
    ran, replayed = capture_beside(a, b)
    print(f"  A's add ran when launched: {ran == 1.0} (x = {ran:g}); after one replay of the other graph x = "
          f"{replayed:g}")
except RuntimeError as exc:  # the capture or A's launch may fail instead: also the hazard
    print(f"  the capture beside A failed: {type(exc).__name__}: {exc}")
    torch.cuda.synchronize()
with own_stream() as a:
    for _ in range(31):
        torch.cuda.Stream()
    with own_stream() as b:
        print(f"own_stream blocks 32 requests apart share a stream: {a.cuda_stream == b.cuda_stream}")
        ran, replayed = capture_beside(a, b)
print(f"  A's add ran when launched: {ran == 1.0} (x = {ran:g}); after one replay of the other graph x = {replayed:g}")
