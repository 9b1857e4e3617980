"""One MQAR training step, eager or replayed from a CUDA graph.

A zoo model is tiny: on a GPU its training step is a few hundred small kernels whose launches cost more than their
work (4.0-4.5 ms a step on the H200 at any width, fifteenth session). Replaying the whole step (gather of the batch,
forward, backward, fused AdamW) from one CUDA graph leaves the host three launches a step: the batch's row indices,
the learning rate, the replay. The graph needs fixed shapes and no host synchronisation, so:

- the labelled positions are gathered by index (each MQAR row has the same number of query positions) instead of a
  boolean mask, whose count would be read back to the host;
- the learning rate is a device tensor that the step fills in place (AdamW ``capturable=True``);
- the first ``WARMUP`` steps run eagerly on a side stream, as CUDA graph capture requires; they are real training
  steps, so the graph trains exactly the eager recipe. Warm-up and capture use the caller's stream where it is
  one of its own (a run's :func:`own_stream`), else one side stream per step;
- an epoch's last, smaller batch runs eagerly through the same parameters and optimizer state;
- the host stays at most ``AHEAD`` replays ahead of the GPU (:class:`Throttle`). Unbounded, it ran up to an epoch
  (~700 steps) ahead, so a replay could wait on a full launch queue while holding ``_CAPTURE``, and runs side by
  side waited on one another's queues.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

WARMUP = 3  # eager steps before the capture (allocator and cuBLAS workspaces settle)
AHEAD = 4  # graph replays a run may have queued (20-60 ms of GPU work at the V 8192 sweep's sizes: none goes idle)
# runs trained side by side in threads (``zoo sweep --concurrent``): one capture at a time, and no replay while
# another thread captures (torch refuses a replay then: "Cannot prepare for replay during capturing stage", which
# stopped the V 8192 sweep on an H100 once a finished run's successor captured beside replaying runs). A replay
# only enqueues the graph, so holding the lock for it costs the others microseconds.
_CAPTURE = threading.Lock()


# streams held by runs of this process (own_stream): torch hands out its 32 pool streams per priority round-robin,
# so a plain torch.cuda.Stream() 32 requests after another returns the same stream. Two runs side by side then
# share one: one run's kernels land in the other's graph capture (seen as sweeps stalling on an H100, session 25).
_HELD: set[int] = set()
_HELD_LOCK = threading.Lock()
POOL_STREAMS = 32  # torch's pool size per priority (c10/cuda/CUDAStream.cpp)


@contextlib.contextmanager
def own_stream(device: str | torch.device | None = None) -> Iterator[torch.cuda.Stream]:
    """A CUDA pool stream that no other :func:`own_stream` block of this process holds, current inside the block;
    its work is finished before another block may take it."""
    with _HELD_LOCK:
        for _ in range(POOL_STREAMS):
            stream = torch.cuda.Stream(device)
            if stream.cuda_stream not in _HELD:
                break
        else:
            raise RuntimeError(f"zoo: every one of torch's {POOL_STREAMS} pool streams is held by a run of this "
                               f"process; accepted: at most {POOL_STREAMS} runs side by side")
        _HELD.add(stream.cuda_stream)
    try:
        with torch.cuda.stream(stream):
            yield stream
        stream.synchronize()  # not after an error: a failed CUDA call would hide the first one
    finally:
        with _HELD_LOCK:
            _HELD.discard(stream.cuda_stream)


class Throttle:
    """At most ``ahead`` launches of one stream in flight: :meth:`wait` before a launch blocks (GIL released) until
    the launch ``ahead`` back has run; :meth:`mark` after it records an event on the current stream."""

    def __init__(self, ahead: int = AHEAD, event: Callable[[], Any] | None = None) -> None:
        self.ahead = ahead
        self._event = event or torch.cuda.Event
        self._pending: deque[Any] = deque()  # events of the launches in flight, oldest first
        self._spare: Any = None

    def wait(self) -> None:
        if len(self._pending) >= self.ahead:
            self._spare = self._pending.popleft()
            self._spare.synchronize()

    def mark(self) -> None:
        event, self._spare = self._spare or self._event(), None
        event.record()
        self._pending.append(event)


def label_positions(labels: torch.Tensor) -> torch.Tensor | None:
    """(n, T) labels with -100 off the query positions -> (n, N) positions of the N labels of each row, or None when
    rows differ in their number of labels (then only the boolean-mask step applies)."""
    at = labels != -100
    counts = at.sum(1)
    if len(counts) == 0 or not bool((counts == counts[0]).all()) or int(counts[0]) == 0:
        return None
    return at.nonzero()[:, 1].view(len(labels), int(counts[0]))  # row-major: the order of h[at]


class TrainStep:
    """Forward, loss, backward and optimizer step on the rows ``idx`` of a training set held on the device.

    x : (n, T) long inputs.   y : (n, T) long labels, -100 off the labelled positions.
    ``graph=True`` (CUDA only, and rows with equal label counts) replays full batches of ``batch_size`` rows from
    one CUDA graph; the optimizer must then be AdamW with ``capturable=True`` and a tensor learning rate.
    """

    def __init__(self, model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                 batch_size: int, graph: bool = False) -> None:
        self.model, self.opt, self.x, self.y, self.batch_size = model, opt, x, y, batch_size
        self.loss_fn = nn.CrossEntropyLoss(ignore_index=-100)
        self.pos = label_positions(y)
        self.y_at = None if self.pos is None else y.gather(1, self.pos)  # (n, N) the labels at those positions
        if graph and (self.pos is None or x.device.type != "cuda"):
            raise ValueError("zoo train: a CUDA-graph step needs a CUDA device and the same number of labels in every "
                             f"row (device {x.device}, equal counts: {self.pos is not None})")
        self.graph = graph
        self._graph: torch.cuda.CUDAGraph | None = None
        self._idx: torch.Tensor | None = None
        self._loss: torch.Tensor | None = None
        self._eager_steps = 0
        self._side: torch.cuda.Stream | None = None
        self._throttle = Throttle() if graph else None

    def set_lr(self, lr: float) -> None:
        for group in self.opt.param_groups:
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(lr)  # in place: the captured optimizer reads this tensor
            else:
                group["lr"] = lr

    def _step(self, idx: torch.Tensor, set_to_none: bool = True) -> torch.Tensor:
        if self.pos is None:
            y = self.y[idx]
            at = y != -100
            loss = self.loss_fn(self.model(self.x[idx], at=at), y[at])
        else:
            loss = self.loss_fn(self.model(self.x[idx], at=self.pos[idx]), self.y_at[idx].flatten())
        self.opt.zero_grad(set_to_none=set_to_none)
        loss.backward()
        self.opt.step()
        return loss.detach()

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        """idx : (b,) long row indices on the device, b <= batch_size. Returns the batch's loss (0-d, on the device;
        reading it synchronises, so read it once an epoch)."""
        if not self.graph or len(idx) != self.batch_size:
            return self._step(idx, set_to_none=self._graph is None)  # after capture: zero the graph's grads in place
        if self._graph is None and self._eager_steps < WARMUP:
            self._eager_steps += 1
            side = self._work_stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                loss = self._step(idx)
            torch.cuda.current_stream().wait_stream(side)
            return loss
        if self._graph is None:
            self._idx = idx.clone()
            self.opt.zero_grad(set_to_none=True)
            self._graph = torch.cuda.CUDAGraph()
            # a capture stream no other thread launches on (torch's default capture stream is shared by every
            # graph) and thread-local capture checks: other threads' runs may allocate and launch meanwhile
            with _CAPTURE, torch.cuda.graph(self._graph, stream=self._work_stream(), capture_error_mode="thread_local"):
                self._loss = self._step(self._idx, set_to_none=False)
        self._idx.copy_(idx)
        self._throttle.wait()  # before taking the lock: a replay never waits for this run's queue while holding it
        with _CAPTURE:
            self._graph.replay()
        self._throttle.mark()
        return self._loss

    def _work_stream(self) -> torch.cuda.Stream:
        """The stream of the warm-up steps and the capture: the caller's, where it is not the default stream (on which
        no capture may run; a run's own_stream), else a side stream of this step's, made once."""
        current = torch.cuda.current_stream()
        if current != torch.cuda.default_stream(current.device):
            return current
        if self._side is None:
            self._side = torch.cuda.Stream(current.device)
        return self._side
