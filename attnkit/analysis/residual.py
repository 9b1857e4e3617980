"""One forward over essay windows with hooks on every decoder layer: the residual stream and where it comes from.

Per decoder layer l the hooks see its input h_{l-1} (residual carried in), its attention and MLP outputs as they
are added to the residual, and its output h_l. Gemma-style layers normalise each branch before adding it
(``post_attention_layernorm`` after attention, ``post_feedforward_layernorm`` after the MLP); there the
contribution is the normalised output. Llama-style layers add the raw outputs (their ``post_attention_layernorm``
is the MLP's input norm, so it is not applied). ``h_l - h_{l-1} = attention + MLP`` is checked per layer
(``residual_error``).

Why hooks and not ``output_hidden_states``: in transformers 5.x its last entry is the output of the final norm,
not the last layer's residual, so the last layer's massive activations would be normalised away.
"""

from __future__ import annotations

from typing import Callable

import torch

import attnkit
from attnkit.analysis.capture import active_method
from attnkit.session import text_config

#: on_layer(layer_idx, h_in, attention contribution, MLP contribution, h_out), each (B, T, d) float32
ResidualFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's decoder layers: the ModuleList of num_hidden_layers modules that each hold self_attn and mlp."""
    n = text_config(model).num_hidden_layers
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n and all(
                hasattr(m, "self_attn") and hasattr(m, "mlp") for m in module):
            return module
    raise ValueError(f"{type(model).__name__}: no list of {n} decoder layers with self_attn and mlp found")


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@torch.inference_mode()
def record_residual(model: torch.nn.Module, ids: torch.Tensor, on_layer: ResidualFn) -> None:
    """Run ``ids`` (B, T) through the model under the active method (:func:`attnkit.analysis.capture.use_method`,
    default full attention); ``on_layer`` per layer."""
    layers = decoder_layers(model)
    seen: dict[str, torch.Tensor] = {}
    handles = []

    def keep(name: str):
        def hook(module, args, out):
            seen[name] = _first(out).float()
        return hook

    def pre(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        seen["in"] = h.float()

    for idx, layer in enumerate(layers):
        sandwich = hasattr(layer, "post_feedforward_layernorm")

        def done(module, args, out, idx=idx, layer=layer, sandwich=sandwich):
            attn, mlp = seen.pop("attn"), seen.pop("mlp")
            if sandwich:  # Gemma: each branch is normalised before it is added to the residual
                attn = layer.post_attention_layernorm(attn.to(_first(out).dtype)).float()
                mlp = layer.post_feedforward_layernorm(mlp.to(_first(out).dtype)).float()
            on_layer(idx, seen.pop("in"), attn, mlp, _first(out).float())

        handles += [layer.register_forward_pre_hook(pre, with_kwargs=True),
                    layer.self_attn.register_forward_hook(keep("attn")),
                    layer.mlp.register_forward_hook(keep("mlp")),
                    layer.register_forward_hook(done)]
    method, settings = active_method()
    try:
        with attnkit.apply(model, method, **settings):
            model(input_ids=ids.to(next(model.parameters()).device), use_cache=True, logits_to_keep=1)
    finally:
        for h in handles:
            h.remove()
