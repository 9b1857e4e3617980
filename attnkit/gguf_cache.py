"""A converted copy of each GGUF model on disk, so that a GGUF is parsed and dequantised once per machine.

transformers reads a GGUF's metadata three times (config, tokenizer, weights) through gguf's pure-Python reader, then
dequantises every tensor: about 27 s for SmolLM2-135M and 75 s for Gemma-3-270M on two CPU cores, paid by every
``load_model`` call. The first load here saves what transformers built (float32 weights as safetensors, the config
without its GGUF quantisation entry, the generation config, the tokenizer) into
``$ATTNKIT_CACHE/converted/<key>/`` (default ``~/.cache/attnkit``); later loads read that folder in under a second,
bit-identical (weights, logits, token ids: ``tests/test_models.py``). The key hashes the file's name, size and first and
last MiB, the transformers version (its GGUF conversion and tokenizer rebuild change between releases) and
:data:`FORMAT`. ``ATTNKIT_GGUF_CACHE=0`` turns the cache off; an unwritable cache falls back to the
direct load.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

FORMAT = 1  # bump when what is written changes
DONE = "attnkit-converted.json"  # written last: a folder without it is incomplete


def cache_root() -> Path:
    """$ATTNKIT_CACHE or ~/.cache/attnkit (also where Gemma's chunks are joined)."""
    return Path(os.environ.get("ATTNKIT_CACHE") or Path.home() / ".cache" / "attnkit").expanduser()


def enabled() -> bool:
    return os.environ.get("ATTNKIT_GGUF_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


SAMPLE = 1 << 20  # bytes hashed at each end of the file


def folder_for(gguf: Path) -> Path:
    """Where the converted copy of ``gguf`` lives (whether or not it exists yet). Keyed by content, not path, so
    that clones and virtual environments holding the same package share one copy: the size and a hash of the first
    and last MiB (the header with every metadata value, and the last tensors), read in milliseconds."""
    import transformers

    digest = hashlib.sha256()
    size = gguf.stat().st_size
    with gguf.open("rb") as f:
        digest.update(f.read(SAMPLE))
        f.seek(max(0, size - SAMPLE))
        digest.update(f.read(SAMPLE))
    ident = json.dumps([gguf.name, size, digest.hexdigest(), transformers.__version__, FORMAT])
    return cache_root() / "converted" / f"{gguf.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def ready(folder: Path) -> bool:
    return (folder / DONE).is_file()


def save(folder: Path, model: torch.nn.Module, tokenizer) -> bool:
    """Write a converted model into ``folder`` (whose parent exists) through a temporary sibling renamed at the end
    (a concurrent or cut conversion never leaves a half folder). Returns False, writing nothing, where the cache
    cannot be written."""
    from safetensors.torch import save_model

    try:
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=folder.name + ".", suffix=".tmp"))
    except OSError:
        return False
    try:
        config = model.config.to_dict()
        # the weights are dequantised; transformers refuses to save a model that keeps its GGUF quantisation entry
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=1, default=str))
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})  # tied weights stored once
        tokenizer.save_pretrained(tmp)
        (tmp / DONE).write_text(json.dumps({"format": FORMAT}))
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700; the cache may be shared
        os.replace(tmp, folder)
    except OSError:  # full disk, read-only cache, or another process renamed its copy first
        shutil.rmtree(tmp, ignore_errors=True)
        return ready(folder)
    return True


def drop(folder: Path) -> None:
    """Remove a damaged converted copy (the next load converts again)."""
    with contextlib.suppress(OSError):
        shutil.rmtree(folder)


def converted(gguf: Path, convert: Callable[[], tuple[torch.nn.Module, object]]) -> Path | None:
    """The converted folder of ``gguf``, made with ``convert()`` (a float32 load from the GGUF) on first use; None when
    the cache is off or cannot be written."""
    if not enabled():
        return None
    folder = folder_for(gguf)
    if ready(folder):
        return folder
    try:  # an unwritable cache is found before a conversion it could not keep
        folder.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(folder.parent, os.W_OK):
            return None
    except OSError:
        return None
    model, tokenizer = convert()
    ok = save(folder, model, tokenizer)
    del model
    return folder if ok else None
