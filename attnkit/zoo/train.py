"""Training a :class:`~attnkit.zoo.lm.TinyLM` on MQAR: AdamW, cosine schedule, early stop, resumable, stored.

The recipe of Zoology / BASED's MQAR runs: AdamW (weight decay 0.1), a cosine learning-rate schedule with a short
linear warm-up, one pass over a fixed training set per epoch in a seeded order, the test set scored after every
epoch, training stopped once test accuracy reaches ``early_stop`` (0.99). One run is one :class:`TrainConfig`;
its key is the sha256 of the resolved config, its result one row of the ``zoo_runs`` table of an attnkit results
database (the same SQLite file ``attnkit eval`` writes). A run already stored is not trained again; a run cut off
resumes from its last epoch checkpoint (safetensors: weights, optimizer moments, epoch counters; never pickle).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from attnkit.devices import resolve_device
from attnkit.zoo.base import check_float, check_int
from attnkit.zoo.datacache import mqar_set
from attnkit.zoo.lm import LMConfig, TinyLM
from attnkit.zoo.mqar import mqar, mqar_accuracy
from attnkit.zoo.registry import build_mixer
from attnkit.zoo.step import TrainStep, label_positions, own_stream

TASKS = ("mqar",)
PRECISIONS = ("float32", "tf32")
# Zoology's MQAR data (zoology/experiments/mqar_example_configs/original_mqar_configs.py and the BASED figure 2
# configs): one model trained on five segments, tested on seven configs, V 8192
ZOOLOGY_TRAIN_MIX = "64x4:100000,128x8:20000,256x16:20000,256x32:20000,256x64:20000"
ZOOLOGY_TEST_MIX = "64x4:1000,64x8:1000,64x16:1000,128x32:1000,256x64:1000,512x128:1000,1024x256:1000"


def parse_mix(name: str, spec: str) -> list[tuple[int, int, int]]:
    """``"64x4:100000,128x8:20000"`` -> [(T, N, examples), ...]; empty -> []."""
    out = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        shape, _, n = part.partition(":")
        t, _, k = shape.lower().partition("x")
        try:
            seg = (int(t), int(k), int(n))
        except ValueError:
            seg = (0, 0, 0)
        if min(seg) < 1:
            raise ValueError(f"zoo train: {name}={spec!r} is invalid at {part!r}; accepted: comma-separated "
                             "SEQ_LENxKV_PAIRS:EXAMPLES segments of positive integers, e.g. 64x4:100000,256x16:20000")
        out.append(seg)
    return out


@dataclass
class TrainConfig:
    """One MQAR training run. Defaults: Zoology's (V 8192, T 64, N 4, 2 layers, d 64, 100k / 3k examples)."""

    mixers: str | list[str] = "based"
    mixer_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    d_model: int = 64
    n_layers: int = 2
    mlp_ratio: int = 0  # Zoology's MQAR models have no MLP
    task: str = "mqar"
    vocab_size: int = 8192
    seq_len: int = 64
    num_kv_pairs: int = 4
    power_a: float = 0.01
    train_examples: int = 100_000
    test_examples: int = 3_000
    epochs: int = 64
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: float = 0.02  # share of the steps with a linear warm-up
    early_stop: float = 0.99
    seed: int = 0
    # "float32": Zoology's (full float32 matmuls); "tf32": torch's "high" float32 matmul precision, TF32 tensor
    # cores on CUDA (10-bit mantissa products, float32 sums), a stated deviation for speed; meant for the GPU
    precision: str = "float32"
    # a data mixture as Zoology trains (ZOOLOGY_TRAIN_MIX / ZOOLOGY_TEST_MIX): "TxN:EXAMPLES,..." segments, each
    # training batch drawn from one segment; then seq_len, num_kv_pairs and train_examples are not used. Empty
    # train_mix: one segment, seq_len x num_kv_pairs; empty test_mix: the training shapes, test_examples each
    train_mix: str = ""
    test_mix: str = ""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"zoo train: task={self.task!r} is invalid; accepted: {', '.join(TASKS)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"zoo train: precision={self.precision!r} is invalid; accepted: {', '.join(PRECISIONS)}")
        for name in ("train_examples", "test_examples", "epochs", "batch_size"):
            check_int("zoo train", name, getattr(self, name), 1)
        check_int("zoo train", "seed", self.seed, 0)
        check_float("zoo train", "lr", self.lr, 0.0, 1.0, open_lo=True)
        check_float("zoo train", "weight_decay", self.weight_decay, 0.0, 10.0)
        check_float("zoo train", "warmup", self.warmup, 0.0, 1.0)
        check_float("zoo train", "early_stop", self.early_stop, 0.0, 1.0, open_lo=True)
        lm = self.lm_config()  # validates the model settings
        for name in dict.fromkeys(lm.layer_mixers()):  # names, settings and width, before any data is drawn
            with torch.device("meta"):  # no memory, and no draw from the global RNG that seeds models
                build_mixer(name, self.d_model, **lm.mixer_settings.get(name, {}))
        for t, n, _ in self.train_segments() + self.test_segments():  # validates the task settings
            try:
                mqar(1, self.vocab_size, t, n, self.power_a)
            except ValueError as exc:
                if not (self.train_mix or self.test_mix):
                    raise
                raise ValueError(f"zoo train: the MQAR shape {t}x{n} of train_mix / test_mix: {exc}") from None

    def train_segments(self) -> list[tuple[int, int, int]]:
        """[(T, N, examples), ...] the training data is drawn from."""
        return parse_mix("train_mix", self.train_mix) or [(self.seq_len, self.num_kv_pairs, self.train_examples)]

    def test_segments(self) -> list[tuple[int, int, int]]:
        """[(T, N, examples), ...] scored after every epoch."""
        if self.test_mix:
            return parse_mix("test_mix", self.test_mix)
        return [(t, n, self.test_examples) for t, n, _ in self.train_segments()]

    def lm_config(self) -> LMConfig:
        return LMConfig(vocab_size=self.vocab_size, d_model=self.d_model, n_layers=self.n_layers, mixers=self.mixers,
                        mixer_settings=self.mixer_settings, mlp_ratio=self.mlp_ratio)

    def key(self) -> str:
        """sha256 of the resolved config: the run's identity in the store and its checkpoint's name (the default
        precision is left out, so runs stored before the field existed keep their keys)."""
        fields = asdict(self)
        if fields["precision"] == "float32":
            del fields["precision"]
        for name in ("train_mix", "test_mix"):
            if not fields[name]:
                del fields[name]
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup * total`` steps, then a cosine decay to 0."""
    warm = max(1, round(cfg.warmup * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def evaluate_all(model: TinyLM, tests: list[tuple[torch.Tensor, torch.Tensor]], batch_size: int
                 ) -> tuple[float, list[float]]:
    """Accuracy over several test sets (each (B, T_j)) as one pool of labelled positions, as Zoology's
    ``valid/accuracy``, and the accuracy of each set."""
    accs = [evaluate(model, x, y, batch_size) for x, y in tests]
    if len(accs) == 1:
        return accs[0], accs  # exactly the one set's accuracy, as before mixtures existed
    labelled = [int((y != -100).sum()) for _, y in tests]
    return sum(a * n for a, n in zip(accs, labelled)) / sum(labelled), accs


@torch.no_grad()
def evaluate(model: TinyLM, inputs: torch.Tensor, labels: torch.Tensor, batch_size: int) -> float:
    """MQAR accuracy of ``model`` over a test set (B, T), in batches."""
    model.eval()
    preds = torch.full_like(labels, -1)  # unlabelled positions are not scored
    for i in range(0, len(inputs), batch_size):
        at = labels[i : i + batch_size] != -100
        preds[i : i + batch_size][at] = model(inputs[i : i + batch_size], at=at).argmax(-1)
    model.train()
    return mqar_accuracy(preds, labels)


def save_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, meta: dict[str, Any]) -> None:
    """Weights, optimizer moments and counters in one safetensors file (written to a temp name, then renamed)."""
    from safetensors.torch import save_file

    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()
               if k != "head.weight" or not model.config.tie_embeddings}
    for index, state in opt.state_dict()["state"].items():
        for name, value in state.items():
            tensors[f"opt.{index}.{name}"] = torch.as_tensor(value).detach().contiguous()
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta)})
    tmp.replace(path)


def checkpoint_path(checkpoint_dir: str | Path, key: str) -> Path:
    """Where the run with this key keeps its epoch checkpoint."""
    return Path(checkpoint_dir) / f"{key[:20]}.safetensors"


def checkpoint_meta(path: Path) -> dict[str, Any] | None:
    """A checkpoint's counters (epoch, best accuracy, ...) without reading its tensors; None where it is unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads(f.metadata()["meta"])
    except Exception:
        return None


