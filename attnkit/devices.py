"""The one check of a device name that every entry point (model loading, zoo training) shares."""

from __future__ import annotations

import re

import torch


def device_type(device: str | torch.device, who: str = "") -> str:
    """``"cpu"`` or ``"cuda"`` for a well-formed name (``cpu``, ``cuda``, ``cuda:N``), whether or not this machine has
    it (a results key, a plan for another machine); else one ValueError naming the value and what is accepted
    (``who`` prefixes it, e.g. ``"zoo: "``)."""
    name = str(device)
    if not re.fullmatch(r"(cpu|cuda)(:\d+)?", name):
        raise ValueError(f"{who}device {name!r} is invalid; accepted: cpu, cuda, cuda:N")
    return name.partition(":")[0]


def resolve_device(device: str | torch.device, who: str = "") -> torch.device:
    """``cpu`` or ``cuda`` / ``cuda:N`` that this machine has, as a torch.device; else one ValueError naming the value
    and what is accepted (see :func:`device_type`)."""
    device_type(device, who)
    name = str(device)
    resolved = torch.device(name)
    if resolved.type == "cpu":
        return resolved
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ValueError(f"{who}device {name!r} requested but CUDA is not available here; accepted: cpu")
    if resolved.index is not None and resolved.index >= count:
        raise ValueError(f"{who}device {name!r} is invalid; accepted: cuda:0 .. cuda:{count - 1}")
    return resolved
