"""RULER's variable tracking (vt), common / frequent words extraction (cwe, fwe) and QA (qa_1 SQuAD, qa_2 HotpotQA)."""

from __future__ import annotations

import functools
import json
import math
import random
import string
from dataclasses import dataclass

from attnkit.data import essays_path
from attnkit.eval.tasks.base import Draft, SizedTask, fit_size
from attnkit.eval.tasks.haystack import wordlist
from attnkit.eval.tasks.ruler_templates import (
    CWE_PREFIX,
    CWE_TEMPLATE,
    FWE_PREFIX,
    FWE_TEMPLATE,
    NEW_TOKENS,
    QA_DOCUMENT,
    QA_PREFIX,
    QA_TEMPLATE,
    VT_NOISE,
    VT_PREFIX,
    VT_TEMPLATE,
)

# ---------------------------------------------------------------- variable tracking


def vt_chain(names: list[str], value: str) -> list[str]:
    """"VAR A = 12345", "VAR B = VAR A ", ... (RULER's statements, the trailing space included)."""
    return [f"VAR {names[0]} = {value}"] + [f"VAR {b} = VAR {a} " for a, b in zip(names, names[1:])]


def vt_context(n_noise: int, chain: list[str], positions: list[int]) -> str:
    """``n_noise`` noise lines with statement j put before noise line ``positions[j]`` (sorted, distinct), all
    joined with single spaces (so each line after the first starts with a space, as in RULER)."""
    lines = [VT_NOISE] * n_noise
    for j, (pos, statement) in enumerate(zip(positions, chain)):
        lines.insert(pos + j, statement)
    return " ".join(lines)


def vt_prompt(context: str, value: str, num_v: int) -> tuple[str, str]:
    return VT_TEMPLATE.format(context=context, query=value), VT_PREFIX.format(num_v=num_v, query=value)


def vt_draw(rng: random.Random, n_noise: int, name_len: int, num_hops: int) -> tuple[str, str, list[str]]:
    """(context, value, variable names in chain order) of one chain of ``num_hops`` hops."""
    names: list[str] = []
    while len(names) < num_hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=name_len))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99999))
    chain = vt_chain(names, value)
    positions = sorted(rng.sample(range(n_noise), len(chain)))
    return vt_context(n_noise, chain, positions), value, names


def vt_with_example(example: tuple[str, str, list[str]], text: str) -> str:
    """The user turn: the worked example (its input, answer prefix and answer), three blank lines, the question."""
    ex_input, ex_prefix, ex_names = example
    return f"{ex_input}{ex_prefix} {' '.join(ex_names)}\n\n\n\n{text}"


@dataclass(frozen=True)
class _VtState:
    example_noise: int  # noise lines of the worked example (sized to 500 tokens, as RULER does)


class VariableTracking(SizedTask):
    name = "vt"
    family = "multihop"
    metric = "string_match_all"
    max_new_tokens = NEW_TOKENS["vt"]
    probe = 10
    num_hops = 4
    example_tokens = 500  # RULER sizes its one-shot example to 500 tokens (with 30 to generate)

    def _example(self, rng: random.Random, n_noise: int) -> tuple[str, str, list[str]]:
        context, value, names = vt_draw(rng, n_noise, 3, min(10, self.num_hops))
        text, prefix = vt_prompt(context, value, self.num_hops + 1)
        return text, prefix, names

    def setup(self, tokenizer, length, seed, chat) -> _VtState:
        def count(n: int) -> int:
            text, prefix, names = self._example(random.Random("attnkit/vt/example-size"), n)
            ids = tokenizer(f"{text}{prefix} {' '.join(names)}", add_special_tokens=False).input_ids
            return len(ids) + self.max_new_tokens

        lo = self.num_hops + 1
        n, _, _ = fit_size(count, self.example_tokens, lo, 10_000, guess=20, rate=20.0, tol=0)
        return _VtState(n)

    def bounds(self, state, item) -> tuple[int, int]:
        return self.num_hops + 1, 1 << 22

    def draft(self, rng: random.Random, size: int, state: _VtState, item) -> Draft:
        example = self._example(rng, state.example_noise)
        context, value, names = vt_draw(rng, size, 5, self.num_hops)
        text, prefix = vt_prompt(context, value, self.num_hops + 1)
        return Draft(vt_with_example(example, text), prefix, tuple(names), {"haystack": size})


