"""Long-text perplexity: stretches of the Paul Graham essays exactly ``length`` tokens long.

``samples`` returns Samples whose ``input`` tokenises (``tokenizer(input).input_ids``, default special tokens, as
``attnkit.data.essay_tokens`` does) to exactly ``length`` tokens; ``references=()``, ``metric="ppl"``,
``max_new_tokens=0``. Sample i starts at a word boundary at a random offset drawn from (seed, length, i). The
runner computes the perplexity; no metric is registered.
"""

from __future__ import annotations

import random

from attnkit.data import essays_text
from attnkit.eval.sample import Sample
from attnkit.eval.tasks.base import check_request

_CHARS_PER_TOKEN_MAX = 8  # room kept after a start offset; English prose averages 4-5 characters per token


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text, verbose=False).input_ids)


def _stretch(tokenizer, text: str, start: int, length: int) -> str | None:
    """The text from ``start`` that tokenises to exactly ``length`` tokens, cut at a token boundary; None if
    there is no such cut (or not enough text). Fast tokenizers cut at token offsets, others decode a prefix."""
    special = _count(tokenizer, "")
    want = length - special
    if want < 1:
        return None
    fast = getattr(tokenizer, "is_fast", False)
    chars = (want + 64) * 6
    while True:
        window = text[start : start + chars]
        enc = tokenizer(window, add_special_tokens=False, return_offsets_mapping=fast, verbose=False)
        n_window = len(enc["input_ids"])
        if n_window >= want + 16 or start + chars >= len(text):
            break
        chars *= 2

    def cut(m: int) -> str:
        if fast:
            return window[: enc["offset_mapping"][m - 1][1]]
        return tokenizer.decode(enc["input_ids"][:m])

    m = want
    tried: set[int] = set()
    while 1 <= m <= n_window and m not in tried:
        tried.add(m)
        piece = cut(m)
        got = _count(tokenizer, piece)
        if got == length:
            return piece
        m += length - got
    return None


class Perplexity:
    name = "ppl"
    family = "ppl"
    kind = "ppl"
    metric = "ppl"
    max_new_tokens = 0

    def __repr__(self) -> str:
        return f"<task {self.name} ({self.family}, {self.kind})>"

    def samples(self, tokenizer, length: int, n: int, seed: int, chat: bool = True) -> list[Sample]:
        """``n`` stretches of the essays of exactly ``length`` tokens each (``chat`` is ignored)."""
        check_request(length, n, seed)
        text = essays_text()
        room = len(text) - length * _CHARS_PER_TOKEN_MAX
        out = []
        for index in range(n):
            rng = random.Random(f"attnkit/ppl/{seed}/{length}/{index}")  # ppl_tail: the same stretches
            start = rng.randrange(room) if room > 0 else 0
            piece = None
            for _ in range(50):
                while start > 0 and not text[start - 1].isspace():  # begin at a word
                    start += 1
                while start < len(text) and text[start].isspace():
                    start += 1
                piece = _stretch(tokenizer, text, start, length)
                if piece is not None or start == 0:
                    break
                start = max(0, start - 1000)  # a cut that lands between merges, or too little text left
            if piece is None:
                raise ValueError(f"ppl: no stretch of the essays is exactly {length} tokens long (too long?)")
            out.append(
                Sample(
                    task=self.name, index=index, length=length, input=piece, answer_prefix="", references=(),
                    max_new_tokens=0, metric="ppl", extra={"offset": start, "prompt_tokens": length},
                )
            )  # fmt: skip
        return out


class TailPerplexity(Perplexity):
    """``ppl``'s stretches, scored on their last ``decode_tail`` tokens, fed one per forward (decode steps)."""

    name = "ppl_tail"
    decode_tail = 256


ppl = Perplexity()
ppl_tail = TailPerplexity()
