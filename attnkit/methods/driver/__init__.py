"""Generation drivers: methods that answer a question about a document through their own loop of forwards.

A driver (``Method.driver = True``) is a plain ``full`` method as far as caches and attention go; its
``drive(model, tokenizer, document, question, ...)`` reads the document its own way (InfiniRetri: in chunks,
keeping sentences) and returns a :class:`~attnkit.inference.Generation`. The eval runner drives it per sample, with
the document and question a task records as character spans of the sample's input (see :func:`sample_split`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from attnkit.methods.driver.infiniretri import InfiniRetri
from attnkit.methods.driver.reading import DEFAULT_TEMPLATE

if TYPE_CHECKING:
    from attnkit.eval.sample import Sample
    from attnkit.inference import Generation

__all__ = ["DEFAULT_TEMPLATE", "InfiniRetri", "drive_sample", "infiniretri", "sample_split"]


def sample_split(sample: "Sample", method: str = "a driver method") -> tuple[str, str, str]:
    """(document, question, template) of a sample whose task records them.

    Tasks record ``extra["document_span"]`` and ``extra["question_span"]``: character ranges ``[start, end)`` of
    ``sample.input``, the question after the document. The template is the input with those ranges replaced by
    ``{context}`` and ``{question}``, so a template filled with the whole document is the sample's input.
    """
    span, qspan = sample.extra.get("document_span"), sample.extra.get("question_span")
    if span is None or qspan is None:
        raise ValueError(f"task {sample.task!r} has no document/question split (Sample.extra['document_span'] and "
                         f"['question_span']), which {method} needs to read its document; accepted: tasks that "
                         "record one (niah_grid, passkey, niah_*)")
    (a, b), (qa, qb) = span, qspan
    text = sample.input
    template = text[:a] + "{context}" + text[b:qa] + "{question}" + text[qb:]
    return text[a:b], text[qa:qb], template


def drive_sample(method, model, tokenizer, sample: "Sample", chat: bool, prefill_chunk: int) -> "Generation":
    """One sample through a driver method: its document, question, template and answer prefix."""
    document, question, template = sample_split(sample, method.name)
    return method.drive(model, tokenizer, document, question, template=template, answer_prefix=sample.answer_prefix,
                        max_new_tokens=sample.max_new_tokens, chat=chat, prefill_chunk=prefill_chunk)


def infiniretri(model, tokenizer, document: str | list[str], question: str | list[str], *,
                template: str = DEFAULT_TEMPLATE, answer_prefix: str = "", max_new_tokens: int = 128,
                chat: bool = True, prefill_chunk: int = 512, **settings: Any) -> "Generation | list[Generation]":
    """Answer ``question`` about a ``document`` of any length with InfiniRetri (settings: chunk, topk, phrase,
    weigh_question); a list of documents gives a list of Generations (read one after another).

    >>> gen = attnkit.infiniretri(model, tokenizer, essay, "What is the special magic number?", chunk=1024)
    >>> gen.text, gen.stats["reader"]["kept_tokens"]
    """
    from attnkit.registry import make_method

    return make_method("infiniretri", **settings).drive(model, tokenizer, document, question, template=template,
                                         answer_prefix=answer_prefix, max_new_tokens=max_new_tokens, chat=chat,
                                         prefill_chunk=prefill_chunk)
