"""Sweeps of zoo training runs: mixers x widths x (T, N) x learning rates, into one results database.

Every run is a :class:`~attnkit.zoo.train.TrainConfig` keyed by its hash, so a sweep interrupted at any point
reruns only what is missing (finished runs are stored, cut-off runs resume from their epoch checkpoints), several
shards (``--shard i/n``) or Ray workers can share one database, and a run already stored by another sweep is not
trained again. Zoology reports, per model, the best accuracy over a learning-rate sweep: the frontier in
:mod:`attnkit.zoo.report` does the same.
"""

from __future__ import annotations

import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable

from attnkit.devices import resolve_device
from attnkit.watchdog import watching
from attnkit.zoo import train as _train_module
from attnkit.zoo.train import TrainConfig, checkpoint_meta, checkpoint_path, matmul_precision, run_name, train


def parse_mixers(spec: str) -> str | list[str]:
    """``based`` (every layer) or ``base_conv+based`` (one name per layer)."""
    names = [n.strip() for n in spec.split("+") if n.strip()]
    if not names:
        raise ValueError(f"mixer spec {spec!r} is invalid; accepted: NAME or NAME+NAME+... (one per layer)")
    return names[0] if len(names) == 1 else names


def parse_shape(spec: str) -> tuple[int, int]:
    """``256x16`` -> (seq_len 256, num_kv_pairs 16)."""
    t, sep, n = spec.lower().partition("x")
    try:
        if not sep:
            raise ValueError
        return int(t), int(n)
    except ValueError:
        raise ValueError(f"shape {spec!r} is invalid; accepted: SEQ_LENxKV_PAIRS, e.g. 256x16") from None


def parse_shard(spec: str | None) -> tuple[int, int]:
    """``i/n`` (0-based) -> (i, n); None -> (0, 1)."""
    if spec is None:
        return 0, 1
    i, sep, n = spec.partition("/")
    try:
        index, count = int(i), int(n)
        if not sep or count < 1 or not 0 <= index < count:
            raise ValueError
    except ValueError:
        raise ValueError(f"shard {spec!r} is invalid; accepted: I/N with 0 <= I < N, e.g. 0/4") from None
    return index, count


def grid(
    mixers: list[str], d_models: list[int], shapes: list[tuple[int, int]], lrs: list[float], **base: Any
) -> list[TrainConfig]:
    """Every combination as a TrainConfig (``base``: the other TrainConfig fields), validated up front. Each run
    keeps only the ``mixer_settings`` of the mixers it has, so its key (and the stored run it finds) does not depend
    on which other mixers share the sweep."""
    layers = base.pop("n_layers", None)
    settings = base.pop("mixer_settings", None) or {}
    parsed = [parse_mixers(spec) for spec in mixers]
    used = {name for mix in parsed for name in ([mix] if isinstance(mix, str) else mix)}
    if unknown := sorted(set(settings) - used):
        raise ValueError(f"zoo sweep: settings for {', '.join(unknown)}, which no run of the sweep has; "
                         f"its mixers: {', '.join(sorted(used))}")
    configs = []
    for mix in parsed:
        names = {mix} if isinstance(mix, str) else set(mix)
        base["mixer_settings"] = {k: v for k, v in settings.items() if k in names}
        n_layers = len(mix) if isinstance(mix, list) else (layers or 2)
        for d in d_models:
            for seq_len, pairs in shapes:
                for lr in lrs:
                    configs.append(TrainConfig(mixers=mix, d_model=d, n_layers=n_layers, seq_len=seq_len,
                                               num_kv_pairs=pairs, lr=lr, **base))
    return configs


