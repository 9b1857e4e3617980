"""Documents read in sentence-aligned chunks: sentence spans, packing into chunks, and the prompt's token layout.

A generation driver (:mod:`attnkit.methods.driver.infiniretri`) reads a long document a chunk at a time and keeps
whole sentences between chunks. This module holds the text side of that loop:

- :func:`split_document`: the document as sentence spans (character ranges that cover it) with their token counts,
  a sentence longer than a chunk cut at token boundaries into pieces that fit;
- :func:`pack`: whole sentences packed greedily into chunks of at most ``chunk`` tokens;
- :class:`Template` and :func:`layout`: a prompt (``{context}`` slot, then a ``{question}`` slot) filled with some
  sentences and tokenised once, with the token range of the context, the first question token and the sentence of
  every context token.

Tokens are mapped to sentences by character offsets of one whole-string tokenisation (a fast tokenizer's offset
mapping), so the model reads the prompt exactly as :func:`attnkit.eval.sample.build_prompt` would tokenise it;
the official code instead tokenises sentence by sentence, which can differ from whole-string tokenisation.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

# A sentence ends after terminal punctuation (and closing quotes or brackets) that whitespace follows, or before a
# blank line; the whitespace after the end belongs to the next sentence. This is the official split pattern
# ("(\n\n)|([。！？.?!])") without its merge of short pieces after a period.
_END = re.compile(r"""[.!?]+['"\u2019\u201d)\]]*(?=\s)|[。！？]+""")
_BLANK = re.compile(r"\n[ \t]*\n")

DEFAULT_TEMPLATE = (
    "Read the book and answer the question. Be very concise in your answer.\n\n{context}\n\nQuestion:\n\n"
    "{question}\n\nAnswer:"
)  # the infini-retri package's default prompt


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of the sentences of ``text``; they cover it, in order, without overlap.

    Whitespace between two sentences starts the second one; a span of whitespace alone joins the previous span.
    """
    cuts = {m.end() for m in _END.finditer(text)} | {m.start() for m in _BLANK.finditer(text)}
    spans: list[tuple[int, int]] = []
    start = 0
    for cut in sorted(c for c in cuts if 0 < c < len(text)) + [len(text)]:
        if cut <= start:
            continue
        if spans and not text[start:cut].strip():
            spans[-1] = (spans[-1][0], cut)
        else:
            spans.append((start, cut))
        start = cut
    return spans


def _token_starts(tokenizer, text: str) -> list[int]:
    """Start character of every token of ``text`` (no special tokens), from a fast tokenizer's offset mapping."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"reading in chunks maps tokens to sentences by character offsets, which needs a fast "
                         f"tokenizer; {type(tokenizer).__name__} is not one")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [a for a, _ in enc["offset_mapping"]]


def split_document(tokenizer, document: str, chunk: int) -> tuple[list[tuple[int, int]], list[int]]:
    """(spans, token counts): the document's sentences with their tokens, no piece longer than ``chunk`` tokens.

    The document is tokenised once; a token counts for the sentence its first character falls in. A sentence of
    more than ``chunk`` tokens is cut at token boundaries into pieces of ``chunk`` tokens (the last shorter).
    """
    spans = sentence_spans(document)
    if not spans:
        return [], []
    starts = _token_starts(tokenizer, document)
    span_starts = [a for a, _ in spans]
    owned: list[list[int]] = [[] for _ in spans]  # token start offsets per sentence
    for off in starts:
        owned[max(0, bisect.bisect_right(span_starts, off) - 1)].append(off)
    out_spans: list[tuple[int, int]] = []
    counts: list[int] = []
    for (a, b), toks in zip(spans, owned):
        if len(toks) <= chunk:
            out_spans.append((a, b))
            counts.append(len(toks))
            continue
        cuts = [a] + [toks[i] for i in range(chunk, len(toks), chunk)] + [b]
        for lo, hi in zip(cuts, cuts[1:]):
            out_spans.append((lo, hi))
            counts.append(sum(lo <= t < hi for t in toks))
    return out_spans, counts


