"""ACT, the Attention Calibration Technique: cut the attention on hidden (non-initial) sinks in calibrated heads and
hand it back to the other tokens, in the prefill (arXiv 2406.15765, ICML 2024; GATECH-EIC/ACT).

Idea: besides the initial token, low-meaning tokens (punctuation, newlines) collect attention as sinks; in some
heads that hurts. Per calibrated head and prefill chunk, with P the (q, n) probabilities:
1. s_k = mean attention key k receives from the queries that see it; sinks S = {k : s_k > tau}, minus the initial
   token. 2. Each row keeps beta of its mass on S and gives the rest, (1 - beta) * sum_S P[i], to the other keys in
   proportion to their probabilities.
Every such reweighting is a per-(row, key) factor whose rows still sum to one, so it equals a logit bias
``log(factor)``; the layer records that bias for the generic tests.

Settings follow the official code: beta 0.4, tau 0.1 (its MT-Bench script uses 0.15). Heads come from a profile
written by ``attnkit calibrate act`` (one head at a time in layers 2 .. L-2 on a calibration split, kept if it raises
accuracy); without a profile, every head of layers 2 .. L-2 (the paper never touches the first two and the last).

How we differ: the paper's sink mean normalises by T - k on a square prompt; here the denominator counts the real
queries of the chunk that see key k, which is the same for a one-chunk prefill and stays defined for chunked
prefill and left padding. Decode steps are not calibrated (the official decode path is not used by the paper's
evaluation), so they run as ``full`` (CUDA graphs included).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from attnkit.hf.attention import attend_layer, layer_attention, only_real_queries, row_blocks
from attnkit.methods.base import Method, check_float
from attnkit.reference import attention_probs, per_head
from attnkit.session import text_config


def act_sinks(col_sum: torch.Tensor, seen: torch.Tensor, initial: torch.Tensor, tau: float) -> torch.Tensor:
    """The hidden sinks: keys whose mean received attention exceeds tau, the initial token left out.

    col_sum (B, h, 1, n) attention each key receives from the chunk's real queries; seen (B, h|1, 1, n) how many
    real queries see it; initial (B, h|1, 1, n) bool, the row's initial token. Returns (B, h, 1, n) bool.
    """
    return (col_sum / seen.clamp_min(1) > tau) & ~initial & (seen > 0)


def act_reweigh(real: torch.Tensor, sinks: torch.Tensor, beta: float) -> torch.Tensor:
    """The per-(row, key) multiplier ACT applies: beta on the sinks, 1 + (1 - beta) m / (1 - m) elsewhere, m =
    the row's mass on the sinks (1 in rows with m = 1). real (B, h, q, n) float32 probabilities of real queries
    (pad rows zero); sinks (B, h, 1, n) bool -> (B, h, q, n)."""
    mass = (real * sinks).sum(-1, keepdim=True)  # (B, h, q, 1)
    give = 1 + (1 - beta) * mass / (1 - mass).clamp_min(1e-6)
    factor = torch.where(sinks, torch.full_like(give, beta), give)
    # a row that sees nothing but sinks (inside a short sliding window) has nowhere to give: left as it is
    return torch.where(mass > 1 - 1e-6, torch.ones_like(factor), factor)


def act_factor(probs: torch.Tensor, seen: torch.Tensor, initial: torch.Tensor, beta: float, tau: float) -> torch.Tensor:
    """``act_sinks`` and ``act_reweigh`` over one whole chunk: probs (B, h, q, n) float32 of real queries (pad rows
    zero), seen and initial as ``act_sinks`` -> (B, h, q, n) factors."""
    return act_reweigh(probs, act_sinks(probs.sum(2, keepdim=True), seen, initial, tau), beta)


@dataclass
class ACT(Method):
    """Redistribute hidden-sink attention in calibrated heads during the prefill.

    Settings
    --------
    beta : share of the sinks' attention they keep
    tau : a key is a sink when its mean received attention exceeds tau
    profile : JSON from ``attnkit calibrate act`` naming the heads; empty: every head of layers 2 .. L-2
    heads : explicit (layer, head) pairs, "all" (every layer and head) or "" (the profile / default rule)
    """

    name = "act"
    summary = "hidden-sink attention redistributed in calibrated heads during prefill"
    paper = "https://arxiv.org/abs/2406.15765"
    kind = "weigh"
    weighs_sliding_layers = True

    beta: float = 0.4
    tau: float = 0.1
    profile: str = ""
    heads: str = ""

    def __post_init__(self) -> None:
        check_float(self.name, "beta", self.beta, 0.0, 1.0)
        check_float(self.name, "tau", self.tau, 0.0, 1.0)
        if not isinstance(self.profile, str) or not isinstance(self.heads, str):
            raise ValueError(f"{self.name}: profile and heads are strings (a JSON path; 'all' or '3:0,3:5')")
        self._pairs = self._parse_heads(self.heads) if self.heads and self.heads != "all" else None
        self._by_layer: dict[int, torch.Tensor] = {}
        self._use: dict[int, torch.Tensor | None] = {}  # layer -> (V, heads) bool when head sets vary by row block

    def _parse_heads(self, spec: str) -> list[tuple[int, int]]:
        try:
            pairs = [tuple(int(x) for x in p.split(":")) for p in spec.split(",") if p.strip()]
        except ValueError:
            pairs = []
        if not pairs or any(len(p) != 2 or min(p) < 0 for p in pairs):
            raise ValueError(f"{self.name}: heads={spec!r} is invalid; accepted: 'all' or layer:head pairs such as "
                             "'3:0,3:5'")
        return pairs

    def check_model(self, model: torch.nn.Module, max_positions: int | None) -> None:
        cfg = text_config(model)
        n_layers, n_heads = cfg.num_hidden_layers, cfg.num_attention_heads
        if self.heads == "all":
            pairs = [(l, h) for l in range(n_layers) for h in range(n_heads)]
        elif self._pairs is not None:
            pairs = self._pairs
        elif self.profile:
            pairs = self._load_profile(n_layers, n_heads)
        else:
            pairs = [(l, h) for l in range(2, n_layers - 1) for h in range(n_heads)]
        bad = [p for p in pairs if p[0] >= n_layers or p[1] >= n_heads]
        if bad:
            raise ValueError(f"{self.name}: head {bad[0][0]}:{bad[0][1]} is invalid for this model; accepted: layers "
                             f"in [0, {n_layers - 1}], heads in [0, {n_heads - 1}]")
        self.set_heads(pairs)

    def _load_profile(self, n_layers: int, n_heads: int) -> list[tuple[int, int]]:
        try:
            data = json.loads(Path(self.profile).read_text())
        except FileNotFoundError:
            raise ValueError(f"{self.name}: profile {self.profile!r} not found; make one with `attnkit calibrate act "
                             "--model ... --task ... -o profile.json`") from None
        except (OSError, ValueError) as exc:
            raise ValueError(f"{self.name}: profile {self.profile!r} is not a readable JSON profile ({exc})") from None
        if not isinstance(data, dict) or data.get("method") != "act" or "heads" not in data:
            raise ValueError(f"{self.name}: {self.profile!r} is not an act profile; accepted: JSON with method='act' "
                             "and a heads list")
        if (data.get("num_layers"), data.get("num_heads")) != (n_layers, n_heads):
            raise ValueError(f"{self.name}: profile {self.profile!r} was calibrated for {data.get('num_layers')} "
                             f"layers x {data.get('num_heads')} heads; this model has {n_layers} x {n_heads}")
        return [(int(l), int(h)) for l, h in data["heads"]]

    def set_heads(self, pairs: list[tuple[int, int]]) -> None:
        """The calibrated (layer, query head) pairs; calibration changes them between forwards."""
        self.set_head_variants([pairs])

    def set_head_variants(self, variants: list[list[tuple[int, int]]]) -> None:
        """V head sets in one forward: set v acts on the batch's v-th block of B / V rows (the head search scores V
        candidates at once this way). Per layer: the union of the sets' heads, and (V, heads) which set uses which."""
        by_layer: dict[int, set[int]] = {}
        for pairs in variants:
            for l, h in pairs:
                by_layer.setdefault(l, set()).add(h)
        self._by_layer = {l: torch.tensor(sorted(hs)) for l, hs in by_layer.items()}
        self._use = {}
        if len(variants) > 1:
            sets = [set(map(tuple, pairs)) for pairs in variants]
            for l, heads in self._by_layer.items():
                use = torch.tensor([[(l, int(h)) in chosen for h in heads] for chosen in sets])
                self._use[l] = use if not bool(use.all()) else None

    def attend(self, run, module, layer, query, key, value, scaling: float, softcap) -> torch.Tensor:
        """query (B, H, q, D); key/value (B, Hkv, n, D) -> (B, H, q, D); reweighted on calibrated heads in prefill.

        Every head first gets the layer's own attention (SDPA / flash, as ``full``). The calibrated heads are then
        redone in float32 in query-row blocks under MASKED_SCORE_BYTES (``row_blocks``), in two passes: the first
        sums the attention each key receives (the sink test needs the whole chunk's column means), the second
        reweighs each block's rows. No (h, q, n) tensor is ever whole, except the bias kept for the recorder.
        """
        heads = self._by_layer.get(layer.layer_idx)
        if heads is None or layer.static or query.shape[2] == 1:
            return attend_layer(run, layer, query, key, value, scaling, softcap)
        out, mask = layer_attention(run, layer, query, key, value, scaling, softcap)
        b, n_heads, n = query.shape[0], query.shape[1], key.shape[2]
        heads = heads.to(query.device)
        qh = query[:, heads]
        kh, vh = per_head(key, n_heads)[:, heads], per_head(value.float(), n_heads)[:, heads]  # (B, h, n, D)

        def own_heads(m: torch.Tensor | None) -> torch.Tensor | None:  # a per-KV-head mask -> the calibrated heads
            return m if m is None or m.shape[1] == 1 else per_head(m, n_heads)[:, heads]

        col_sum = torch.zeros(b, len(heads), 1, n, device=query.device)
        seen = torch.zeros(b, 1, 1, n, device=query.device)
        for rows, block_mask in row_blocks(layer, qh, kh, mask):  # pass 1: what each key receives, who sees it
            block_mask = own_heads(block_mask)
            probs, _ = attention_probs(qh[:, :, rows], kh, block_mask, scaling, softcap)
            col_sum += only_real_queries(layer, probs, rows).sum(2, keepdim=True)
            rq = layer.real_queries(None, rows)  # (B, 1, rows, 1) or None
            vis = torch.ones(b, 1, rows.stop - rows.start, n, device=query.device) if block_mask is None \
                else block_mask.float()
            block_seen = (vis if rq is None else vis * rq).sum(2, keepdim=True)
            seen = seen + block_seen  # (B, 1 or h, 1, n)
        initial = per_head((layer.stored_pos() == 0).unsqueeze(2), n_heads)[:, heads]  # (B, h, 1, n)
        sinks = act_sinks(col_sum, seen, initial, self.tau)
        use = self._use.get(layer.layer_idx)
        if use is not None:  # per-variant head sets: a head outside a row block's set keeps its probabilities there
            if b % use.shape[0]:
                raise ValueError(f"act: {use.shape[0]} head-set variants do not divide a batch of {b} rows")
            use = use.to(query.device).repeat_interleave(b // use.shape[0], 0)[:, :, None, None]  # (B, h, 1, 1)
        bias = torch.zeros(b, n_heads, query.shape[2], n, device=query.device) if run.recorder is not None else None
        redone = []
        for rows, block_mask in row_blocks(layer, qh, kh, mask):  # pass 2: reweigh each block's rows
            probs, _ = attention_probs(qh[:, :, rows], kh, own_heads(block_mask), scaling, softcap)
            factor = act_reweigh(only_real_queries(layer, probs, rows), sinks, self.beta)
            if use is not None:
                factor = torch.where(use, factor, torch.ones_like(factor))
            redone.append(torch.matmul(probs * factor, vh).to(out.dtype))
            if bias is not None:
                bias[:, heads, rows] = torch.log(factor)
        out[:, heads] = redone[0] if len(redone) == 1 else torch.cat(redone, dim=2)
        if run.recorder is not None:
            run.recorder(dict(layer=layer.layer_idx, query=query, key=key, value=value, mask=mask, scaling=scaling,
                              out=out, bias=bias))
        layer.compact()
        return out
