"""What the generated tasks share: per-sample random generators, the sizing search, and a task base class.

A generated task draws one sample from a haystack *size* (words, lines, documents ... whatever the task's unit
is). :class:`SizedTask` finds, per sample, the largest size whose full prompt (``build_prompt``) plus
``max_new_tokens`` fits in the requested length, then returns that sample. Every draw starts from a fresh
``random.Random`` seeded by (task, seed, index), so a sample's random content depends only on those; its size comes
from a deterministic search (which starts from the previous sample's size), so ``samples(..., n)[:k]`` equals
``samples(..., k)``: a sample depends on (task, length, seed, index) and the tokenizer, never on ``n``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable

from attnkit.eval.sample import Sample, build_prompt


class TooShort(ValueError):
    """The requested length cannot hold even the smallest version of the prompt."""


@dataclass(frozen=True)
class Draft:
    """A sample's text before sizing: the user turn, the answer prefix, the references and task details."""

    input: str
    answer_prefix: str
    references: tuple[str, ...]
    extra: dict[str, Any] = field(default_factory=dict)


def rng_for(task: str, seed: int, index: int, attempt: int = 0) -> random.Random:
    """The random generator of one sample: seeded from a string (SHA-512 based, the same in every process)."""
    key = f"attnkit/{task}/{seed}/{index}" + (f"/{attempt}" if attempt else "")
    return random.Random(key)


