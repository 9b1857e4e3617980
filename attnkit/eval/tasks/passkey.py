"""Passkey retrieval (landmark-attention style) and a NIAH depth x length grid (gkamradt style).

``passkey``: the noise line "The grass is green. ... There and back again." repeated, with "The pass key is N.
Remember it. N is the pass key." (N in 1..50000) between two repetitions at a random depth; 10 new tokens; metric
``first_integer`` (exact match of the first integer of the prediction, see ``attnkit.eval.tasks.metrics``).

``niah_grid``: one needle, "The special magic number for {key} is {value}." (an adjective-noun key, a 7-digit
value), between the sentences of the essays at depth 0, 0.25, 0.5, 0.75 or 1.0 of the haystack (sample i at
depth ``GRID_DEPTHS[i % 5]``, recorded as ``extra["depth"]``); 32 new tokens; metric ``string_match_all`` on the
value, i.e. 1 if the 7-digit number appears in the prediction.

Both record ``extra["document_span"]`` and ``extra["question_span"]``, character ranges of the input, for
generation drivers that read the document in chunks (``attnkit.methods.driver.sample_split``).
"""

from __future__ import annotations

import random

from attnkit.eval.tasks import metrics as _metrics  # noqa: F401  (registers first_integer)
from attnkit.eval.tasks.base import Draft, SizedTask
from attnkit.eval.tasks.haystack import (
    NOISE,
    essay_sentences,
    essay_words,
    insert_at_depths,
    random_number,
    random_word,
)

PASSKEY_INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
PASSKEY_INFO = "The pass key is {key}. Remember it. {key} is the pass key."
PASSKEY_QUESTION = "What is the pass key?"
PASSKEY_PREFIX = " The pass key is"


class Passkey(SizedTask):
    name = "passkey"
    family = "passkey"
    metric = "first_integer"
    max_new_tokens = 10
    probe = 10

    def bounds(self, state, item) -> tuple[int, int]:
        return 0, 1 << 22  # size: repetitions of the noise line

    def draft(self, rng: random.Random, size: int, state, item) -> Draft:
        key = str(rng.randint(1, 50000))
        before = round(rng.random() * size)
        lines = [PASSKEY_INTRO, " ".join([NOISE] * before), PASSKEY_INFO.format(key=key)]
        lines += [" ".join([NOISE] * (size - before)), PASSKEY_QUESTION]
        text = "\n".join(line for line in lines if line)
        depth = before / size if size else 0.0
        split = {"document_span": [len(PASSKEY_INTRO) + 1, len(text) - len(PASSKEY_QUESTION) - 1],
                 "question_span": [len(text) - len(PASSKEY_QUESTION), len(text)]}  # for generation drivers
        return Draft(text, PASSKEY_PREFIX, (key,), {"depth": depth, "haystack": size, **split})


GRID_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
GRID_INTRO = "You are a helpful AI bot that answers questions for a user. Keep your response short and direct."
GRID_NEEDLE = "The special magic number for {key} is {value}."
GRID_QUESTION = (
    "What is the special magic number for {key}? Don't give information outside the document or repeat your "
    "findings."
)
GRID_PREFIX = " The special magic number for {key} is"


class NiahGrid(SizedTask):
    name = "niah_grid"
    family = "niah"
    metric = "string_match_all"
    max_new_tokens = 32
    probe = 200

    def bounds(self, state, item) -> tuple[int, int]:
        return 0, len(essay_words())  # size: words of the essays

    def draft(self, rng: random.Random, size: int, state, item: int) -> Draft:
        depth = GRID_DEPTHS[item % len(GRID_DEPTHS)]  # item: the sample's index
        key, value = random_word(rng), random_number(rng)
        sentences = list(essay_sentences(size))
        needle = GRID_NEEDLE.format(key=key, value=value)
        context = insert_at_depths(sentences, [needle], [round(depth * len(sentences))])
        question = GRID_QUESTION.format(key=key)
        text = f"{GRID_INTRO}\n\n{context}\n\n{question}"
        start = len(GRID_INTRO) + 2
        split = {"document_span": [start, start + len(context)],  # for generation drivers (InfiniRetri)
                 "question_span": [len(text) - len(question), len(text)]}
        return Draft(text, GRID_PREFIX.format(key=key), (value,), {"depth": depth, "haystack": size, **split})


passkey = Passkey()
niah_grid = NiahGrid()
