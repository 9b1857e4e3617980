"""RULER's needle-in-a-haystack tasks (niah_single_*, niah_multikey_*, niah_multivalue, niah_multiquery).

A needle is "One of the special magic {numbers|words|uuids} for {key} is: {value}."; keys and values are 7-digit
numbers, adjective-noun words or UUIDs. The haystack is the noise line repeated ("repeat", one per line), the
essays ("essay", needles between sentences at depths drawn from RULER's 40 depths 0..100 %) or distractor
needles with random keys ("needle", one per line). The size unit is a noise line, an essay word or a distractor.
``extra["document_span"]`` and ``extra["question_span"]`` locate the haystack and the question in the input (for
generation drivers).
"""

from __future__ import annotations

import random

from attnkit.eval.tasks.base import Draft, SizedTask
from attnkit.eval.tasks.haystack import NOISE, RANDOM, essay_sentences, essay_words, insert_at_depths
from attnkit.eval.tasks.ruler_templates import (
    NEW_TOKENS,
    NIAH_NEEDLE,
    NIAH_PREFIX,
    NIAH_PREFIX_ONE,
    NIAH_TEMPLATE,
    NIAH_TEMPLATE_ONE,
)

DEPTHS = [round(100 * i / 39) for i in range(40)]  # RULER: np.linspace(0, 100, 40) rounded


def needle(type_v: str, key: str, value: str) -> str:
    """The needle sentence; ``type_v`` plural (numbers, words, uuids) as in RULER."""
    return NIAH_NEEDLE.format(type_v=type_v, key=key, value=value)


def join_keys(keys: list[str]) -> str:
    """"a", "a, b, and c": the query keys as RULER writes them."""
    return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + ", and " + keys[-1]


def prompt(type_v: str, context: str, query: str, n_answers: int) -> tuple[str, str]:
    """(input, answer prefix); the singular wording when there is one answer (``type_v`` loses its "s")."""
    if n_answers == 1:
        one = type_v[:-1]
        return (
            NIAH_TEMPLATE_ONE.format(type_v=one, context=context, query=query),
            NIAH_PREFIX_ONE.format(type_v=one, query=query),
        )
    return NIAH_TEMPLATE.format(type_v=type_v, context=context, query=query), NIAH_PREFIX.format(
        type_v=type_v, query=query
    )


class Niah(SizedTask):
    family = "retrieval"
    metric = "string_match_all"
    max_new_tokens = NEW_TOKENS["niah"]

    def __init__(self, name: str, haystack: str, type_k: str, type_v: str, num_k=1, num_v=1, num_q=1) -> None:
        if haystack not in ("repeat", "essay", "needle") or type_k not in RANDOM or type_v not in RANDOM:
            raise ValueError(f"{name}: bad NIAH config {haystack}/{type_k}/{type_v}")
        self.name = name
        self.haystack, self.type_k, self.type_v = haystack, type_k, type_v
        self.num_k, self.num_v, self.num_q = max(num_k, num_q), num_v, num_q  # RULER: num_k >= num_q
        self.probe = 200 if haystack == "essay" else 5

    def bounds(self, state, item) -> tuple[int, int]:
        if self.haystack == "essay":
            return 0, len(essay_words())
        return self.num_k * self.num_v, 1 << 22  # distinct insertion lines for the needles

    def _key(self, rng: random.Random, taken: set[str]) -> str:
        while True:
            key = RANDOM[self.type_k](rng)
            if key not in taken:
                return key

    def draft(self, rng: random.Random, size: int, state, item) -> Draft:
        keys: list[str] = []
        values: list[list[str]] = []
        needles: list[str] = []
        for _ in range(self.num_k):
            keys.append(self._key(rng, set(keys)))
            values.append([RANDOM[self.type_v](rng) for _ in range(self.num_v)])
            needles += [needle(self.type_v, keys[-1], v) for v in values[-1]]
        rng.shuffle(needles)
        asked = rng.sample(range(self.num_k), self.num_q)
        query = join_keys([keys[i] for i in asked])
        answers = tuple(v for i in asked for v in values[i])
        extra: dict = {"haystack": size}

        if self.haystack == "essay":
            sentences = list(essay_sentences(size))
            depths = sorted(rng.sample(DEPTHS, len(needles)))
            positions = [int(len(sentences) * d / 100) for d in depths]
            context = insert_at_depths(sentences, needles, positions)
            extra["depths"] = [d / 100 for d in depths]
        else:
            if self.haystack == "repeat":
                lines = [NOISE] * size
            else:  # distractor needles, never with a real key
                taken = set(keys)
                lines = [needle(self.type_v, self._key(rng, taken), RANDOM[self.type_v](rng)) for _ in range(size)]
            for pos, text in sorted(zip(rng.sample(range(size), len(needles)), needles), reverse=True):
                lines.insert(pos, text)
            context = "\n".join(lines)

        text, prefix = prompt(self.type_v, context, query, len(answers))
        # for generation drivers: the haystack's and the question's (the template's last line) character ranges
        head, tail = prompt(self.type_v, "\0", query, len(answers))[0].split("\0")
        question = tail.lstrip("\n")
        extra["document_span"] = [len(head), len(head) + len(context)]
        extra["question_span"] = [len(text) - len(question), len(text)]
        return Draft(text, prefix, answers, extra)


# RULER's synthetic.yaml
niah_single_1 = Niah("niah_single_1", "repeat", "words", "numbers")
niah_single_2 = Niah("niah_single_2", "essay", "words", "numbers")
niah_single_3 = Niah("niah_single_3", "essay", "words", "uuids")
niah_multikey_1 = Niah("niah_multikey_1", "essay", "words", "numbers", num_k=4)
niah_multikey_2 = Niah("niah_multikey_2", "needle", "words", "numbers")
niah_multikey_3 = Niah("niah_multikey_3", "needle", "uuids", "uuids")
niah_multivalue = Niah("niah_multivalue", "essay", "words", "numbers", num_v=4)
niah_multiquery = Niah("niah_multiquery", "essay", "words", "numbers", num_q=4)
