"""``sent_tokenize`` for RULER's reference generator: attnkit's regex sentence splitter instead of NLTK's punkt
model (which needs a download), so that both generators cut the essays at the same sentence boundaries.

The splitter's file is loaded on its own, without importing the attnkit package (and torch).
"""

import importlib.util
from pathlib import Path

_PATH = Path(__file__).resolve().parents[4] / "attnkit" / "eval" / "tasks" / "sentences.py"
_spec = importlib.util.spec_from_file_location("_attnkit_sentences", _PATH)
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)


def sent_tokenize(text, language="english"):
    return _module.split_sentences(text)