# ---------------------------------------------------------------- common words extraction


def numbered(words: list[str]) -> str:
    """"1. apple 2. pear ...": RULER's numbered word list."""
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def cwe_draw(rng, vocab, n_words: int, freq_common: int, freq_rare: int, n_common: int = 10):
    """(numbered list, common words): ``n_words`` distinct words, the first ``n_common`` repeated ``freq_common``
    times and the others ``freq_rare`` times, shuffled."""
    picked = rng.sample(vocab, n_words)
    common = picked[:n_common]
    words = common * freq_common + picked[n_common:] * freq_rare
    rng.shuffle(words)
    return numbered(words), common


def cwe_prompt(example_context: str, example_answer: list[str], context: str) -> tuple[str, str]:
    """The user turn (a worked example with its answer, a newline, the question) and the answer prefix."""
    example = CWE_TEMPLATE.format(context=example_context) + CWE_PREFIX + numbered(example_answer)
    return example + "\n" + CWE_TEMPLATE.format(context=context), CWE_PREFIX


@functools.lru_cache(maxsize=1)
def cwe_vocab() -> tuple[str, ...]:
    """wonderwords' nouns, adjectives and verbs, deduplicated and sorted (as RULER)."""
    return tuple(sorted(set(wordlist("nounlist") + wordlist("adjectivelist") + wordlist("verblist"))))


class CommonWords(SizedTask):
    name = "cwe"
    family = "aggregation"
    metric = "string_match_all"
    max_new_tokens = NEW_TOKENS["cwe"]
    probe = 20
    num_cw = 10

    def setup(self, tokenizer, length, seed, chat):
        # RULER: below 4096 tokens, a smaller example (20 words, 3x/1x) and frequencies 6x/1x; else 40 words
        # (10x/3x) and 30x/3x
        return ((20, 3, 1), (6, 1)) if length < 4096 else ((40, 10, 3), (30, 3))

    def bounds(self, state, item) -> tuple[int, int]:
        return self.num_cw, len(cwe_vocab())

    def draft(self, rng: random.Random, size: int, state, item) -> Draft:
        (ex_words, ex_common, ex_rare), (common, rare) = state
        vocab = cwe_vocab()
        ex_context, ex_answer = cwe_draw(rng, vocab, ex_words, ex_common, ex_rare, self.num_cw)
        context, answer = cwe_draw(rng, vocab, size, common, rare, self.num_cw)
        text, prefix = cwe_prompt(ex_context, ex_answer, context)
        return Draft(text, prefix, tuple(answer), {"haystack": size})


# ---------------------------------------------------------------- frequent words extraction


def zeta(s: float, terms: int = 1000) -> float:
    """Riemann zeta for s > 1 (partial sum plus Euler-Maclaurin tail)."""
    n = terms
    head = math.fsum(k**-s for k in range(1, n))
    return head + n ** (1 - s) / (s - 1) + n**-s / 2 + s * n ** (-s - 1) / 12


def fwe_prompt(context: str) -> tuple[str, str]:
    return FWE_TEMPLATE.format(context=context), FWE_PREFIX


