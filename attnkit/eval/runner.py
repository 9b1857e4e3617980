"""Sweeps: models x methods x budgets x tasks x lengths, one stored row per sample, resumable.

A *cell* is one fully resolved configuration (model file hash, method with its settings, task, length, seed, chat,
dtype, device kind, prefill chunk); its ``key`` is the sha256 of that configuration. The number of samples is not
part of it, so a later sweep with more ``--samples`` reuses the finished ones. Running a sweep skips every
(cell, sample index) already in the store and writes each new sample as soon as it is scored, so an interrupted
sweep (Ctrl-C, ``kill -9``) resumes where it stopped when run again, and concurrent sweeps on one database
neither duplicate nor lose rows.

>>> config = SweepConfig(models=["smollm2-135m"], methods=["full", "snapkv"], budgets=["256", "0.25"],
...                      tasks=["niah_single_2", "vt"], lengths=[2048, 4096], samples=20)
>>> run_sweep(config, "results.db")
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import math
import platform
import resource
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable, Iterable

import torch

import attnkit
from attnkit.devices import device_type
from attnkit.eval.sample import METRICS, Sample, build_prompt
from attnkit.eval.store import Store, attnkit_version, dumps, git_commit, source_hash
from attnkit.eval.store import model_hash as file_model_hash
from attnkit.eval.tasks import get_task
from attnkit.methods.base import Method
from attnkit.registry import method_class
from attnkit.watchdog import beat

MiB = 2**20

# -- custom models --------------------------------------------------------------------------------------------------
# name -> (loader(device, dtype) -> (model, tokenizer), identity hash): models that are not files (tests, in-memory
# variants). Register them in a plugin module (``--plugin``) so that Ray workers see them too.
_MODELS: dict[str, tuple[Callable[[str, str | None], tuple[Any, Any]], str]] = {}


def register_model(name: str, loader: Callable[[str, str | None], tuple[Any, Any]], identity: str) -> None:
    """Make ``name`` loadable by sweeps: ``loader(device, dtype) -> (model, tokenizer)``; ``identity`` stands in
    for the model file hash in cell keys (change it when the weights change)."""
    _MODELS[name] = (loader, identity)


def load(name: str, device: str, dtype: str | None) -> tuple[Any, Any]:
    """(model, tokenizer): a registered model, else :func:`attnkit.load_model`. The one loading seam."""
    if name in _MODELS:
        return _MODELS[name][0](device, dtype)
    from attnkit.models import load_model

    return load_model(name, device=device, dtype=dtype)


def model_identity(name: str, store: Store | None = None) -> str:
    """The hash that stands for the model in cell keys (file sha256, or a registered model's identity)."""
    if name in _MODELS:
        return _MODELS[name][1]
    return file_model_hash(name, store)


_LOADED: dict[tuple[str, str, str | None], tuple[Any, Any]] = {}


def get_model(name: str, device: str, dtype: str | None) -> tuple[Any, Any]:
    """Load a model once per process; only the most recent one stays in memory (the grid runs model by model)."""
    key = (name, device, dtype)
    if key not in _LOADED:
        _LOADED.clear()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        model, tokenizer = load(name, device, dtype)
        warm_up(model, tokenizer)
        _LOADED[key] = model, tokenizer
    return _LOADED[key]


def warm_up(model, tokenizer) -> None:
    """One short generation through attnkit, so the first sample's timings leave out one-off start-up costs
    (CUDA context, kernel selection)."""
    with attnkit.apply(model, "full"):
        attnkit.generate(model, tokenizer, list(range(1, 33)), max_new_tokens=2, prefill_chunk=16, stop_at_eos=False)


def import_plugins(plugins: Iterable[str]) -> None:
    """Import ``module`` or ``module:function`` (then call it): registers tasks, methods or models."""
    for spec in plugins:
        module, _, func = spec.partition(":")
        try:
            mod = importlib.import_module(module)
        except ImportError as err:
            raise ValueError(f"--plugin {spec}: cannot import '{module}' ({err})") from None
        if func:
            if not callable(getattr(mod, func, None)):
                raise ValueError(f"--plugin {spec}: '{module}' has no function '{func}'")
            getattr(mod, func)()


# -- parsing --------------------------------------------------------------------------------------------------------
def split_list(text: str | Iterable[str]) -> list[str]:
    items = text.split(",") if isinstance(text, str) else list(text)
    return [str(x).strip() for x in items if str(x).strip()]


def parse_budget(spec: str) -> tuple[str, float]:
    """``"512"`` -> ("tokens", 512); ``"0.25"`` or ``"25%"`` -> ("ratio", 0.25). ValueError otherwise."""
    text = str(spec).strip()
    bad = (f"budget '{spec}' is invalid; accepted: a token count >= 1 (e.g. 512) or a ratio of the context in "
           "(0, 1] (e.g. 0.25 or 25%)")
    try:
        if text.endswith("%"):
            ratio = float(text[:-1]) / 100
        else:
            tokens = int(text)
            if tokens < 1:
                raise ValueError(bad)
            return "tokens", tokens
    except ValueError:
        try:
            ratio = float(text)
        except ValueError:
            raise ValueError(bad) from None
    if not (0 < ratio <= 1) or math.isnan(ratio):
        raise ValueError(bad)
    return "ratio", ratio


def resolve_budget(spec: str, length: int) -> int:
    """Budget tokens for a cell of ``length`` tokens (a ratio is rounded, at least 1)."""
    kind, value = parse_budget(spec)
    return int(value) if kind == "tokens" else max(1, round(value * length))


def parse_lengths(text: str | Iterable) -> list[int]:
    """``"2048,4k,8K"`` -> [2048, 4096, 8192]."""
    out = []
    for item in split_list(text if isinstance(text, str) else map(str, text)):
        mult = 1024 if item[-1:].lower() == "k" else 1
        try:
            value = int(item[:-1] if mult > 1 else item) * mult
        except ValueError:
            value = 0
        if value < 16:
            raise ValueError(f"length '{item}' is invalid; accepted: a number of tokens >= 16 (e.g. 4096 or 4k)")
        if value not in out:
            out.append(value)
    if not out:
        raise ValueError("no lengths given")
    return out


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` with 0 <= i < n -> (i, n)."""
    index, sep, count = str(text).partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i, n = -1, 0
    if not sep or n < 1 or not 0 <= i < n:
        raise ValueError(f"shard '{text}' is invalid; accepted: i/n with 0 <= i < n (e.g. 0/4)")
    return i, n


def has_budget(cls: type[Method]) -> bool:
    """Whether the method maps a KV budget onto its settings (``full`` does not)."""
    return getattr(cls.for_budget, "__func__", None) is not Method.for_budget.__func__


def group_overrides(items: Iterable[tuple[str, str, Any]]) -> dict[str, dict[str, Any]]:
    """[(method, key, value), ...] -> {method: {key: value}}; the last value of a repeated key wins."""
    out: dict[str, dict[str, Any]] = {}
    for method, key, value in items:
        out.setdefault(method, {})[key] = value
    return out


def make_cell_method(cls: type[Method], tokens: int | None, overrides: dict[str, Any]) -> Method:
    """The method for one cell: its budget mapping (or defaults), then the overrides, validated again."""
    method = cls.for_budget(tokens) if tokens is not None else cls()
    if not overrides:
        return method
    known = {f.name for f in dataclasses.fields(method) if f.init}
    if unknown := sorted(set(overrides) - known):
        raise ValueError(f"--set {cls.name}.{unknown[0]}: {cls.name} has no setting {unknown[0]!r}; accepted: "
                         f"{', '.join(sorted(known)) or f'none ({cls.name} has no settings)'}")
    return dataclasses.replace(method, **overrides)


def resolved_dtype(dtype: str | None, device: str) -> str:
    """The dtype name that ends up in the cell key: the loader's default (float32 on CPU, bfloat16 on CUDA)."""
    aliases = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
    if dtype is None:
        return "bfloat16" if device_kind(device) == "cuda" else "float32"
    return aliases.get(dtype.lower(), dtype.lower())


def device_kind(device: str) -> str:
    """The part of the device in a cell's key: ``cpu`` or ``cuda`` (a GPU this machine may lack: it is checked when
    the model loads)."""
    return device_type(device)


# -- the grid -------------------------------------------------------------------------------------------------------
@dataclass
class SweepConfig:
    """What ``attnkit eval`` sweeps. Lists keep their order; the grid is their product, in that nesting."""

    models: list[str]
    methods: list[str]
    budgets: list[str]
    tasks: list[str]
    lengths: list[int]
    samples: int = 20
    seed: int = 42
    chat: bool = True
    device: str = "cpu"
    dtype: str | None = None
    prefill_chunk: int = 512
    shard: tuple[int, int] = (0, 1)
    plugins: list[str] = field(default_factory=list)
    batch: int = 1  # samples per padded generate call (not part of the cell key; recorded in each row)
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> settings over its budget mapping


@dataclass(frozen=True)
class Cell:
    """One resolved configuration; ``key`` identifies its rows in the store."""

    model: str
    model_hash: str
    method: str
    settings: dict
    budget: str  # as requested ("512", "0.25") or "" for methods without a budget
    budget_tokens: int | None
    task: str
    family: str
    kind: str  # "generate" | "ppl"
    length: int
    seed: int
    chat: bool
    dtype: str
    device: str  # as requested, e.g. "cuda:1"; only its kind is part of the key
    prefill_chunk: int
    key: str

    def key_config(self) -> dict[str, Any]:
        return key_config(self.model_hash, self.method, self.settings, self.task, self.length, self.seed, self.chat,
                          self.dtype, device_kind(self.device), self.prefill_chunk)

    def label(self) -> str:
        return f"{self.method}/{self.budget}" if self.budget else self.method

    def make_method(self) -> Method:
        return attnkit.make_method(self.method, **self.settings)


def key_config(model_hash, method, settings, task, length, seed, chat, dtype, device, prefill_chunk) -> dict:
    return {"model_hash": model_hash, "method": method, "settings": settings, "task": task, "length": length,
            "seed": seed, "chat": chat, "dtype": dtype, "device": device, "prefill_chunk": prefill_chunk}


def cell_key(config: dict[str, Any]) -> str:
    return hashlib.sha256(dumps(config).encode()).hexdigest()


def validate(config: SweepConfig) -> None:
    """Every name and number, checked before anything is loaded (ValueError with one line)."""
    if not config.models:
        raise ValueError("no models given")
    if not config.methods:
        raise ValueError("no methods given")
    for name in config.methods:
        method_class(name)
    if stray := sorted(set(config.overrides) - {method_class(m).name for m in config.methods}):
        raise ValueError(f"--set {stray[0]}.*: {stray[0]!r} is not among the swept methods "
                         f"({', '.join(config.methods)})")
    if config.batch < 1:
        raise ValueError(f"batch={config.batch} is invalid; accepted: an integer >= 1")
    if any(has_budget(method_class(m)) for m in config.methods) and not config.budgets:
        raise ValueError(f"give --budgets for {', '.join(m for m in config.methods if has_budget(method_class(m)))}")
    for spec in config.budgets:
        parse_budget(spec)
    for task in config.tasks:
        get_task(task)
        if get_task(task).kind != "generate" and (drivers := [m for m in config.methods if method_class(m).driver]):
            raise ValueError(f"{drivers[0]} is a generation driver; task {task!r} ({get_task(task).kind}) generates "
                             "nothing (accepted: generative tasks)")
    if not config.tasks:
        raise ValueError("no tasks given")
    if not config.lengths or any(not isinstance(x, int) or x < 16 for x in config.lengths):
        raise ValueError(f"lengths {config.lengths} are invalid; accepted: integers >= 16")
    if config.samples < 1:
        raise ValueError(f"samples={config.samples} is invalid; accepted: an integer >= 1")
    if config.prefill_chunk < 1:
        raise ValueError(f"prefill_chunk={config.prefill_chunk} is invalid; accepted: an integer >= 1")
    i, n = config.shard
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard {i}/{n} is invalid; accepted: i/n with 0 <= i < n")
    device_kind(config.device)


def build_grid(config: SweepConfig, hashes: dict[str, str]) -> list[Cell]:
    """All cells in sweep order (models x methods x budgets x tasks x lengths), identical cells once.

    ``hashes`` maps each model name to its identity (:func:`model_identity`). Methods without a budget (``full``)
    get one cell per (task, length) with budget "". Raises ValueError when a budget cannot be mapped onto a
    method's settings (e.g. too small for SnapKV's observation window).
    """
    validate(config)
    dtype = resolved_dtype(config.dtype, config.device)
    kind = device_kind(config.device)
    cells: dict[str, Cell] = {}
    for model in config.models:
        for name in config.methods:
            cls = method_class(name)
            specs = config.budgets if has_budget(cls) else [""]
            for spec in dict.fromkeys(specs):
                for task_name in config.tasks:
                    task = get_task(task_name)
                    for length in config.lengths:
                        tokens = resolve_budget(spec, length) if spec else None
                        try:
                            method = make_cell_method(cls, tokens, config.overrides.get(cls.name, {}))
                        except ValueError as err:
                            where = (f"budget {spec} ({tokens} tokens at length {length}) for {cls.name}" if spec
                                     else cls.name)
                            raise ValueError(f"{where}: {err}") from None
                        settings = method.settings()
                        key = cell_key(key_config(hashes[model], cls.name, settings, task_name, length, config.seed,
                                                  config.chat, dtype, kind, config.prefill_chunk))
                        if key not in cells:
                            cells[key] = Cell(model, hashes[model], cls.name, settings, spec, tokens, task_name,
                                              task.family, task.kind, length, config.seed, config.chat, dtype,
                                              config.device, config.prefill_chunk, key)
    return list(cells.values())


def shard(cells: list[Cell], index: int, count: int) -> list[Cell]:
    """Cells at positions ``index, index + count, ...`` of the grid: the shards partition it, evenly."""
    return cells[index::count]


# -- one sample, one cell -------------------------------------------------------------------------------------------
def _peak_mem_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # the process's peak so far: it cannot be reset
    return int(rss if sys.platform == "darwin" else rss * 1024)


@functools.cache
def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()


def evaluate_sample(model, tokenizer, cell: Cell, task, sample: Sample) -> dict[str, Any]:
    """Run one sample through the cell's method and return its results row."""
    return evaluate_batch(model, tokenizer, cell, task, [sample])[0]


def evaluate_batch(model, tokenizer, cell: Cell, task, samples: list[Sample]) -> list[dict[str, Any]]:
    """Run samples through the cell's method, generative ones as one left-padded batch; one results row each.

    Rows of a batch share its timings (prefill seconds and seconds per decode step are the batch's) and report
    an equal share of its peak KV bytes; ``extra["batch"]`` records the batch size. Perplexity samples run one
    at a time.
    """
    if (task.kind == "ppl" or method_class(cell.method).driver) and len(samples) > 1:  # drivers: one per call
        return [r for s in samples for r in evaluate_batch(model, tokenizer, cell, task, [s])]
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    extras = [dict(s.extra, batch=len(samples)) for s in samples]
    with attnkit.apply(model, cell.make_method()) as run:
        if task.kind == "ppl":
            t0 = time.perf_counter()
            tail = getattr(task, "decode_tail", 0)  # score the last tokens, decoded one step at a time
            nll = attnkit.perplexity(model, tokenizer, samples[0].input, chunk=cell.prefill_chunk, decode_tail=tail)
            prefill_s = time.perf_counter() - t0
            scored = nll[-tail:] if tail else nll
            outcomes = [(math.exp(scored.double().mean().item()), "", nll.numel() + 1, None)]
            extras[0]["nll"] = [round(x, 4) for x in nll.tolist()]
        elif task.kind == "choice":  # classification / multiple choice: option logits, no generation
            from attnkit.eval.choice import score_choices

            t0 = time.perf_counter()
            scored = score_choices(model, tokenizer, samples, chat=cell.chat and getattr(task, "use_chat_template",
                                   False), prefill_chunk=cell.prefill_chunk)
            prefill_s = time.perf_counter() - t0
            outcomes = [(float(r["correct"]), s.extra["options"][r["pred"]], r["prompt_tokens"], None)
                        for s, r in zip(samples, scored)]
            for extra, r in zip(extras, scored):
                extra.update(r)
        else:
            if run.method.driver:  # a generation driver reads the sample's document its own way
                from attnkit.methods.driver import drive_sample

                gens = [drive_sample(run.method, model, tokenizer, s, cell.chat, cell.prefill_chunk) for s in samples]
            else:
                prompts = [build_prompt(tokenizer, s, cell.chat) for s in samples]
                gens = attnkit.generate(model, tokenizer, prompts,
                                        max_new_tokens=max(s.max_new_tokens for s in samples),
                                        prefill_chunk=cell.prefill_chunk, stop_at_eos=True)
                gens = gens if isinstance(gens, list) else [gens]
            outcomes = []
            for s, gen, extra in zip(samples, gens, extras):
                tokens = gen.tokens[: s.max_new_tokens]
                text = tokenizer.decode(tokens, skip_special_tokens=True) if len(tokens) < len(gen.tokens) else gen.text
                s_per_token = None if math.isnan(gen.s_per_token) else gen.s_per_token
                outcomes.append((float(METRICS[s.metric](text, s.references)), text, gen.prompt_tokens, s_per_token))
                extra["new_tokens"] = len(tokens)
                if "reader" in gen.stats:  # what a driver read and kept
                    extra["reader"] = gen.stats["reader"]
            prefill_s = gens[0].prefill_s
            share = run.method.extra_stats(run).get("prefill_read_share")
            if share is not None:  # sparse prefill: the share of causal (query, key) pairs attended (the batch's)
                for extra in extras:
                    extra["prefill_read_share"] = round(share, 4)
        kv_peak = run.peak_kv_bytes // len(samples)
    config = {**cell.key_config(), "model": cell.model, "budget": cell.budget, "budget_tokens": cell.budget_tokens,
              "family": cell.family, "kind": cell.kind, "device_name": _device_name(device),
              "torch": torch.__version__, "transformers": _transformers_version(), "python": platform.python_version(),
              "attnkit_source": source_hash()}
    peak_mem = _peak_mem_bytes(device)
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    rows = []
    for sample, extra, (score, prediction, prompt_tokens, s_per_token) in zip(samples, extras, outcomes):
        rows.append({
            "cell_key": cell.key,
            "sample_index": sample.index,
            "model": cell.model,
            "model_hash": cell.model_hash,
            "method": cell.method,
            "settings_json": dumps(cell.settings),
            "budget": cell.budget,
            "budget_tokens": cell.budget_tokens,
            "task": cell.task,
            "family": cell.family,
            "length": cell.length,
            "depth": sample.extra.get("depth"),
            "seed": cell.seed,
            "prompt_tokens": int(prompt_tokens),
            "score": score,
            "prediction": prediction,
            "references_json": dumps(list(sample.references)),
            "kv_bytes_peak": int(kv_peak),
            "prefill_s": float(prefill_s),
            "decode_s_per_token": s_per_token,
            "peak_mem_bytes": peak_mem,
            "device": device.type,
            "dtype": cell.dtype,
            "extra_json": dumps(extra),
            "attnkit_version": attnkit_version(),
            "git_commit": git_commit(),
            "config_json": dumps(config),
            "created_at": created,
        })
    return rows


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


@dataclass
class CellResult:
    key: str
    written: int = 0  # rows this call stored
    skipped: int = 0  # samples found in the store (before or while running)
    samples: int = 0  # samples the task produced (0: the cell was complete and nothing was loaded)
    scores: list[float] = field(default_factory=list)  # of the rows written


_SAMPLES: dict[tuple, tuple[Any, list[Sample]]] = {}  # the last few cells' samples: methods of one sweep share them


def task_samples(task, cell: Cell, tokenizer, n: int) -> list[Sample]:
    """``task.samples(...)`` for the cell, reused across the methods of a sweep (a task's samples depend only on
    (task, tokenizer, length, n, seed, chat)); a small cache, since building them tokenises whole haystacks."""
    key = (cell.task, id(tokenizer), cell.length, n, cell.seed, cell.chat)
    if key not in _SAMPLES:
        if len(_SAMPLES) >= 32:
            _SAMPLES.pop(next(iter(_SAMPLES)))
        # the tokenizer is held with its samples, so its id cannot be reused by another while cached
        _SAMPLES[key] = tokenizer, task.samples(tokenizer, cell.length, n, cell.seed, chat=cell.chat)
    return _SAMPLES[key][1]


_NOTED: set[tuple[str, int]] = set()  # (model, length) pairs already noted as past the trained context


def note_past_context(model, cell: Cell) -> None:
    """Once per model and length: a line on stderr when the cell's length is past the positions the model was
    trained on (its scores then measure length extrapolation, which is what StreamingLLM-style methods are for)."""
    trained = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if trained is None or cell.length <= trained or (cell.model, cell.length) in _NOTED:
        return
    _NOTED.add((cell.model, cell.length))
    print(f"attnkit eval: note: {cell.model} was trained on {trained:,} positions; its cells at {cell.length:,} "
          "tokens run past them", file=sys.stderr, flush=True)


def run_cell(cell: Cell, store: Store, n: int, done: set[int] | None = None,
             on_sample: Callable[[dict | None], None] | None = None, device: str | None = None,
             batch: int = 1) -> CellResult:
    """Score the cell's samples ``0..n-1`` that are not in the store yet; rows are committed as scored.

    ``on_sample(row)`` is called after each sample written, ``on_sample(None)`` for one another sweep wrote
    meanwhile. ``device`` overrides ``cell.device`` for loading (Ray workers see their GPU as ``cuda``).
    ``batch`` > 1 scores that many pending samples per padded generate call (an interrupted batch is redone).
    """
    if batch < 1:
        raise ValueError(f"batch={batch} is invalid; accepted: an integer >= 1")
    done = store.done(cell.key) if done is None else done
    result = CellResult(cell.key)
    if set(range(n)) <= done:
        return result
    model, tokenizer = get_model(cell.model, device or cell.device, cell.dtype)
    note_past_context(model, cell)
    task = get_task(cell.task)
    samples = task_samples(task, cell, tokenizer, n)
    beat()  # loading and the haystacks count as progress for a stall dump (attnkit.watchdog)
    result.samples = len(samples)
    pending = []
    for sample in samples:
        if sample.index in done or store.has(cell.key, sample.index):  # another sweep may have written it
            result.skipped += 1
            if sample.index not in done and on_sample is not None:
                on_sample(None)
            continue
        pending.append(sample)
    for start in range(0, len(pending), batch):
        for row in evaluate_batch(model, tokenizer, cell, task, pending[start: start + batch]):
            if store.add(row):
                result.written += 1
                result.scores.append(row["score"])
            if on_sample is not None:
                on_sample(row)
    return result


# -- sweeps ---------------------------------------------------------------------------------------------------------
@dataclass
class SweepResult:
    cells: list[Cell]  # the whole grid
    ran: list[Cell]  # this shard's cells
    written: int  # rows stored by this sweep
    total: int  # samples this shard asked for (cells x n)
    stored: int  # of them, in the store at the end


def check(config: SweepConfig) -> None:
    """Every name and value of the sweep, before its database is created or a model file is read (a typo leaves
    nothing behind)."""
    from attnkit.models import _resolve_source  # the loader's own name check (ModelLoadError), no file read

    import_plugins(config.plugins)
    validate(config)
    for name in dict.fromkeys(config.models):
        if name not in _MODELS:
            _resolve_source(name)
    build_grid(config, dict.fromkeys(config.models, ""))  # budgets and --set values, per cell


def prepare(config: SweepConfig, store: Store) -> tuple[list[Cell], list[Cell]]:
    """(grid, this shard's cells), everything validated; nothing loaded except model hashes."""
    import_plugins(config.plugins)
    validate(config)
    hashes = {m: model_identity(m, store) for m in dict.fromkeys(config.models)}
    cells = build_grid(config, hashes)
    return cells, shard(cells, *config.shard)


def run_sweep(config: SweepConfig, db: str, executor: str = "local", progress: bool = True) -> SweepResult:
    """Run this shard of the grid into ``db``, skipping what is stored; KeyboardInterrupt propagates (rows kept)."""
    from attnkit.eval.executors import get_executor

    run = get_executor(executor)  # fails fast (e.g. Ray missing) before any work
    check(config)
    with Store(db) as store:
        cells, mine = prepare(config, store)
        written = run(mine, config, store, progress)
        done = store.done_many(c.key for c in mine)
        stored = sum(len(done[c.key] & set(range(config.samples))) for c in mine)
    return SweepResult(cells, mine, written, len(mine) * config.samples, stored)


# -- summary --------------------------------------------------------------------------------------------------------
def summary_table(store: Store, cells: list[Cell]) -> str:
    """Markdown: one row per model x method/budget, mean score per task (%, perplexity for ppl tasks), mean of
    the generative tasks, mean ms per decoded token and peak KV MiB. Means run over lengths and samples."""
    by_key = {c.key: c for c in cells}
    rows = store.rows(cell_key=list(by_key))
    tasks = list(dict.fromkeys(c.task for c in cells))
    ppl = {c.task for c in cells if c.kind == "ppl"}
    models = list(dict.fromkeys(c.model for c in cells))
    labels = list(dict.fromkeys((c.model, c.method, c.budget) for c in cells))
    scores: dict[tuple, list[float]] = {}
    speed: dict[tuple, list[float]] = {}
    kv: dict[tuple, int] = {}
    for r in rows:
        c = by_key[r["cell_key"]]
        label = (c.model, c.method, c.budget)
        scores.setdefault(label + (c.task,), []).append(r["score"])
        if r["decode_s_per_token"] is not None:
            speed.setdefault(label, []).append(r["decode_s_per_token"])
        kv[label] = max(kv.get(label, 0), r["kv_bytes_peak"])

    def mean(xs):
        return sum(xs) / len(xs) if xs else None

    head = (["model"] if len(models) > 1 else []) + ["method", "budget"]
    head += [f"{t} (ppl)" if t in ppl else t for t in tasks] + ["avg", "ms/token", "peak KV MiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for label in labels:
        model, method, budget = label
        cols = ([model] if len(models) > 1 else []) + [method, budget or "-"]
        generative = []
        for t in tasks:
            m = mean(scores.get(label + (t,), []))
            if m is not None and t not in ppl:
                generative.append(m)
            cols.append("-" if m is None else f"{m:.2f}" if t in ppl else f"{100 * m:.1f}")
        avg, ms = mean(generative), mean(speed.get(label, []))
        cols.append("-" if avg is None else f"{100 * avg:.1f}")
        cols.append("-" if ms is None else f"{1000 * ms:.1f}")
        cols.append(f"{kv[label] / MiB:.2f}" if label in kv else "-")
        lines.append("| " + " | ".join(cols) + " |")
    return "\n".join(lines)
