"""attnkit.zoo.datacache: MQAR sets drawn once per process and per cache folder, equal to fresh draws."""

from __future__ import annotations

import warnings

import pytest
import torch

from attnkit.zoo import datacache
from attnkit.zoo.datacache import clear_memory, mqar_set
from attnkit.zoo.mqar import mqar

ARGS = (64, 512, 32, 4, 0.01, 3)  # examples, V, T, N, power_a, seed


@pytest.fixture(autouse=True)
def _fresh_memory():
    clear_memory()
    yield
    clear_memory()


def _forbid_drawing(monkeypatch):
    def draw(*args, **kwargs):
        raise AssertionError("drawn again")

    monkeypatch.setattr(datacache._mqar, "mqar", draw)


def test_a_cached_set_equals_a_fresh_draw_from_memory_and_from_disk(tmp_path, monkeypatch):
    want = mqar(*ARGS[:5], seed=ARGS[5])
    got = mqar_set(*ARGS, tmp_path)
    assert all(torch.equal(a, b) and a.dtype == torch.int64 for a, b in zip(got, want))
    (path,) = tmp_path.glob("mqar-*.safetensors")
    _forbid_drawing(monkeypatch)
    assert mqar_set(*ARGS, tmp_path)[0] is got[0]  # the same process: the same tensors
    clear_memory()  # another process: read from the file (int16 on disk), not drawn
    again = mqar_set(*ARGS, tmp_path)
    assert all(torch.equal(a, b) and a.dtype == torch.int64 for a, b in zip(again, want))
    monkeypatch.undo()
    assert not torch.equal(mqar_set(*ARGS[:5], 4, tmp_path)[0], want[0])  # another seed: another set, another file
    assert len(list(tmp_path.glob("mqar-*.safetensors"))) == 2 and path.exists()


def test_a_large_vocabulary_is_stored_in_int32(tmp_path):
    args = (8, 40_000, 32, 4, 0.01, 0)
    want = mqar(*args[:5], seed=0)
    mqar_set(*args, tmp_path)
    clear_memory()
    assert all(torch.equal(a, b) for a, b in zip(mqar_set(*args, tmp_path), want))


@pytest.mark.parametrize("damage", ["truncate", "other key"])
def test_an_unusable_file_is_drawn_again_with_a_warning(tmp_path, damage):
    want = mqar_set(*ARGS, tmp_path)
    (path,) = tmp_path.glob("mqar-*.safetensors")
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    else:
        from safetensors.torch import save_file

        save_file({"inputs": want[0].short(), "labels": want[1].short()}, str(path), metadata={"key": "{}"})
    clear_memory()
    with pytest.warns(UserWarning, match="cached MQAR set .* is unusable .* drawing it again"):
        got = mqar_set(*ARGS, tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    clear_memory()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mqar_set(*ARGS, tmp_path)  # the file was rewritten: read without a warning


def test_a_changed_generator_is_a_different_key(monkeypatch):
    key = datacache._key(*ARGS)
    monkeypatch.setattr(datacache, "_source", "another generator")
    assert datacache._key(*ARGS) != key


def test_the_memory_keeps_the_most_recent_sets_within_its_bound(monkeypatch):
    monkeypatch.setattr(datacache, "_MEMORY_BYTES", 3 * 2 * 64 * 32 * 8)  # three sets of (64, 32) int64 pairs
    for seed in range(5):
        mqar_set(*ARGS[:5], seed)
    assert len(datacache._memo) == 3
