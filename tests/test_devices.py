"""attnkit.devices.resolve_device: the device check shared by model loading and zoo training."""

from __future__ import annotations

import pytest
import torch

from attnkit.devices import device_type, resolve_device


def test_cpu_names_and_devices_resolve():
    assert resolve_device("cpu") == torch.device("cpu") == resolve_device(torch.device("cpu"))
    assert resolve_device("cpu:0") == torch.device("cpu", 0)


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "mps", "", "CUDA"])
def test_a_name_that_is_not_cpu_or_cuda_is_one_clear_error(bad):
    with pytest.raises(ValueError, match=f"^zoo: device '{bad}' is invalid; accepted: cpu, cuda, cuda:N$"):
        resolve_device(bad, "zoo: ")


def test_cuda_is_checked_against_what_this_machine_has(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="device 'cuda' requested but CUDA is not available here; accepted: cpu"):
        resolve_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda") == torch.device("cuda") and resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"device 'cuda:2' is invalid; accepted: cuda:0 \.\. cuda:1"):
        resolve_device("cuda:2")


def test_device_type_reads_the_name_without_asking_the_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_type("cuda:3") == "cuda" and device_type(torch.device("cpu")) == "cpu"
    with pytest.raises(ValueError, match="^device 'tpu' is invalid; accepted: cpu, cuda, cuda:N$"):
        device_type("tpu")
