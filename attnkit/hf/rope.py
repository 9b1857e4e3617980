"""Re-rotating cached keys with the model's own rotary embedding.

HF caches keys after RoPE. RoPE rotations compose (rotating a key at position p by an angle for offset e gives
the key at p + e), so a method that renumbers positions rotates cached keys by the position shift, using the
frequencies of the model's own rotary module (rope scaling such as llama3 or YaRN is baked into them).
"""

from __future__ import annotations

import torch
from torch import nn

#: RoPE variants whose frequencies change with the sequence length at run time: a shift is not a pure rotation.
DYNAMIC_ROPE_TYPES = ("dynamic", "longrope")


def find_rotary(model: nn.Module) -> nn.Module | None:
    """The model's rotary-embedding module, or None for models without RoPE."""
    for module in model.modules():
        if type(module).__name__.endswith("RotaryEmbedding"):
            return module
    return None


def rope_types(config) -> dict[str, str]:
    """{layer_type or "default": rope_type} from a transformers 5.x config."""
    params = getattr(config, "rope_parameters", None) or {}
    if "rope_type" in params:
        return {"default": params["rope_type"]}
    return {k: v.get("rope_type", "default") for k, v in params.items() if isinstance(v, dict)}


def inv_freq_for(model: nn.Module, layer_type: str | None = None) -> torch.Tensor:
    """(D_rot/2,) inverse frequencies used by ``layer_type`` layers (Gemma-3 keeps one set per layer type)."""
    rotary = find_rotary(model)
    if rotary is None:
        raise ValueError(f"{type(model).__name__} has no rotary position embedding (RoPE)")
    freq = getattr(rotary, f"{layer_type}_inv_freq", None) if layer_type else None
    if freq is None:
        freq = getattr(rotary, "inv_freq", None)
    if freq is None:
        raise ValueError(f"cannot read the RoPE frequencies of {type(rotary).__name__}")
    return freq.detach().clone()


def rotation(offset: int, inv_freq: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (D_rot,) float32, of a shift by ``offset`` positions (angles computed in float64)."""
    angle = offset * inv_freq.to(device=device, dtype=torch.float64)
    emb = torch.cat((angle, angle))
    return emb.cos().to(torch.float32), emb.sin().to(torch.float32)


def rotation_rows(offsets: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (B, D_rot) float32, of per-row shifts ``offsets`` (B,) int on the device.

    Angles are formed in float64 (a shift of 10^6 positions keeps ~1e-10 rad of precision), with no host sync.
    """
    angle = offsets.to(torch.float64).unsqueeze(-1) * inv_freq.to(device=offsets.device, dtype=torch.float64)
    emb = torch.cat((angle, angle), dim=-1)
    return emb.cos().to(torch.float32), emb.sin().to(torch.float32)


def apply_rotation(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate post-RoPE keys (..., D) by a precomputed shift, HF's rotate-half layout, in float32.

    cos / sin: (D_rot,) or broadcastable to keys' leading dims with a last dim of D_rot. With partial rotary
    (D_rot < D) only the leading dims turn. Returns the keys' dtype.
    """
    rot = cos.shape[-1]
    k = keys[..., :rot].float()
    half = rot // 2
    rotated_half = torch.cat((-k[..., half:], k[..., :half]), dim=-1)
    out = (k * cos + rotated_half * sin).to(keys.dtype)
    if rot == keys.shape[-1]:
        return out
    return torch.cat((out, keys[..., rot:]), dim=-1)


def rotate_keys(keys: torch.Tensor, offset: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate post-RoPE keys (..., D) as if they sat ``offset`` positions later (negative: earlier)."""
    return apply_rotation(keys, *rotation(offset, inv_freq, keys.device))
