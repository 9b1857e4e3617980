"""ZeroTuning: per-head scaling of the attention paid to the initial token (arXiv 2505.11739).

Idea: the initial token is an attention sink, so scaling its probability by gamma and renormalising flattens
(gamma > 1) or sharpens (gamma < 1) a head's attention over everything else. Heads and gamma are chosen on a small
calibration set (`attnkit calibrate zerotuning`), supervised by accuracy or unsupervised by output entropy.

Implementation: the paper's ``P[..., 0] *= gamma`` then renormalise equals adding ``log(gamma)`` to the initial
token's logit; attnkit applies it exactly on the output of an attention that returns its log-sum-exp
(``weighing.bias_initial``), in prefill and in every decode step (the fixed-shape CUDA-graph step included), on the
model's sliding-window layers too while they hold the initial token. The initial token is each row's first real
token (position 0), so left padding is handled per row.

How we differ from the paper: the official repository does not contain the working calibration file, so the
head search of ``attnkit calibrate zerotuning`` (attnkit/calibrate_heads.py) is our own, documented there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnkit.hf.attention import attend_layer
from attnkit.methods.base import Method, check_float, load_json_profile
from attnkit.methods.read.weighing import attention_lse, bias_initial, initial_bias_tensor
from attnkit.session import text_config


def parse_indices(method: str, name: str, spec: str) -> list[int] | None:
    """"all" -> None; "0-3,7" -> [0, 1, 2, 3, 7]. ValueError naming the setting otherwise."""
    if not isinstance(spec, str):
        raise ValueError(f"{method}: {name}={spec!r} is invalid; accepted: 'all' or indices such as '0-3,7'")
    if spec.strip() == "all":
        return None
    out: list[int] = []
    try:
        for part in (p.strip() for p in spec.split(",") if p.strip()):
            lo, _, hi = part.partition("-")
            out.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise ValueError(f"{method}: {name}={spec!r} is invalid; accepted: 'all' or indices such as '0-3,7'") from None
    if not out or min(out) < 0:
        raise ValueError(f"{method}: {name}={spec!r} is invalid; accepted: 'all' or indices >= 0 such as '0-3,7'")
    return sorted(set(out))


def load_gammas(method: str, path: str) -> dict:
    """A head-gamma profile (JSON from ``attnkit calibrate zerotuning``): fields num_layers, num_heads, gammas."""
    data = load_json_profile(method, path, ("method", "num_layers", "num_heads", "gammas"),
                             f"attnkit calibrate {method} --model ... --task ... -o profile.json")
    if data["method"] != method:
        raise ValueError(f"{method}: {path!r} is not a {method} profile; accepted: JSON with method={method!r}")
    return data


@dataclass
class ZeroTuning(Method):
    """Scale the initial token's attention by ``gamma`` in the chosen heads.

    Settings
    --------
    gamma : the scale (> 1 flattens, < 1 sharpens; 1 = the unmodified model)
    layers, heads : which layers and query heads take ``gamma``: "all" or indices such as "0-3,7"
    profile : JSON from ``attnkit calibrate zerotuning`` with a gamma per (layer, head); replaces the three above
    """

    name = "zerotuning"
    summary = "per-head scaling of the attention to the initial token (log-gamma logit bias), calibrated"
    paper = "https://arxiv.org/abs/2505.11739"
    kind = "weigh"
    weighs_sliding_layers = True

    gamma: float = 1.0
    layers: str = "all"
    heads: str = "all"
    profile: str = ""

    def __post_init__(self) -> None:
        check_float(self.name, "gamma", self.gamma, 0.01, 100.0)
        self._layers = parse_indices(self.name, "layers", self.layers)
        self._heads = parse_indices(self.name, "heads", self.heads)
        if not isinstance(self.profile, str):
            raise ValueError(f"{self.name}: profile={self.profile!r} is invalid; accepted: a path to a JSON profile")
        self._profile = load_gammas(self.name, self.profile) if self.profile else None
        self._table: torch.Tensor | None = None  # (L, H) gamma - 1, set by check_model (attnkit.apply)
        self._gains: dict = {}

    def settings(self) -> dict:
        return {"gamma": self.gamma, "layers": self.layers, "heads": self.heads, "profile": self.profile}

    def check_model(self, model: torch.nn.Module, max_positions: int | None) -> None:
        cfg = text_config(model)
        n_layers, n_heads = cfg.num_hidden_layers, cfg.num_attention_heads
        p = self._profile
        if p is not None:
            if (p["num_layers"], p["num_heads"]) != (n_layers, n_heads):
                raise ValueError(f"{self.name}: profile {self.profile!r} was calibrated for {p['num_layers']} layers "
                                 f"x {p['num_heads']} heads; this model has {n_layers} x {n_heads}")
            table = torch.zeros(n_layers, n_heads)
            for layer, head, gamma in p["gammas"]:
                table[layer, head] = float(gamma) - 1.0
        else:
            for what, idx, n in (("layers", self._layers, n_layers), ("heads", self._heads, n_heads)):
                if idx is not None and max(idx) >= n:
                    raise ValueError(f"{self.name}: {what}={getattr(self, what)!r} is invalid for this model; "
                                     f"accepted: indices in [0, {n - 1}]")
            table = torch.zeros(n_layers, n_heads)
            rows = list(range(n_layers)) if self._layers is None else self._layers
            cols = list(range(n_heads)) if self._heads is None else self._heads
            table[torch.tensor(rows)[:, None], torch.tensor(cols)[None, :]] = self.gamma - 1.0
        self.set_gains(table)

    def set_gains(self, table: torch.Tensor) -> None:
        """gamma - 1 per layer and query head (0: untouched); calibration updates it between forwards.

        table (L, H), or (V, L, H): V variants in one forward, variant v on the batch's v-th block of B / V rows
        (the head searches score V candidates at once this way)."""
        self._table = table.float()
        self._gains = {}

    def gain(self, layer_idx: int, device: torch.device) -> torch.Tensor | None:
        """(H,) or (V, H) gains of a layer on ``device``; None where every gain is 0."""
        g = self._gains.get((layer_idx, device))
        if g is None:
            row = self._table[..., layer_idx, :]
            g = self._gains[(layer_idx, device)] = row.to(device) if bool(row.ne(0).any()) else torch.empty(0)
        return g if g.numel() else None

    @staticmethod
    def per_row(gain: torch.Tensor, batch: int) -> torch.Tensor:
        """(H,) -> itself; (V, H) -> (B, H), variant v on rows [v B / V, (v + 1) B / V)."""
        if gain.dim() == 1:
            return gain
        if batch % gain.shape[0]:
            raise ValueError(f"zerotuning: {gain.shape[0]} gain variants do not divide a batch of {batch} rows")
        return gain.repeat_interleave(batch // gain.shape[0], 0)

    def attend(self, run, module, layer, query, key, value, scaling: float, softcap) -> torch.Tensor:
        """query (B, H, q, D); key/value (B, Hkv, n, D) -> (B, H, q, D), the initial token's logit + log(gamma_h)."""
        gain = self.gain(layer.layer_idx, query.device)
        if gain is None:
            return attend_layer(run, layer, query, key, value, scaling, softcap)
        gain = self.per_row(gain, query.shape[0])
        if layer.static:  # fixed-shape decode step: the valid slots of the span, float32 with its log-sum-exp
            span = layer.span
            key, value, pos = layer.keys[:, :, :span], layer.values[:, :, :span], layer.pos[:, :, :span]
            out, lse = attention_lse(query, key, value, (pos >= 0).unsqueeze(2), scaling, softcap)
            out = bias_initial(out, lse, query, key, value, pos, scaling, softcap, gain, (pos >= 0).unsqueeze(2))
            layer.static_after()
            return out.to(query.dtype)
        q = query.shape[2]
        causal = q > 1 and run.recorder is None and layer.holds_prefix()
        mask = None if causal else layer.mask()
        pos = layer.stored_pos()
        out, lse = attention_lse(query, key, value, mask, scaling, softcap, causal_prefix=causal)
        out = bias_initial(out, lse, query, key, value, pos, scaling, softcap, gain, mask)
        if run.recorder is not None:
            bias = initial_bias_tensor(pos, query.shape[1], q, gain)
            run.recorder(dict(layer=layer.layer_idx, query=query, key=key, value=value, mask=mask, scaling=scaling,
                              out=out, bias=bias))
        layer.compact()
        return out.to(query.dtype)
