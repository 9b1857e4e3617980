"""Full attention: the unmodified model, every token kept. The baseline every report compares against."""

from __future__ import annotations

from dataclasses import dataclass

from attnkit.methods.base import Method


@dataclass
class Full(Method):
    """Dense attention over every cached token (no paper; the reference point).

    Runs through attnkit's own cache and attention function so that KV memory and latency are measured the same
    way as for every other method. Shapes: keys/values (B, Hkv, n, D) with n = all tokens seen.
    """

    name = "full"
    summary = "unmodified dense attention: every token kept (the baseline)"
