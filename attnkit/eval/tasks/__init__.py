"""Task registry: tasks are data plus small functions, looked up by name (lazily, as ``"module:attr"``).

A task object has ``name``, ``family`` (retrieval | multihop | aggregation | qa | passkey | niah | ppl), ``kind``
("generate": score a generated answer; "ppl": per-position NLL of a text) and
``samples(tokenizer, length, n, seed, chat=True) -> list[Sample]``, deterministic per (length, seed), sized with
the tokenizer so that prompt + max_new_tokens fit in ``length`` tokens.

Registered: RULER's 13 tasks (``attnkit.eval.tasks.ruler``), ``passkey`` and ``niah_grid``
(``attnkit.eval.tasks.passkey``) and ``ppl`` (``attnkit.eval.tasks.ppl``). See docs/eval.md, "Tasks".
"""

from __future__ import annotations

import difflib
import importlib
from typing import Any, Protocol

from attnkit.eval.sample import Sample
from attnkit.eval.tasks import metrics as _metrics  # noqa: F401  (adds "first_integer" to METRICS)

RULER = [
    "niah_single_1", "niah_single_2", "niah_single_3",
    "niah_multikey_1", "niah_multikey_2", "niah_multikey_3",
    "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1", "qa_2",
]  # fmt: skip
SUITES: dict[str, list[str]] = {
    "ruler": RULER,
    "retrieval": RULER[:8],
    "passkey": ["passkey"],
    "niah": ["niah_grid"],
    "ppl": ["ppl"],
    "ppl_tail": ["ppl_tail"],
}
# scored by option logits (attnkit.eval.tasks.choice; docs/eval.md, "Classification and multiple choice")
CLASSIFICATION = ["sst2", "sst5", "mr", "subj", "trec", "agnews", "cb", "boolq", "rte"]
MULTIPLE_CHOICE = ["arc_easy", "arc_challenge", "hellaswag", "piqa", "openbookqa", "commonsenseqa", "mmlu"]
SUITES.update(classification=CLASSIFICATION, multiple_choice=MULTIPLE_CHOICE)


class Task(Protocol):
    name: str
    family: str
    kind: str

    def samples(self, tokenizer, length: int, n: int, seed: int, chat: bool = True) -> list[Sample]: ...


# name -> "module:attr" (imported on first use) or a task object
_TASKS: dict[str, Any] = {}


def register_task(name: str, task: Any) -> None:
    """Register a task object, or a ``"package.module:attr"`` string imported on first use."""
    _TASKS[name] = task


def task_names() -> list[str]:
    return list(_TASKS)


def get_task(name: str) -> Task:
    if name not in _TASKS:
        close = difflib.get_close_matches(name, list(_TASKS) + list(SUITES), n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ValueError(f"unknown task '{name}'{hint}; tasks: {', '.join(_TASKS)}; suites: {', '.join(SUITES)}")
    entry = _TASKS[name]
    if isinstance(entry, str):
        module, attr = entry.split(":")
        entry = _TASKS[name] = getattr(importlib.import_module(module), attr)
    return entry


def expand_tasks(spec: str) -> list[str]:
    """"ruler", "retrieval", "niah_single_2,vt" ... -> task names, in order, without duplicates."""
    out: list[str] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        for name in SUITES.get(part, [part]):
            get_task(name)  # validates, with a did-you-mean error
            if name not in out:
                out.append(name)
    if not out:
        raise ValueError(f"no tasks in '{spec}'")
    return out


for _name in RULER:
    register_task(_name, f"attnkit.eval.tasks.ruler:{_name}")
register_task("passkey", "attnkit.eval.tasks.passkey:passkey")
register_task("niah_grid", "attnkit.eval.tasks.passkey:niah_grid")
register_task("ppl", "attnkit.eval.tasks.ppl:ppl")
register_task("ppl_tail", "attnkit.eval.tasks.ppl:ppl_tail")
for _name in CLASSIFICATION + MULTIPLE_CHOICE:
    register_task(_name, f"attnkit.eval.tasks.choice:{_name}")
del _name
