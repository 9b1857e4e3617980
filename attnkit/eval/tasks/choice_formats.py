"""Prompt formats and label words of the classification and multiple-choice tasks, and the data each one reads.

Classification follows ZeroTuning's ``DATASET_CONFIGS`` (FeijiangHan/ZeroTuning, ``eval_classification_final.py``):
instruction, then ``Sentence: {text}`` (or the task's own template), then ``\\nAnswer:``; the label words are
ZeroTuning's (= ACT's, GATECH-EIC/ACT ``utils/data_utils.py``), each with a leading space so that it is the
natural next token after the colon, and each one's first SmolLM2 token is distinct (tested). Differences:

- the prompt ends at the colon, as in ZeroTuning; ACT ends it in ``": "`` and then scores `` negative``, a
  double space that BPE tokenizers rarely see;
- MR drops ZeroTuning's ``</think></think>`` (a reasoning-model workaround); CB's words get the leading space;
- TREC: ZeroTuning and ACT index ``[Description, Entity, Expression, Person, Number, Location]`` with the coarse
  label, whose order is ABBR, ENTY, DESC, HUM, LOC, NUM (Hugging Face ``trec`` and StaICC alike), so four of six
  words name the wrong class; we use ``Abbreviation, Entity, Description, Person, Location, Number`` in the
  label order, and list them in that order in the question;
- RTE is in neither paper's set: lm-evaluation-harness's ``glue/rte`` format (`` True`` / `` False``).

Multiple choice follows lm-evaluation-harness (``arc_easy``, ``arc_challenge``, ``hellaswag`` with its
``preprocess``, ``piqa``, ``openbookqa``, ``commonsense_qa``, ``mmlu`` default): options are the continuations
after a space; commonsense_qa and mmlu list lettered answers and score the letters. ZeroTuning and ACT instead
list every task's answers as ``A. ... D.`` and read the next token: lettered scoring for all MC tasks is a
different (harder for small models) protocol, not reproduced here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from attnkit.eval.tasks.choice_readers import read_arrow, read_staicc
from attnkit.eval.tasks.sources import MMLU_SUBJECTS, data_file


@dataclass(frozen=True)
class Example:
    """One labelled example: ``head`` + ``body`` is its 0-shot prompt; ``options[label]`` the gold continuation.

    ``head`` is the task's instruction (or MMLU's per-subject line); few-shot prompts put demonstrations
    (``body + options[label]``, separated by blank lines) between it and the body. ``group`` is MMLU's subject.
    """

    head: str
    body: str
    options: tuple[str, ...]
    label: int
    group: str = ""


@dataclass(frozen=True)
class Format:
    name: str
    family: str  # "classification" | "multiple_choice"
    scoring: str  # "label_logit" | "loglik"
    load: Callable[[], list[Example]]


def _classification(key: str, instruction: str, template: str, words: list[str], rows=None) -> list[Example]:
    """Examples of one classification task; ``rows`` are (fields, label) pairs, by default StaICC's (text, label)."""
    if rows is None:
        rows = [({"text": t.strip()}, y) for t, y in read_staicc(data_file(key))]
    return [Example(instruction, template.format(**fields), tuple(words), int(y)) for fields, y in rows]


def _glue(key: str, label_of=lambda r: r["label"]):
    return [({k: v.strip() if isinstance(v, str) else v for k, v in r.items()}, label_of(r))
            for r in read_arrow(data_file(key))]


