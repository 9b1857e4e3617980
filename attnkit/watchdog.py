"""Stall dumps for long batch jobs (``--stall-dump S`` of ``attnkit eval`` and ``attnkit zoo sweep``).

A GPU job that hangs (a deadlock between threads, a capture that never ends) otherwise spends its whole time bound
in silence and leaves no trace. Armed, the dump waits S seconds for the job's next sign of progress (:func:`beat`:
a stored sample, a log line); when none comes, every thread's Python stack goes to stderr and the process ends with
status 1. What the job stored stays (rows, checkpoints), so the same command resumes it.

faulthandler keeps one timer per process, so one dump is armed at a time. Jobs that run several things side by
side in threads (``zoo sweep --concurrent``) mark each with :func:`watching`: then one that hangs while the others go
on still ends the process, within twice the wait, and a line names it first.
"""

from __future__ import annotations

import contextlib
import faulthandler
import math
import sys
import threading
import time
from collections.abc import Iterator

_seconds: float | None = None  # the armed dump's wait, None when none is armed
_lock = threading.Lock()
_watched: dict[int, list] = {}  # thread id -> [label, time of its last beat, named as silent], inside watching()
clock = time.monotonic  # a test may replace it


def check_seconds(seconds: object, command: str) -> float:
    """``seconds`` as a float, or one clear error naming it."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not 0 < seconds < math.inf:
        raise ValueError(f"{command}: --stall-dump {seconds!r} is invalid; accepted: seconds > 0 (finite)")
    return float(seconds)


@contextlib.contextmanager
def stall_dump(seconds: float | None, command: str = "attnkit") -> Iterator[None]:
    """Inside the block, a stretch of ``seconds`` without :func:`beat` dumps every stack and ends the process;
    ``None``: nothing is armed."""
    global _seconds
    if seconds is None:
        yield
        return
    seconds = check_seconds(seconds, command)
    with _lock:
        if _seconds is not None:
            raise RuntimeError(f"{command}: a stall dump is already armed in this process")
        _seconds = seconds
        faulthandler.dump_traceback_later(seconds, exit=True)
    try:
        yield
    finally:
        with _lock:
            faulthandler.cancel_dump_traceback_later()
            _seconds = None


@contextlib.contextmanager
def watching(label: str) -> Iterator[None]:
    """Inside the block, this thread's own beats count: once it has been silent for the armed wait, other threads'
    beats no longer re-arm the dump (a line on stderr names ``label``), so the dump comes within twice the wait
    unless this thread beats again."""
    ident = threading.get_ident()
    with _lock:
        _watched[ident] = [label, clock(), False]
    try:
        yield
    finally:
        with _lock:
            _watched.pop(ident, None)


def beat() -> None:
    """Progress: the armed dump waits its whole time again, unless a :func:`watching` thread has been silent for
    that long (nothing when none is armed). Any thread may call it."""
    with _lock:
        if _seconds is None:
            return
        now = clock()
        if (mine := _watched.get(threading.get_ident())) is not None:
            mine[1:] = [now, False]
        silent = [entry for entry in _watched.values() if now - entry[1] >= _seconds]
        for entry in silent:
            if not entry[2]:
                entry[2] = True
                print(f"attnkit: {entry[0]}: silent for {now - entry[1]:.0f} s; every thread's stack follows within "
                      f"{_seconds:.0f} s unless it goes on", file=sys.stderr, flush=True)
        if not silent:
            faulthandler.dump_traceback_later(_seconds, exit=True)
