"""Process-group setup for context parallelism: one process per GPU of a host, started by torchrun.

``init_distributed`` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), picks NCCL
on CUDA and gloo on CPU, and keeps NVLink multicast off: ``NCCL_NVLS_ENABLE=0`` (and torch's and NVSHMEM's
switches) are set before NCCL starts, since a program using multicast can put a shared host's GPUs out of
service. ``relaunch`` re-executes a script or module under ``torch.distributed.run`` when it was started
without torchrun.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch
import torch.distributed as dist


#: NVLink multicast off in NCCL, torch's symmetric memory and NVSHMEM
NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_distributed(device: str | None = None) -> torch.device:
    """Initialise the default process group from torchrun's environment; returns this rank's device.

    ``device``: "cuda" or "cpu" (default: CUDA when available). CUDA -> NCCL on cuda:LOCAL_RANK; CPU -> gloo.
    """
    os.environ.update(NO_MULTICAST)  # before NCCL initialises: no NVLink multicast
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    if use_cuda:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group("nccl", device_id=dev)
        return dev
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return torch.device("cpu")


def relaunch(nproc: int, argv: list[str], module: str | None = None, script: str | None = None) -> int:
    """Run ``python -m torch.distributed.run --standalone --nproc-per-node nproc (-m module | script) argv`` with
    NCCL_NVLS_ENABLE=0; returns its exit status."""
    target = ["-m", module] if module else [script]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *target, *argv]
    env = {**os.environ, **NO_MULTICAST}
    return subprocess.call(cmd, env=env)
