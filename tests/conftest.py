import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

# The same suite runs on the GPU in bf16: ATTNKIT_TEST_DEVICE=cuda ATTNKIT_TEST_DTYPE=bfloat16 pytest ...
DEVICE = torch.device(os.environ.get("ATTNKIT_TEST_DEVICE", "cpu"))
DTYPE = getattr(torch, os.environ.get("ATTNKIT_TEST_DTYPE", "float32"))