def run_sweep(
    configs: list[TrainConfig],
    db: str | Path,
    checkpoint_dir: str | Path,
    shard: tuple[int, int] = (0, 1),
    executor: str = "local",
    device: str = "cpu",
    progress: bool = True,
    graph: bool | None = None,
    concurrent: int = 1,
    time_limit: float | None = None,
    whole: bool = False,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Train this shard's runs (skipping stored ones); returns the result rows of the runs it has (stored or
    trained now, ``finished`` 0 where a run stopped unfinished). ``graph``: see :func:`~attnkit.zoo.train.train`.

    ``time_limit`` seconds from now: no run starts after it, and a running one stops before an epoch that would end
    after it, leaving its checkpoint (a bounded GPU call ends by itself instead of being killed mid-epoch). With
    ``whole``, a run also stops after its first epoch of this call where the rest of it would not fit, and the
    thread takes the next run: use it for the last call before the checkpoints are lost (``train``'s
    ``deadline`` and ``whole``).

    ``concurrent`` runs train side by side in threads of this process, each on a CUDA stream of its own: kernels
    of one process's streams overlap where separate processes only time-slice a GPU (1.1-1.24x more steps per
    second on an H100 at V 8192, benchmarks/zoo_concurrent.py). Each run computes what it computes alone; wall
    times are then shared ones. ``log``: each run's lines (:func:`~attnkit.zoo.train.train`).
    """
    from attnkit.eval.store import Store

    check_concurrent(concurrent)
    resolve_device(device, "zoo: ")
    if time_limit is not None and (isinstance(time_limit, bool) or not isinstance(time_limit, (int, float))
                                   or not time_limit > 0):
        raise ValueError(f"zoo sweep: time_limit={time_limit!r} is invalid; accepted: seconds > 0")
    deadline = None if time_limit is None else train_clock() + time_limit
    index, count = shard
    mine = configs[index::count]
    if executor == "ray":
        if time_limit is not None:
            raise ValueError("zoo sweep: time_limit works with the local executor only (a bounded call on one GPU)")
        return _run_ray(mine, str(db), str(checkpoint_dir), device, graph)
    if executor != "local":
        raise ValueError(f"unknown executor '{executor}'; available: local, ray")
    with Store(db) as store:
        stored = {c.key(): row for c in mine if (row := store.zoo_run(c.key())) is not None}
    todo = [c for c in mine if c.key() not in stored]
    if concurrent > 1 and len({c.precision for c in todo}) > 1:  # the matmul precision is the process's
        kinds = ", ".join(sorted({c.precision for c in todo}))
        raise ValueError(f"zoo sweep: concurrent={concurrent} with precisions {kinds}; accepted: one precision for "
                         "runs side by side, or concurrent=1")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), initial=len(mine) - len(todo), unit="run", desc="zoo sweep", dynamic_ncols=True)

    stop = threading.Event()  # set on Ctrl-C (or a failed run): running runs drop their epoch at the next step

    def one(cfg: TrainConfig) -> dict[str, Any] | None:
        if stop.is_set() or (deadline is not None and train_clock() >= deadline):
            return None  # started no more: interrupted, or the time limit has passed
        # on CUDA each run trains on a stream of its own (train); a stall dump watches each run on its own
        with Store(db) as own, watching(run_name(cfg)):
            return train(cfg, own, checkpoint_dir, device, progress=False, graph=graph, deadline=deadline,
                         whole=whole, log=log, stop=stop)

    done: dict[str, dict[str, Any]] = {}
    with matmul_precision(todo[0].precision if todo else "float32"), ThreadPoolExecutor(concurrent) as pool:
        futures = {pool.submit(one, cfg): cfg for cfg in todo}
        try:
            for future in as_completed(futures):
                cfg, row = futures[future], future.result()
                if row is None:
                    continue
                done[cfg.key()] = row
                if bar is not None and row["finished"]:
                    bar.update(1)
                    bar.set_postfix(last=f"{row['mixers']} d{cfg.d_model} acc {row['accuracy']:.3f}")
        except BaseException:  # a failed run or ^C: start no more, and the running ones stop at their next step
            stop.set()
            for future in futures:
                future.cancel()
            raise
    if bar is not None:
        bar.close()
    return [row for c in mine if (row := stored.get(c.key()) or done.get(c.key())) is not None]


def run_status(configs: list[TrainConfig], db: str | Path, checkpoint_dir: str | Path,
               shard: tuple[int, int] = (0, 1)) -> list[tuple[TrainConfig, str]]:
    """Where each of this shard's runs stands, without training: ``stored: accuracy A after E epochs``,
    ``checkpoint: epoch E/N, best A`` (resumes there), ``checkpoint unreadable`` or ``to train``."""
    from attnkit.eval.store import Store

    index, count = shard
    out = []
    with Store(db) as store:
        for cfg in configs[index::count]:
            key = cfg.key()
            if (row := store.zoo_run(key)) is not None:
                epochs = f"{row['epochs']} epoch" + ("s" if row["epochs"] != 1 else "")
                out.append((cfg, f"stored: accuracy {row['accuracy']:.3f} after {epochs}"))
            elif (path := checkpoint_path(checkpoint_dir, key)).exists():
                meta = checkpoint_meta(path)
                out.append((cfg, "checkpoint unreadable: training it refuses the file (delete it to start over)"
                            if meta is None else f"checkpoint: epoch {meta['epoch']}/{cfg.epochs}, best "
                            f"{meta['best']:.3f}"))
            else:
                out.append((cfg, "to train"))
    return out


def train_clock() -> float:
    """``attnkit.zoo.train.now``, looked up at each call (a test may replace it)."""
    return _train_module.now()


def check_concurrent(value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"zoo sweep: concurrent={value!r} is invalid; accepted: an integer >= 1 (runs side by side)")


def _run_ray(configs: list[TrainConfig], db: str, checkpoint_dir: str, device: str,
             graph: bool | None = None) -> list[dict[str, Any]]:
    from attnkit.eval.executors import require_ray

    ray = require_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(include_dashboard=False, log_to_driver=False)

    @ray.remote(num_gpus=1 if device.startswith("cuda") else 0)
    def one(fields: dict[str, Any]) -> dict[str, Any]:
        from attnkit.eval.store import Store

        with Store(db) as store:
            return train(TrainConfig(**fields), store, checkpoint_dir, device, progress=False, graph=graph)

    try:
        return ray.get([one.remote(dataclasses.asdict(c)) for c in configs])
    finally:
        if started:
            ray.shutdown()
