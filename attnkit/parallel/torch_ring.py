"""torch's own context-parallel ring attention (``torch.distributed.tensor.experimental.context_parallel``).

Inside ``context_parallel(mesh, buffers=...)`` torch shards the buffers along the sequence in its head-tail
layout (our ``zigzag``) and replaces ``F.scaled_dot_product_attention`` by a DTensor wrapper whose flash,
memory-efficient and cuDNN kernels run as a ring (K/V rotated by all-gather, torch's default, or all-to-all:
``rotate``), merging partials by log-sum-exp in float32. Only those CUDA kernels are patched: on CPU the
SDPA op is not, so this path needs CUDA (NCCL); :mod:`attnkit.parallel.ring` is the portable one. It only
does plain causal attention (``is_causal=True``, queries and keys of the same length).

:func:`torch_ring_context` enters that context for a global length ``n`` and checks that torch's shard of the
positions equals our zigzag layout (so RoPE positions, our sparse masks and torch's ring agree);
:func:`torch_ring_attention` is the call inside it.
"""

from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from attnkit.parallel.layout import SeqLayout

ROTATES = ("allgather", "alltoall")
_GQA = {"native": True}  # False once torch's DTensor path refused grouped KV heads: expand them instead


def check_device(device: torch.device) -> None:
    if device.type != "cuda":
        raise ValueError(f"strategy='torch_ring' on device {device.type!r}: torch's context_parallel patches the "
                         "CUDA SDPA kernels only; accepted: CUDA tensors (NCCL), or strategy='ring' / 'ulysses'")


@contextlib.contextmanager
def torch_ring_context(layout: SeqLayout, group=None, device=None, rotate: str = "allgather"):
    """Run the block with SDPA replaced by torch's ring over ``group`` (CUDA, zigzag layout)."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor.experimental import context_parallel

    try:  # torch >= 2.9 keeps it in a package, earlier in one module
        from torch.distributed.tensor.experimental._context_parallel import _cp_options, set_rotate_method
    except ImportError:
        from torch.distributed.tensor.experimental._attention import _cp_options, set_rotate_method

    device = torch.device(device or "cuda")
    check_device(device)
    if layout.kind != "zigzag":
        raise ValueError(f"strategy='torch_ring': layout={layout.kind!r}; accepted: 'zigzag' (torch's head-tail "
                         "load balancing, on whenever the length divides by 2 x world size)")
    if rotate not in ROTATES:
        raise ValueError(f"torch_ring: rotate={rotate!r}; accepted: {', '.join(map(repr, ROTATES))}")
    group = group if group is not None else torch.distributed.group.WORLD
    mesh = DeviceMesh.from_group(group, device_type="cuda")
    saved = _cp_options.rotate_method
    set_rotate_method(rotate)
    pos = torch.arange(layout.n, device=device).view(1, -1)  # torch shards this buffer in place
    try:
        with context_parallel(mesh, buffers=[pos], buffer_seq_dims=[1], no_restore_buffers={pos}):
            if not torch.equal(pos[0], layout.positions(device=device)):
                raise RuntimeError("torch's context_parallel shard differs from attnkit's zigzag layout; this "
                                   "torch changed its load balancer: use strategy='ring'")
            yield
    finally:
        _cp_options.rotate_method = saved


def torch_ring_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                         scale: float | None = None) -> torch.Tensor:
    """Causal attention through the patched SDPA (call inside :func:`torch_ring_context`): query (B, H, n/W, D),
    key/value (B, Hkv, n/W, D) -> (B, H, n/W, D). Grouped KV heads go in as they are (the flash kernel takes
    them); if this torch's DTensor path refuses that, the KV heads are repeated from then on (warned once)."""
    check_device(query.device)
    gqa = key.shape[1] != query.shape[1]
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        if gqa and _GQA["native"]:
            try:
                return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale,
                                                      enable_gqa=True)
            except (RuntimeError, AssertionError, NotImplementedError) as exc:
                _GQA["native"] = False
                warnings.warn(f"torch_ring: grouped KV heads refused ({str(exc).splitlines()[0][:120]}); "
                              "repeating KV heads", stacklevel=2)
        if gqa:
            rep = query.shape[1] // key.shape[1]
            key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
        return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale)