def check_request(length: int, n: int, seed: int) -> None:
    for name, value, low in (("length", length, 1), ("n", n, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name}={value!r} is invalid; accepted: an integer >= {low}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed={seed!r} is invalid; accepted: an integer")


def fit_size(
    count: Callable[[int], int],
    budget: int,
    lo: int,
    hi: int,
    guess: int,
    rate: float,
    tol: int,
    known: dict[int, int] | None = None,
) -> tuple[int, int, float]:
    """The largest size ``h`` in [lo, hi] found with ``count(h) <= budget``, to within ``tol`` tokens.

    ``count`` is nearly linear in ``h`` (about ``rate`` tokens per unit), so the search interpolates between the
    best size known to fit and the smallest known to overflow (secant steps aimed just under the budget, bisection
    when a step repeats). Stops when the fitting size is within ``tol`` tokens of the budget, when the two
    brackets are adjacent, or at ``hi``. ``known`` holds counts already measured. Returns (size, its count, the
    measured rate). TooShort if ``lo`` overflows.
    """
    seen: dict[int, int] = {}
    best: tuple[int, int] | None = None  # (h, count) that fits
    over: tuple[int, int] | None = None  # (h, count) that overflows

    def note(h: int, c: int) -> None:
        nonlocal best, over
        seen[h] = c
        if c <= budget:
            if best is None or h > best[0]:
                best = (h, c)
        elif over is None or h < over[0]:
            over = (h, c)

    for h, c in (known or {}).items():
        note(h, c)
    h = min(max(guess, lo), hi)
    for _ in range(64):
        if h not in seen:
            note(h, count(h))
        if over is not None and over[0] <= lo:
            raise TooShort(f"the smallest prompt takes {over[1]} tokens (with the answer), over the budget {budget}")
        if best is not None and (budget - best[1] <= tol or best[0] >= hi):
            break
        if best is not None and over is not None and over[0] - best[0] <= 1:
            break
        if best is not None and over is not None and over[1] > best[1]:
            rate = (over[1] - best[1]) / (over[0] - best[0])
        elif len(seen) >= 2:
            (h1, c1), (h2, c2) = sorted(seen.items(), key=lambda kv: abs(kv[1] - budget))[:2]
            if h1 != h2 and (c2 - c1) / (h2 - h1) > 0:
                rate = (c2 - c1) / (h2 - h1)
        anchor = best if best is not None else over
        assert anchor is not None
        target = budget - tol / 2  # aim inside the acceptance window
        step = (target - anchor[1]) / max(rate, 1e-6)
        nh = anchor[0] + (math.floor(step) if step >= 0 else -math.ceil(-step))
        low = best[0] + 1 if best is not None else lo
        high = over[0] - 1 if over is not None else hi
        nh = min(max(nh, low), high)
        if nh in seen:
            nh = (low + high) // 2
            if nh in seen:
                break
        h = nh
    if best is None:  # only reachable if the loop ran out while overflowing
        c = count(lo)
        if c > budget:
            raise TooShort(f"the smallest prompt takes {c} tokens (with the answer), over the budget {budget}")
        best = (lo, c)
    return best[0], best[1], rate


class SizedTask:
    """Base class of the generated ("generate" kind) tasks.

    Subclasses set ``name``, ``family``, ``metric``, ``max_new_tokens`` and ``probe`` (a size step big enough to
    measure tokens per unit), and implement :meth:`draft`; :meth:`setup` (state shared by one ``samples`` call)
    and :meth:`bounds` (size range of one sample) are optional.
    """

    name: str = ""
    family: str = ""
    kind: str = "generate"
    metric: str = "string_match_all"
    max_new_tokens: int = 0
    probe: int = 10
    retries: int = 0  # extra attempts (new random draws) for a sample whose smallest prompt is too long

    def setup(self, tokenizer, length: int, seed: int, chat: bool) -> Any:
        return None

    def pick(self, state: Any, index: int, attempt: int) -> Any:
        """What sample ``index`` is about (e.g. a question); ``attempt`` > 0 after a too-long first pick."""
        return index

    def bounds(self, state: Any, item: Any) -> tuple[int, int]:
        """The size range of one sample."""
        return 1, 1 << 30

    def draft(self, rng: random.Random, size: int, state: Any, item: Any) -> Draft:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<task {self.name} ({self.family}, {self.kind})>"

    def samples(self, tokenizer, length: int, n: int, seed: int, chat: bool = True) -> list[Sample]:
        """``n`` samples whose full prompt (``build_prompt(tokenizer, sample, chat)``) plus ``max_new_tokens``
        fits in ``length`` tokens, each as large as the search finds. TooShort (a ValueError) if ``length`` is
        too small for the task."""
        check_request(length, n, seed)
        state = self.setup(tokenizer, length, seed, chat)
        hint: tuple[int, float] | None = None  # (size, tokens per unit) of the previous sample
        out = []
        for index in range(n):
            sample, hint = self._one(tokenizer, length, seed, chat, state, index, hint)
            out.append(sample)
        return out

    def _one(self, tokenizer, length, seed, chat, state, index, hint):
        error: TooShort | None = None
        for attempt in range(self.retries + 1):
            try:
                return self._fit(tokenizer, length, seed, chat, state, index, attempt, hint)
            except TooShort as e:
                error = e
        assert error is not None
        raise TooShort(f"{self.name}: length={length} is too short: {error}") from None

    def _fit(self, tokenizer, length, seed, chat, state, index, attempt, hint):
        item = self.pick(state, index, attempt)
        lo, hi = self.bounds(state, item)
        drafts: dict[int, Sample] = {}

        def count(size: int) -> int:
            d = self.draft(rng_for(self.name, seed, index, attempt), size, state, item)
            s = Sample(
                task=self.name, index=index, length=length, input=d.input, answer_prefix=d.answer_prefix,
                references=tuple(d.references), max_new_tokens=self.max_new_tokens, metric=self.metric,
                extra=dict(d.extra),
            )  # fmt: skip
            n_tokens = len(build_prompt(tokenizer, s, chat)) + self.max_new_tokens
            s.extra["prompt_tokens"] = n_tokens - self.max_new_tokens
            drafts[size] = s
            return n_tokens

        if hint is None:  # first sample: measure tokens per unit between lo and lo + probe
            c_lo = count(lo)
            if c_lo > length:
                raise TooShort(f"the smallest prompt takes {c_lo} tokens with the answer, over {length}")
            probe = min(lo + self.probe, hi)
            rate = max((count(probe) - c_lo) / (probe - lo), 1e-3) if probe > lo else 1.0
            guess = probe + int((length - drafts[probe].extra["prompt_tokens"] - self.max_new_tokens) / rate)
        else:
            guess, rate = hint
        tol = max(math.ceil(rate), length // 500)  # stop within about one unit (or 0.2 %) of the length
        known = {size: s.extra["prompt_tokens"] + self.max_new_tokens for size, s in drafts.items()}
        size, _, rate = fit_size(count, length, lo, hi, guess, rate, tol, known)
        return drafts[size], (size, rate)