def pack(counts: list[int], chunk: int) -> list[list[int]]:
    """Sentence indices packed greedily, in order, into chunks of at most ``chunk`` tokens (by ``counts``).

    A sentence is never split across chunks; one of more than ``chunk`` tokens (``split_document`` prevents
    that) gets a chunk of its own.
    """
    chunks: list[list[int]] = []
    size = 0
    for i, n in enumerate(counts):
        if chunks and size + n <= chunk:
            chunks[-1].append(i)
            size += n
        else:
            chunks.append([i])
            size = n
    return chunks


@dataclass(frozen=True)
class Template:
    """A prompt with one ``{context}`` slot followed by one ``{question}`` slot: head {context} mid {question} tail.

    Filled by concatenation (not ``str.format``), so braces in the document or question need no escaping.
    """

    head: str
    mid: str
    tail: str

    @classmethod
    def parse(cls, template: str) -> "Template":
        head, sep, rest = template.partition("{context}")
        mid, sep2, tail = rest.partition("{question}")
        if not sep or not sep2 or "{context}" in rest or "{question}" in head + tail:
            raise ValueError(f"template {template[:80]!r}... is invalid; accepted: a string with one '{{context}}' "
                             "slot followed by one '{question}' slot")
        return cls(head, mid, tail)


@dataclass
class Layout:
    """One tokenised prompt: ids (L,), context tokens ``[context[0], context[1])``, question rows
    ``[rows_start, L)`` (the question and everything after it, as the official code's rows), and per context token
    the index (into the pieces passed to :func:`layout`) of the sentence it belongs to."""

    ids: list[int]
    context: tuple[int, int]
    rows_start: int
    piece_of: list[int]  # (context[1] - context[0],)


def layout(tokenizer, template: Template, pieces: list[str], question: str, answer_prefix: str,
           chat: bool) -> Layout:
    """Tokenise ``template`` filled with the joined ``pieces`` (stripped at both ends) and ``question``.

    With ``chat`` (and a chat template) the text is the user turn, then ``answer_prefix`` after the assistant turn,
    as :func:`attnkit.eval.sample.build_prompt` builds prompts.
    """
    if pieces:
        pieces = [pieces[0].lstrip(), *pieces[1:]]
        pieces[-1] = pieces[-1].rstrip()
    context = "".join(pieces)
    user = template.head + context + template.mid + question + template.tail
    use_chat = chat and getattr(tokenizer, "chat_template", None)
    if use_chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                             tokenize=False)
        u0 = text.find(user)
        if u0 < 0:
            raise ValueError("the tokenizer's chat template changes the user turn's text; read with chat=False")
    else:
        text, u0 = user, 0
    c0 = u0 + len(template.head)
    c1 = c0 + len(context)
    q0 = c1 + len(template.mid)
    enc = tokenizer(text, add_special_tokens=not use_chat, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    starts = [a for a, _ in enc["offset_mapping"]]
    ends = [b for _, b in enc["offset_mapping"]]  # special tokens added by the tokenizer: (0, 0)
    # a token belongs to the part that holds its last character (" What" starts the question, its space aside)
    first = next((i for i, b in enumerate(ends) if b > c0), len(ids))
    stop = next((i for i, b in enumerate(ends) if b > c1), len(ids)) if context else first
    rows_start = next((i for i, b in enumerate(ends) if b > q0), len(ids))
    piece_starts, at = [], c0
    for p in pieces:
        piece_starts.append(at)
        at += len(p)
    piece_of = [max(0, bisect.bisect_right(piece_starts, starts[i]) - 1) for i in range(first, stop)]
    if answer_prefix:
        ids += tokenizer(answer_prefix, add_special_tokens=False).input_ids
    return Layout(ids, (first, stop), rows_start, piece_of)
