"""A regular-expression sentence splitter (instead of NLTK's punkt model, which needs a download).

A sentence ends at ``.``, ``!`` or ``?`` (optionally followed by closing quotes or brackets) before whitespace and
an upper-case letter, a digit, or an opening quote or bracket; a period after a known abbreviation (Mr., Dr., etc.,
e.g. ...) or after single letters (initials, U.S.) does not end one. Only the standard library is used, so that
RULER's reference generator can load this file on its own in tests (``tests/ruler_stub``).
"""

from __future__ import annotations

import re

_BOUNDARY = re.compile(r"""[.!?]+['"\u2019\u201d)\]]*(\s+)(?=['"\u2018\u201c(\[]?[A-Z0-9])""")
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st jr sr vs etc inc ltd co corp dept no nos vol fig eq approx est mt ft gen gov sen rep".split()
)
_INITIALS = re.compile(r"(?:[a-z]\.)*[a-z]")


def split_sentences(text: str) -> list[str]:
    """Split ``text`` into sentences (see the module docstring); joining them with one space gives back the text
    when its whitespace is single spaces."""
    text = text.strip()
    out: list[str] = []
    start = 0
    for m in _BOUNDARY.finditer(text):
        end = m.start(1)
        if end <= start:
            continue
        tail = text[start:end].rsplit(None, 1)[-1].rstrip("'\"\u2019\u201d)]")
        if tail.endswith(".") and not tail.endswith(".."):
            stem = tail[:-1].lstrip("'\"\u2018\u201c([").lower()
            if stem in _ABBREVIATIONS or _INITIALS.fullmatch(stem):
                continue
        out.append(text[start:end])
        start = m.end(1)
    if start < len(text):
        out.append(text[start:])
    return out
