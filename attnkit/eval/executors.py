"""Where a sweep's cells run: ``local`` (this process, in grid order) or ``ray`` (one Ray task per cell).

Both write through :class:`~attnkit.eval.store.Store`, one committed row per sample, so either can be interrupted
and rerun, and both can share a database with other sweeps. An executor is ``run(cells, config, store, progress)
-> rows written``.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Callable

from attnkit.eval.runner import Cell, CellResult, SweepConfig, import_plugins, run_cell
from attnkit.eval.store import Store
from attnkit.watchdog import beat

Executor = Callable[[list[Cell], SweepConfig, Store, bool], int]


class _Progress:
    """tqdm over samples (or cells) with cells done and the running mean score (generative) / perplexity."""

    def __init__(self, cells: list[Cell], store: Store, total: int, initial: int, unit: str, enabled: bool,
                 cells_done: int) -> None:
        from tqdm.auto import tqdm

        self.kind = {c.key: c.kind for c in cells}
        self.n_cells, self.cells_done = len(cells), cells_done
        self.sums = {"generate": [0.0, 0], "ppl": [0.0, 0]}
        for key, score in store.scores(self.kind):
            self.add(key, score)
        self.bar = tqdm(total=total, initial=initial, unit=unit, desc="eval", disable=not enabled, dynamic_ncols=True,
                        smoothing=0.1, mininterval=0.5)
        self.refresh()

    def add(self, key: str, score: float) -> None:
        acc = self.sums["ppl" if self.kind[key] == "ppl" else "generate"]
        acc[0] += score
        acc[1] += 1

    def refresh(self) -> None:
        post = {"cells": f"{self.cells_done}/{self.n_cells}"}
        for name, (total, count) in self.sums.items():
            if count:
                post["score" if name == "generate" else "ppl"] = (
                    f"{100 * total / count:.1f}%" if name == "generate" else f"{total / count:.2f}"
                )
        self.bar.set_postfix(post, refresh=False)

    def sample_done(self) -> None:
        self.refresh()
        self.bar.update(1)
        beat()

    def cell_done(self, cell: Cell, result: CellResult, seconds: float | None) -> None:
        """One cell finished; without the bar, a timestamped line says which (the log of a batch job)."""
        self.cells_done += 1
        self.refresh()  # shown with the next sample (or at close)
        beat()
        if self.bar.disable:
            scores = result.scores
            score = "" if not scores else (f", ppl {sum(scores) / len(scores):.2f}" if cell.kind == "ppl"
                                           else f", score {100 * sum(scores) / len(scores):.1f}%")
            print(f"{time.strftime('%H:%M:%S')} eval: cell {self.cells_done}/{self.n_cells} {cell_label(cell)}: "
                  f"{result.written} new samples{score}" + ("" if seconds is None else f" in {seconds:.1f} s"),
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()


def run_local(cells: list[Cell], config: SweepConfig, store: Store, progress: bool = True) -> int:
    """Cells one after another in this process; the bar counts samples."""
    n = config.samples
    done = store.done_many(c.key for c in cells)
    initial = sum(len(done[c.key] & set(range(n))) for c in cells)
    complete = sum(set(range(n)) <= done[c.key] for c in cells)
    bar = _Progress(cells, store, len(cells) * n, initial, "sample", progress, complete)
    written = 0

    def on_sample(row: dict | None) -> None:
        if row is not None:
            bar.add(row["cell_key"], row["score"])
        bar.sample_done()

    failed: list[str] = []
    try:
        for cell in cells:
            if set(range(n)) <= done[cell.key]:
                continue
            start = time.perf_counter()
            result = cell_or_out_of_memory(cell, store, n, done[cell.key], on_sample, config.batch)
            if result is None:
                failed.append(cell_label(cell))
                continue
            written += result.written
            if result.samples and result.samples != n:  # a task that makes another number of samples than asked
                bar.bar.total += result.samples - n
            bar.cell_done(cell, result, time.perf_counter() - start)
    finally:
        bar.close()
    check_failed(failed, written)
    return written


def cell_label(cell: Cell) -> str:
    return f"{cell.method} {cell.budget or ''} {cell.task} @ {cell.length}".replace("  ", " ")


def check_failed(failed: list[str], written: int) -> None:
    """One error naming the cells that ran out of GPU memory, after the sweep did everything else."""
    if failed:
        raise MemoryError(f"{len(failed)} cell(s) ran out of GPU memory even one sample at a time "
                          f"({'; '.join(failed)}); {written} new rows were stored. Run fewer sweep processes on this "
                          "GPU, or a shorter --prefill-chunk")


def cell_or_out_of_memory(cell: Cell, store: Store, n: int, done: set[int], on_sample, batch: int,
                          device: str | None = None) -> CellResult | None:
    """``run_cell``; when the GPU runs out of memory, again one sample at a time (rows already stored are kept and
    skipped), and None when that runs out too: the sweep goes on with its other cells and names this one at the end
    (several sweep processes sharing a GPU meet the peak of one another's longest samples)."""
    import gc

    import torch

    for size in dict.fromkeys((batch, 1)):
        try:
            return run_cell(cell, store, n, done, on_sample=on_sample, device=device, batch=size)
        except torch.OutOfMemoryError as err:
            message = str(err).splitlines()[0][:160]
        gc.collect()  # out of the except block: the traceback's frames (and their tensors) are gone
        torch.cuda.empty_cache()
        print(f"attnkit eval: {cell_label(cell)} (batch {size}) ran out of GPU memory ({message})", file=sys.stderr)
    return None


# -- Ray ----------------------------------------------------------------------------------------------------------
def _ray_cell(cell: Cell, db: str, n: int, plugins: list[str], paths: list[str], batch: int = 1) -> CellResult | None:
    """One cell inside a Ray worker: its own store connection, the driver's plugins, its GPU as ``cuda``."""
    for path in paths:  # plugins may live next to the driver's script (not installed)
        if path not in sys.path:
            sys.path.append(path)
    import_plugins(plugins)
    device = "cuda" if cell.device.startswith("cuda") else cell.device
    with Store(db) as store:
        return cell_or_out_of_memory(cell, store, n, store.done(cell.key), None, batch, device)


def run_ray(cells: list[Cell], config: SweepConfig, store: Store, progress: bool = True) -> int:
    """One Ray task per cell (one GPU each on CUDA, else one CPU), each writing into the same database.

    Uses the cluster named by ``RAY_ADDRESS`` or an already initialised Ray, else starts a local instance with
    all CPUs. The database must be on a disk every worker reaches locally (one host).
    """
    ray = require_ray()
    n = config.samples
    done = store.done_many(c.key for c in cells)
    todo = [c for c in cells if not set(range(n)) <= done[c.key]]
    bar = _Progress(cells, store, len(cells), len(cells) - len(todo), "cell", progress, len(cells) - len(todo))
    if not todo:
        bar.close()
        return 0
    started = not ray.is_initialized()
    if started:
        kwargs = {} if os.environ.get("RAY_ADDRESS") else {"num_cpus": os.cpu_count()}
        ray.init(include_dashboard=False, logging_level=logging.WARNING, **kwargs)
    gpu = todo[0].device.startswith("cuda")
    remote = ray.remote(**({"num_gpus": 1} if gpu else {"num_cpus": 1}))(_ray_cell)
    db = str(store.path.resolve())
    paths = [p for p in sys.path if p]
    cell_of = {remote.remote(cell, db, n, list(config.plugins), paths, config.batch): cell for cell in todo}
    pending = list(cell_of)
    written = 0
    failed: list[str] = []
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                try:
                    result: CellResult = ray.get(ref)
                except ray.exceptions.RayTaskError as err:
                    cause = getattr(err, "cause", None)
                    if isinstance(cause, (ValueError, OSError, NotImplementedError)):
                        raise cause from None
                    raise RuntimeError(f"a Ray task failed: {cause or err}") from None
                if result is None:  # out of GPU memory even one sample at a time
                    failed.append(cell_label(cell_of[ref]))
                    result = CellResult(cell_of[ref].key)
                written += result.written
                for score in result.scores:
                    bar.add(result.key, score)
                bar.cell_done(cell_of[ref], result, None)  # cells run side by side: no seconds of their own
                bar.bar.update(1)
    except BaseException:
        for ref in pending:  # Ctrl-C or a failed cell: stop the rest; their finished samples are stored
            ray.cancel(ref, force=True)
        raise
    finally:
        bar.close()
        if started:
            ray.shutdown()
    check_failed(failed, written)
    return written


def require_ray():
    try:
        import ray
    except ImportError:
        raise ValueError("--executor ray needs Ray: pip install 'attnkit[ray]' (or pip install 'ray>=2.9')") from None
    return ray


EXECUTORS: dict[str, Executor] = {"local": run_local, "ray": run_ray}


def get_executor(name: str) -> Executor:
    if name not in EXECUTORS:
        raise ValueError(f"unknown executor '{name}'; available: {', '.join(EXECUTORS)}")
    if name == "ray":
        require_ray()
    return EXECUTORS[name]
