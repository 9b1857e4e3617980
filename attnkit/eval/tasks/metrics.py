"""Metrics the tasks add to ``attnkit.eval.sample.METRICS`` (registered when ``attnkit.eval.tasks`` is imported)."""

from __future__ import annotations

import re

from attnkit.eval.sample import METRICS

_INTEGER = re.compile(r"\d+")


def first_integer(prediction: str, references: tuple[str, ...] | list[str]) -> float:
    """Passkey: exact match of the first integer in the prediction (digits only, so "7,123" reads as 7) with the
    first reference; leading zeros do not matter. 0 when the prediction has no digits."""
    found = _INTEGER.search(prediction)
    return float(found is not None and int(found.group()) == int(references[0]))


METRICS.setdefault("first_integer", first_integer)
