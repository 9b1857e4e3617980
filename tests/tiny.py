"""Tiny random-weight models built from configs (no downloads): shapes and seams, not behaviour."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Llama-style GQA: 4 query heads over 2 KV heads, head_dim 16, llama3 rope scaling."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        },
        attn_implementation="sdpa",
    )
    return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def tiny_gemma3(seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Gemma3-style: sliding-window layers (window 8) between global layers, two RoPE bases, q/k norms."""
    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        max_position_embeddings=2048,
        attn_implementation="sdpa",
    )
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    # Random init leaves norms at zero-ish scale; perturb so attention patterns are not uniform.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model