SENTIMENT = [" negative", " positive"]
CLASSIFICATION: dict[str, tuple[str, str, list[str], Callable | None]] = {
    # name: (instruction, template, label words, rows loader; None = StaICC's single-text pickle)
    "sst2": ("Classify the sentence into one of the following categories: positive or negative.\n",
             "Sentence: {sentence}\nAnswer:", SENTIMENT, lambda: _glue("sst2")),
    "sst5": ("Classify the sentence into one of the following categories: terrible, negative, neutral, positive, "
             "or great.\n", "Sentence: {text}\nAnswer:",
             [" terrible", " negative", " neutral", " positive", " great"], None),
    "mr": ("Classify the review into one of the following categories: positive or negative.\n",
           "Review: {text}\nAnswer:", SENTIMENT, None),
    "subj": ("Classify the input into one of the following categories: subjective or objective.\n",
             "Input: {text}\nType:", [" objective", " subjective"], None),
    "trec": ("", "What category does the question '{text}' belong to? Choose from Abbreviation, Entity, Description, "
             "Person, Location, or Number.\nAnswer:",
             [" Abbreviation", " Entity", " Description", " Person", " Location", " Number"], None),
    "agnews": ("Classify the news articles into one of the following categories: World, Sports, Business, or "
               "Technology.\n", "Article: {text}\nCategories:", [" World", " Sports", " Business", " Technology"],
               None),
    "cb": ("Read the premise and decide if it supports the hypothesis.\n",
           "Premise: {premise} Hypothesis: {hypothesis}. Respond with Yes if it supports, No if it contradicts, or "
           "Maybe if it is neutral.\nAnswer:", [" Yes", " No", " Maybe"], lambda: _glue("cb")),
    "boolq": ("Read the text and answer the question by True or False.\n",
              "Text: {passage}\nQuestion: {question}?\nAnswer:", [" False", " True"],
              lambda: _glue("boolq", lambda r: int(bool(r["answer"])))),
    "rte": ("", "{sentence1}\nQuestion: {sentence2} True or False?\nAnswer:", [" True", " False"],
            lambda: _glue("rte")),
}


def _hellaswag_clean(text: str) -> str:
    """lm-evaluation-harness's ``preprocess``: WikiHow's bracketed artifacts out, double spaces collapsed."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _arc(key: str) -> list[Example]:
    return [Example("", f"Question: {r['question']}\nAnswer:", tuple(" " + t for t in r["choices"]["text"]),
                    r["choices"]["label"].index(r["answerKey"])) for r in read_arrow(data_file(key))]


def _hellaswag() -> list[Example]:
    out = []
    for r in read_arrow(data_file("hellaswag")):
        query = _hellaswag_clean(r["activity_label"] + ": " + r["ctx_a"] + " " + r["ctx_b"].capitalize())
        out.append(Example("", query, tuple(" " + _hellaswag_clean(e) for e in r["endings"]), int(r["label"])))
    return out


def _piqa() -> list[Example]:
    return [Example("", f"Question: {r['goal']}\nAnswer:", (" " + r["sol1"], " " + r["sol2"]), int(r["label"]))
            for r in read_arrow(data_file("piqa"))]


def _openbookqa() -> list[Example]:
    return [Example("", r["question_stem"], tuple(" " + t for t in r["choices"]["text"]),
                    r["choices"]["label"].index(r["answerKey"].lstrip())) for r in read_arrow(data_file("openbookqa"))]


def _lettered(question: str, answers: list[str]) -> str:
    return question + "".join(f"\n{chr(65 + i)}. {a}" for i, a in enumerate(answers)) + "\nAnswer:"


def _commonsenseqa() -> list[Example]:
    out = []
    for r in read_arrow(data_file("commonsenseqa")):
        labels = r["choices"]["label"]
        out.append(Example("", _lettered(f"Question: {r['question'].strip()}", r["choices"]["text"]),
                           tuple(f" {x}" for x in labels), labels.index(r["answerKey"])))
    return out


def _mmlu() -> list[Example]:
    out = []
    for subject in MMLU_SUBJECTS:  # alphabetical: the order of the examples before the split permutation
        head = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        for r in read_arrow(data_file(f"mmlu/{subject}")):
            out.append(Example(head, _lettered(r["question"].strip(), r["choices"]), (" A", " B", " C", " D"),
                               int(r["answer"]), subject))
    return out


def _classification_format(name: str) -> Format:
    instruction, template, words, rows = CLASSIFICATION[name]
    return Format(name, "classification", "label_logit",
                  lambda: _classification(name, instruction, template, words, rows() if rows else None))


FORMATS: dict[str, Format] = {
    **{name: _classification_format(name) for name in CLASSIFICATION},
    "arc_easy": Format("arc_easy", "multiple_choice", "loglik", lambda: _arc("arc_easy")),
    "arc_challenge": Format("arc_challenge", "multiple_choice", "loglik", lambda: _arc("arc_challenge")),
    "hellaswag": Format("hellaswag", "multiple_choice", "loglik", _hellaswag),
    "piqa": Format("piqa", "multiple_choice", "loglik", _piqa),
    "openbookqa": Format("openbookqa", "multiple_choice", "loglik", _openbookqa),
    "commonsenseqa": Format("commonsenseqa", "multiple_choice", "loglik", _commonsenseqa),
    "mmlu": Format("mmlu", "multiple_choice", "loglik", _mmlu),
}