def load_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote; returns its counters (a corrupt file: one clear error)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["meta"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise ValueError(f"zoo train: checkpoint {path} is unreadable ({type(exc).__name__}: {exc}); delete it to "
                         "start the run over") from None
    weights = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    model.load_state_dict(weights, strict=not model.config.tie_embeddings)
    state = opt.state_dict()
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, index, name = key.split(".", 2)
            state["state"].setdefault(int(index), {})[name] = value
    opt.load_state_dict(state)
    return meta


def train(
    cfg: TrainConfig,
    store=None,
    checkpoint_dir: str | Path | None = None,
    device: str = "cpu",
    progress: bool = True,
    max_epochs: int | None = None,
    graph: bool | None = None,
    deadline: float | None = None,
    whole: bool = False,
    log: Callable[[str], None] | None = None,
    stop: threading.Event | None = None,
) -> dict[str, Any]:
    """Train one run (or return its stored row); see the module docstring.

    ``max_epochs`` stops after that many epochs of this call (a checkpoint is left to resume from; nothing is
    stored): used to split long runs and by the resume test. ``graph`` replays each full training step from one CUDA
    graph (:mod:`attnkit.zoo.step`; None: on CUDA). ``deadline`` (a :func:`now` value) stops before an epoch that
    would end after it, at the pace of this call's epochs, and an epoch still running at it (a first one, whose
    pace was unknown) is dropped at the next step; with ``whole``, the run also stops after its first epoch of
    this call where the epochs left would not all fit (a bounded call then spends its time on runs it can
    finish). ``stop`` set (a sweep's Ctrl-C) drops the running epoch at its next step, as the deadline does. A
    stopped run leaves its last checkpoint and stores nothing. ``log`` receives one line when the run starts, per
    epoch and when it stops. Returns the result row (``finished`` 0 when stopped).
    """
    resolve_device(device, "zoo: ")
    key = cfg.key()
    if store is not None and (row := store.zoo_run(key)) is not None:
        return row
    # on CUDA a stream no other run of this process uses (runs side by side: sweep --concurrent)
    stream = own_stream(device) if str(device).startswith("cuda") else contextlib.nullcontext()
    with matmul_precision(cfg.precision), stream:
        return _train(cfg, key, store, checkpoint_dir, device, progress, max_epochs, graph, deadline, whole, log,
                      stop)


now = time.monotonic  # the clock of ``deadline`` (a name of its own, so a test can run it by hand)


def epoch_fits(deadline: float, epoch_s: float, ran: int, epochs_left: int, whole: bool) -> bool:
    """Whether a run's next epoch may start: never once ``deadline`` has passed; the first epoch of a call always
    (its pace is not known yet); later ones where one epoch of ``epoch_s`` seconds fits, or, with ``whole`` right
    after the first, where all ``epochs_left`` do."""
    left = deadline - now()
    if left <= 0:
        return False
    return ran == 0 or left >= epoch_s * (epochs_left if whole and ran == 1 else 1)


@contextlib.contextmanager
def matmul_precision(precision: str):
    """float32 matmuls ("highest") or TF32 ("high") inside the block; the process's setting is restored after."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if precision == "tf32" else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


# the global RNG seeds a model's initial weights: runs built side by side in threads take turns
_INIT = threading.Lock()


def _train(cfg: TrainConfig, key: str, store, checkpoint_dir, device: str, progress: bool, max_epochs: int | None,
           graph: bool | None, deadline: float | None = None, whole: bool = False,
           log: Callable[[str], None] | None = None, stop: threading.Event | None = None) -> dict[str, Any]:
    begun = now()
    data_dir = Path(checkpoint_dir) / "mqar" if checkpoint_dir is not None else None  # drawn once (datacache)
    # segment i's draws from seed + 7919 i, test set j's from a disjoint stream (one segment: the seeds as before)
    segments, test_shapes = cfg.train_segments(), cfg.test_segments()
    train_sets = [mqar_set(n, cfg.vocab_size, t, k, cfg.power_a, cfg.seed + 7919 * i, data_dir)
                  for i, (t, k, n) in enumerate(segments)]
    tests = [mqar_set(n, cfg.vocab_size, t, k, cfg.power_a, cfg.seed + 1_000_003 + 7919 * j, data_dir)
             for j, (t, k, n) in enumerate(test_shapes)]
    drawn = now()
    with _INIT:
        torch.manual_seed(cfg.seed)
        model = TinyLM(cfg.lm_config()).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]  # no weight decay on norms and biases
    cuda = str(device).startswith("cuda")
    graph = cuda if graph is None else graph
    if graph and not cuda:
        raise ValueError(f"zoo train: graph=True needs a CUDA device, not {device!r}")
    # on CUDA one fused kernel a step; in a CUDA graph its step counter and learning rate live on the device
    lr = torch.tensor(cfg.lr, device=device) if graph else cfg.lr
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98), fused=cuda or None, capturable=graph)
    # the whole set on the device once: a per-step host-to-device copy from pageable memory synchronises every
    # step, which serialises a launch-bound tiny model's kernels with the Python that launches them
    train_sets = [(x.to(device), y.to(device)) for x, y in train_sets]
    tests = [(x.to(device), y.to(device)) for x, y in tests]
    batches = [math.ceil(n / cfg.batch_size) for _, _, n in segments]
    steps_per_epoch = sum(batches)
    total = steps_per_epoch * cfg.epochs
    meta = {"epoch": 0, "best": 0.0, "accuracy": 0.0, "wall_s": 0.0, "history": [], "slices": []}
    ckpt = checkpoint_path(checkpoint_dir, key) if checkpoint_dir is not None else None
    if ckpt is not None and ckpt.exists():
        meta = load_checkpoint(ckpt, model, opt)
        meta.setdefault("slices", [])  # a checkpoint written before mixtures existed
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.epochs, initial=meta["epoch"], unit="epoch", desc=f"zoo {label(cfg)}", dynamic_ncols=True)
    graph = graph and all(label_positions(y) is not None for _, y in train_sets)  # equal label counts per row
    # one step (one CUDA graph) per segment shape, all on the one optimizer
    step_fns = [TrainStep(model, opt, x, y, cfg.batch_size, graph=graph) for x, y in train_sets]
    name = run_name(cfg)
    log = log or (lambda line: None)
    log(f"{name}: from epoch {meta['epoch']}/{cfg.epochs}; data {drawn - begun:.1f} s, model and copies "
        f"{now() - drawn:.1f} s")
    ran, epoch_s, cut = 0, 0.0, None
    stopped = stop.is_set if stop is not None else lambda: False
    while meta["epoch"] < cfg.epochs and meta["best"] < cfg.early_stop:
        if max_epochs is not None and ran >= max_epochs:
            break
        late = deadline is not None and not epoch_fits(deadline, epoch_s, ran, cfg.epochs - meta["epoch"], whole)
        if late or stopped():
            kept = ", checkpoint kept" if meta["epoch"] else ""
            log(f"{name}: stopped before epoch {meta['epoch'] + 1} ({'time limit' if late else 'interrupted'}){kept}")
            break
        start = now()
        seed = cfg.seed * 9973 + meta["epoch"]
        orders = [torch.randperm(n, generator=torch.Generator().manual_seed(seed + 104729 * i)).to(device)
                  for i, (_, _, n) in enumerate(segments)]
        plan = [(i, b) for i, count in enumerate(batches) for b in range(count)]
        if len(segments) > 1:  # the segments' batches interleaved in a seeded order
            plan = [plan[j] for j in torch.randperm(len(plan), generator=torch.Generator().manual_seed(seed + 1))]
        for k, (i, b) in enumerate(plan):
            step_fns[i].set_lr(lr_at(meta["epoch"] * steps_per_epoch + k, total, cfg))
            # logits at the labelled positions only: the same loss, a fraction of the head's work
            loss = step_fns[i](orders[i][b * cfg.batch_size : (b + 1) * cfg.batch_size])
            if deadline is not None and now() >= deadline:  # a first epoch whose pace was unknown: the time is up
                cut = "at the time limit"
            elif stopped():
                cut = "by an interrupt"
            if cut:
                break
        if cut:  # this epoch's steps are dropped: the run resumes from its last checkpoint
            log(f"{name}: epoch {meta['epoch'] + 1} cut {cut} after {now() - start:.1f} s")
            break
        acc, per_test = evaluate_all(model, tests, max(cfg.batch_size, 256))
        meta["epoch"] += 1
        if acc > meta["best"] or not meta["slices"]:
            meta["slices"] = [round(a, 5) for a in per_test]  # each test set's accuracy at the best epoch
        meta["accuracy"], meta["best"] = acc, max(meta["best"], acc)
        epoch_s = now() - start
        meta["wall_s"] += epoch_s
        meta["history"].append(round(acc, 5))
        ran += 1
        if ckpt is not None:
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            save_checkpoint(ckpt, model, opt, meta)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.3f}")
        log(f"{name}: epoch {meta['epoch']}/{cfg.epochs} accuracy {acc:.3f} in {epoch_s:.1f} s")
    if bar is not None:
        bar.close()
    finished = meta["epoch"] >= cfg.epochs or meta["best"] >= cfg.early_stop
    if finished:
        log(f"{name}: finished, best accuracy {meta['best']:.3f} after {meta['epoch']} epochs")
    # a mixture run's row names its largest test config, and each test config's result is in slices_json
    seq_len, pairs = max((t, k) for t, k, _ in test_shapes) if cfg.train_mix else (cfg.seq_len, cfg.num_kv_pairs)
    slices = {f"{t}x{k}": [a, model.state_size(t)] for (t, k, _), a in zip(test_shapes, meta["slices"])}
    row = {
        "run_key": key, "mixers": label(cfg), "task": cfg.task, "d_model": cfg.d_model, "n_layers": cfg.n_layers,
        "vocab_size": cfg.vocab_size, "seq_len": seq_len, "num_kv_pairs": pairs, "seed": cfg.seed,
        "accuracy": meta["best"], "final_accuracy": meta["accuracy"], "epochs": meta["epoch"],
        "state_size": model.state_size(seq_len), "params": sum(p.numel() for p in model.parameters()),
        "slices_json": json.dumps(slices if cfg.train_mix or cfg.test_mix else {}),
        "wall_s": meta["wall_s"], "device": device, "history_json": json.dumps(meta["history"]),
        "config_json": json.dumps(asdict(cfg), sort_keys=True), "finished": int(finished),
    }
    if finished and store is not None:
        store.add_zoo_run(row)
    return row


def run_name(cfg: TrainConfig) -> str:
    """A run in log lines: ``base_conv+based d64 lr 0.001``."""
    return f"{label(cfg)} d{cfg.d_model} lr {cfg.lr:g}"


def label(cfg: TrainConfig | Any) -> str:
    """The run's mixers as one string: ``based`` or ``base_conv+based`` (any config with ``mixers``)."""
    return cfg.mixers if isinstance(cfg.mixers, str) else "+".join(cfg.mixers)
