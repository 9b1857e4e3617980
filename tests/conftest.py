import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

# The same suite runs on the GPU in bf16: ATTNKIT_TEST_DEVICE=cuda ATTNKIT_TEST_DTYPE=bfloat16 pytest ...
DEVICE = torch.device(os.environ.get("ATTNKIT_TEST_DEVICE", "cpu"))
DTYPE = getattr(torch, os.environ.get("ATTNKIT_TEST_DTYPE", "float32"))


@pytest.fixture
def dump_timer(monkeypatch) -> list[object]:
    """faulthandler's stack-dump timer by hand: (seconds, exit) per arming, "cancel" per disarming."""
    import faulthandler

    calls: list[object] = []
    monkeypatch.setattr(faulthandler, "dump_traceback_later", lambda seconds, exit: calls.append((seconds, exit)))
    monkeypatch.setattr(faulthandler, "cancel_dump_traceback_later", lambda: calls.append("cancel"))
    return calls
