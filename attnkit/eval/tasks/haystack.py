"""Text sources for the generated tasks: the essays as words and sentences, the repeated noise line, word lists.

Sentences come from :func:`attnkit.eval.tasks.sentences.split_sentences` (a regular expression, no NLTK).
"""

from __future__ import annotations

import functools
import importlib.resources
import random
import re
import uuid

from attnkit.data import essays_text
from attnkit.eval.tasks.sentences import split_sentences

# The "repeat" haystack of RULER's niah_single_1 and vt, and the passkey noise (landmark attention).
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."


@functools.lru_cache(maxsize=1)
def essay_words() -> tuple[str, ...]:
    """The essays with every run of whitespace made one space, as words (RULER's essay haystack unit)."""
    return tuple(re.sub(r"\s+", " ", essays_text()).split(" "))


@functools.lru_cache(maxsize=16)
def essay_sentences(n_words: int) -> tuple[str, ...]:
    """The first ``n_words`` words of the essays, split into sentences (the last few sizes cached)."""
    return tuple(split_sentences(" ".join(essay_words()[:n_words])))


@functools.lru_cache(maxsize=None)
def wordlist(name: str) -> tuple[str, ...]:
    """A ``wonderwords`` word list ("nounlist", "adjectivelist", "verblist"), in file order without duplicates."""
    text = importlib.resources.files("wonderwords.assets").joinpath(f"{name}.txt").read_text(encoding="utf-8")
    return tuple(dict.fromkeys(w.rstrip() for w in text.splitlines() if w.strip()))


def random_number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def random_word(rng: random.Random) -> str:
    """An adjective-noun pair ("sour-pelican"), uniform over wonderwords' adjectives x nouns."""
    return f"{rng.choice(wordlist('adjectivelist'))}-{rng.choice(wordlist('nounlist'))}"


def random_uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


RANDOM = {"numbers": random_number, "words": random_word, "uuids": random_uuid}


def insert_at_depths(sentences: list[str], needles: list[str], positions: list[int]) -> str:
    """Put ``needles[i]`` before ``sentences[positions[i]]`` (positions sorted; ``len(sentences)`` = at the end)
    and join everything with single spaces."""
    pieces: list[str] = []
    last = 0
    for needle, pos in zip(needles, positions):
        pieces.extend(sentences[last:pos])
        pieces.append(needle)
        last = pos
    pieces.extend(sentences[last:])
    return " ".join(pieces)
