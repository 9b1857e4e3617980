"""Time spent in attention, the method's own work included: ``run.time_attention()``.

A sparse-prefill method's claim is about attention (scoring, selection, compaction and the kernel together), a
small part of a forward at short contexts and most of it at 128K; the time to first token alone hides which.
"""

from __future__ import annotations

import time

import torch


class AttentionTimer:
    """Seconds spent in the attention calls of a run, split into prefill chunks (q > 1) and decode steps (q == 1).

    On CUDA each call is bracketed by a pair of events (no synchronisation per call; :meth:`seconds`
    synchronises once and sums); elsewhere by the wall clock. Calls inside a CUDA-graph capture or a compiled
    step are not timed: they replay without Python, so the replays would be missed anyway.
    """

    KINDS = ("prefill", "decode")

    def __init__(self) -> None:
        self.calls = dict.fromkeys(self.KINDS, 0)
        self._events: dict[str, list] = {k: [] for k in self.KINDS}
        self._wall = dict.fromkeys(self.KINDS, 0.0)

    def begin(self, query: torch.Tensor) -> tuple | None:
        """Start timing one call with ``query`` (B, H, q, D); returns the mark :meth:`end` takes (None: untimed)."""
        if torch.compiler.is_compiling():
            return None
        kind = "prefill" if query.shape[2] > 1 else "decode"
        if query.is_cuda:
            if torch.cuda.is_current_stream_capturing():
                return None
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            return kind, start
        return kind, time.perf_counter()

    def end(self, mark: tuple | None) -> None:
        if mark is None:
            return
        kind, start = mark
        self.calls[kind] += 1
        if isinstance(start, torch.cuda.Event):
            stop = torch.cuda.Event(enable_timing=True)
            stop.record()
            self._events[kind].append((start, stop))
        else:
            self._wall[kind] += time.perf_counter() - start

    def seconds(self) -> dict[str, float]:
        """{"prefill": s, "decode": s} summed over the timed calls so far."""
        out = dict(self._wall)
        for kind, pairs in self._events.items():
            if pairs:
                pairs[-1][1].synchronize()
                out[kind] += sum(a.elapsed_time(b) for a, b in pairs) / 1000
        return out


__all__ = ["AttentionTimer"]