class FreqWords(SizedTask):
    name = "fwe"
    family = "aggregation"
    metric = "string_match_all"
    max_new_tokens = NEW_TOKENS["fwe"]
    probe = 200
    alpha = 2.0
    word_len = 6

    def setup(self, tokenizer, length, seed, chat) -> int:
        return max(length // 50, 5)  # RULER: a vocabulary of max_seq_length // 50 coded words

    def bounds(self, state, item) -> tuple[int, int]:
        # enough words for ranks 1..4 to have distinct, non-zero counts
        return math.ceil(zeta(self.alpha) / (3**-self.alpha - 4**-self.alpha)) + 1, 1 << 26

    def draft(self, rng: random.Random, size: int, state: int, item) -> Draft:
        vocab: list[str] = []
        seen: set[str] = set()
        while len(vocab) < state:
            word = "".join(rng.choices(string.ascii_lowercase, k=self.word_len))
            if word not in seen:
                seen.add(word)
                vocab.append(word)
        vocab[0] = "..."  # the most frequent "word" is noise
        z = zeta(self.alpha)
        words = [w for k, w in enumerate(vocab, 1) for _ in range(int(size * k**-self.alpha / z))]
        rng.shuffle(words)
        text, prefix = fwe_prompt(" ".join(words))
        return Draft(text, prefix, tuple(vocab[1:4]), {"haystack": size})


# ---------------------------------------------------------------- QA


@dataclass(frozen=True)
class Question:
    query: str
    answers: tuple[str, ...]
    gold: tuple[int, ...]  # documents that answer it
    related: tuple[int, ...] = ()  # SQuAD: the other paragraphs of the same article, used first as distractors


def _json(name: str):
    with (essays_path().parent / name).open(encoding="utf-8") as f:
        return json.load(f)


@functools.lru_cache(maxsize=1)
def squad() -> tuple[tuple[Question, ...], tuple[str, ...]]:
    """SQuAD (v2 dev, as shipped with RULER): the answerable questions and the distinct paragraphs, sorted."""
    data = _json("squad.json")["data"]
    docs = sorted({p["context"] for d in data for p in d["paragraphs"]})
    ids = {c: i for i, c in enumerate(docs)}
    questions = []
    for d in data:
        article = [ids[p["context"]] for p in d["paragraphs"]]
        for p in d["paragraphs"]:
            gold = ids[p["context"]]
            for q in p["qas"]:
                if not q.get("is_impossible", False):
                    answers = tuple(a["text"] for a in q["answers"])
                    questions.append(Question(q["question"], answers, (gold,), tuple(i for i in article if i != gold)))
    return tuple(questions), tuple(docs)


@functools.lru_cache(maxsize=1)
def hotpotqa() -> tuple[tuple[Question, ...], tuple[str, ...]]:
    """HotpotQA (distractor dev, as shipped with RULER): each question with its 10 paragraphs ("title\\ntext")."""
    data = _json("hotpotqa.json")
    docs = sorted({f"{t}\n{''.join(p)}" for d in data for t, p in d["context"]})
    ids = {c: i for i, c in enumerate(docs)}
    questions = tuple(
        Question(d["question"], (d["answer"],), tuple(ids[f"{t}\n{''.join(p)}"] for t, p in d["context"]))
        for d in data
    )
    return questions, tuple(docs)


def qa_context(documents: list[str]) -> str:
    return "\n\n".join(QA_DOCUMENT.format(i=i + 1, document=d) for i, d in enumerate(documents))


def qa_prompt(context: str, query: str) -> tuple[str, str]:
    return QA_TEMPLATE.format(context=context, query=query), QA_PREFIX


class QA(SizedTask):
    family = "qa"
    metric = "string_match_part"
    max_new_tokens = NEW_TOKENS["qa"]
    probe = 5
    retries = 20  # a question whose own documents do not fit is replaced by another one

    def __init__(self, name: str, dataset) -> None:
        self.name = name
        self.dataset = dataset

    def setup(self, tokenizer, length, seed, chat):
        questions, docs = self.dataset()
        order = list(range(len(questions)))
        random.Random(f"attnkit/{self.name}/{seed}/order").shuffle(order)
        return questions, docs, order

    def pick(self, state, index: int, attempt: int) -> int:
        questions, _, order = state
        return order[(index + attempt * 7919) % len(order)]

    def bounds(self, state, item: int) -> tuple[int, int]:
        questions, docs, _ = state
        return len(questions[item].gold), len(docs)

    def draft(self, rng: random.Random, size: int, state, item: int) -> Draft:
        questions, docs, _ = state
        q = questions[item]
        # distractors: the question's related paragraphs first (in a random order), then random other documents;
        # drawn so that a larger size only adds documents (the token count grows with the size)
        related = rng.sample(q.related, len(q.related))
        chosen = list(q.gold) + related[: size - len(q.gold)]
        taken = set(chosen) | set(q.related)
        while len(chosen) < size:
            i = rng.randrange(len(docs))
            if i not in taken:
                taken.add(i)
                chosen.append(i)
        rng.shuffle(chosen)
        text, prefix = qa_prompt(qa_context([docs[i] for i in chosen]), q.query)
        return Draft(text, prefix, q.answers, {"haystack": size, "question": item})


vt = VariableTracking()
cwe = CommonWords()
fwe = FreqWords()
qa_1 = QA("qa_1", squad)
qa_2 = QA("qa_2", hotpotqa)
