"""What every task produces and every runner consumes: one prompt with its references and its metric."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class Sample:
    """One evaluation example, fully determined by (task, length, seed, index).

    ``input`` is the user turn (RULER's template filled in); ``answer_prefix`` goes after the chat template's
    assistant turn (or straight after the input without a chat template), as RULER does. ``references`` are the
    strings the metric looks for in the prediction.
    """

    task: str
    index: int
    length: int  # requested total length in tokens: prompt + answer fit in it
    input: str
    answer_prefix: str
    references: tuple[str, ...]
    max_new_tokens: int
    metric: str  # a key of METRICS
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. {"depth": 0.5} for NIAH grids

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def string_match_all(prediction: str, references: tuple[str, ...] | list[str]) -> float:
    """RULER: fraction of references found in the prediction (case-insensitive substring)."""
    pred = prediction.lower()
    return sum(ref.lower() in pred for ref in references) / len(references)


def string_match_part(prediction: str, references: tuple[str, ...] | list[str]) -> float:
    """RULER's QA metric: 1 if any reference is found in the prediction (case-insensitive substring)."""
    pred = prediction.lower()
    return float(max(ref.lower() in pred for ref in references))


def exact_match(prediction: str, references: tuple[str, ...] | list[str]) -> float:
    """Passkey / NIAH: 1 if the first reference equals the prediction's first whitespace-delimited answer."""
    words = prediction.strip().split()
    first = words[0].strip(".,;:!?\"'") if words else ""
    return float(first.lower() == references[0].lower())


METRICS: dict[str, Callable[[str, Any], float]] = {
    "string_match_all": string_match_all,
    "string_match_part": string_match_part,
    "exact_match": exact_match,
}


def build_prompt(tokenizer, sample: Sample, chat: bool = True) -> list[int]:
    """Token ids of the full prompt: the chat template around ``input`` when the tokenizer has one and ``chat``
    is set, then the answer prefix after the assistant turn."""
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": sample.input}], add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer(text, add_special_tokens=False).input_ids
    else:
        ids = tokenizer(sample.input).input_ids
    if sample.answer_prefix:
        ids = ids + tokenizer(sample.answer_prefix, add_special_tokens=False).input_ids
    return ids
