"""Calibration runs that methods load as stored profiles (JSON): FASA's frequency-chunk agreement."""

from __future__ import annotations

import json
from pathlib import Path

import torch

import attnkit
from attnkit.methods.read.fasa import PAIRINGS, chunk_scores
from attnkit.session import text_config

DEFAULT_BUDGETS = (128, 256, 512, 1024, 2048, 4096)


class _Ids:
    """Token-id prompts in, no EOS: every calibration sample decodes the same number of steps."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return ""


def _decode_recorded(model, prompts: list[torch.Tensor], new_tokens: int, record, desc: str | None) -> None:
    """Decode each prompt greedily with dense attention for ``new_tokens`` steps, ``record`` receiving every layer
    call; a progress bar titled ``desc`` (None: no bar)."""
    bar = None
    if desc is not None:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(prompts), unit="prompt", desc=desc)
    with attnkit.apply(model, "full") as run:
        run.recorder = record
        for ids in prompts:
            attnkit.generate(model, _Ids(), ids, max_new_tokens=new_tokens + 1, stop_at_eos=False)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()


@torch.inference_mode()
def calibrate_fasa(
    model: torch.nn.Module,
    prompts: list[torch.Tensor],
    budgets: tuple[int, ...] = DEFAULT_BUDGETS,
    new_tokens: int = 32,
    pairing: str = "rope",
    progress: bool = False,
) -> dict:
    """FASA's contextual agreement per (budget, layer, query head, frequency chunk).

    Each prompt (a (1, L) id tensor) is decoded greedily for ``new_tokens`` steps with dense attention; at every
    decode step, for each global layer, query head and chunk f: |TopK(q.K) & TopK(q_f.K_f)| / K for each budget
    K no larger than the cache, averaged over steps and prompts. Returns the profile dict ``FASA(profile=...)``
    loads (budgets larger than every cache seen are dropped).
    """
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing={pairing!r} is invalid; accepted: {', '.join(map(repr, PAIRINGS))}")
    cfg = text_config(model)
    types = getattr(cfg, "layer_types", None) or [None] * cfg.num_hidden_layers
    layers = [i for i, t in enumerate(types) if t != "sliding_attention"]
    sums: dict[tuple[int, int], torch.Tensor] = {}
    counts: dict[int, int] = {}

    def record(r: dict) -> None:
        if r["query"].shape[2] != 1 or r["layer"] not in layers:
            return
        q = r["query"][0, :, 0]  # (H, D)
        k = r["key"][0].repeat_interleave(q.shape[0] // r["key"].shape[1], dim=0)  # (H, n, D)
        full = (q.float().unsqueeze(1) * k.float()).sum(-1)  # (H, n)
        per = chunk_scores(q.unsqueeze(0), k.unsqueeze(0), pairing)[0]  # (H, D/2, n)
        n = full.shape[-1]
        for kk in budgets:
            if kk > n:
                continue
            top = torch.zeros_like(full, dtype=torch.bool).scatter_(1, full.topk(kk, dim=-1).indices, True)
            picks = per.topk(kk, dim=-1).indices  # (H, D/2, K)
            agree = top.unsqueeze(1).expand(-1, per.shape[1], -1).gather(2, picks).float().mean(-1)  # (H, D/2)
            key = (kk, r["layer"])
            sums[key] = sums.get(key, 0) + agree.cpu()
            if r["layer"] == layers[0]:
                counts[kk] = counts.get(kk, 0) + 1

    _decode_recorded(model, prompts, new_tokens, record, "calibrate fasa" if progress else None)
    kept = [kk for kk in budgets if counts.get(kk)]
    if not kept:
        raise ValueError(f"no calibration budget fits the caches seen; accepted: budgets <= the prompt length "
                         f"(budgets {list(budgets)})")
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return {
        "method": "fasa",
        "attnkit_version": attnkit.__version__,
        "head_dim": d,
        "pairing": pairing,
        "budgets": kept,
        "layers": layers,
        "steps": [counts[kk] for kk in kept],
        "agreement": [[(sums[(kk, layer)] / counts[kk]).tolist() for layer in layers] for kk in kept],
    }


@torch.inference_mode()
def calibrate_tidaldecode(
    model: torch.nn.Module,
    prompts: list[torch.Tensor],
    budgets: tuple[int, ...] = (256, 1024),
    new_tokens: int = 32,
    dense_layers: int = 2,
    progress: bool = False,
    sinks: int = 4,
    local: int = 64,
) -> dict:
    """TidalDecode's re-selection layer for this model, from how much attention each choice keeps readable.

    Each prompt is decoded greedily with dense attention; at every decode step, for each global layer l and
    query head, the softmax attention over the cache and its own top-K past tokens (plus the current one). For a
    re-selection layer r (the selection layer is the first global layer at or above ``dense_layers``, as in
    :class:`~attnkit.methods.read.tidaldecode.TidalDecode`), the layers between them read the selection layer's
    tokens, the layers after r read r's, and the two selection layers read densely; the score of r is the share
    of the attention mass of the layers after the selection layer that falls on tokens they read, counting only
    the middle of the context (not the first ``sinks`` nor the last ``local`` tokens: every selection keeps those,
    and on plain text they hold most of the mass, which would hide the heads that retrieve), averaged over steps
    and prompts. The profile holds the score of every candidate per budget and the best layer
    (``best_reselect``), to pass as ``reselect_layer``. Calibration text is generic (essays), not a benchmark.
    """
    cfg = text_config(model)
    types = getattr(cfg, "layer_types", None) or [None] * cfg.num_hidden_layers
    layers = [i for i, t in enumerate(types) if t != "sliding_attention"]
    start = next((i for i, layer in enumerate(layers) if layer >= dense_layers), None)
    if start is None or start + 2 > len(layers):
        raise ValueError(f"dense_layers={dense_layers} leaves fewer than 2 global layers to select in; accepted: "
                         f"dense_layers <= {layers[-2] if len(layers) > 1 else 0}")
    sums = {kk: torch.zeros(len(layers)) for kk in budgets}
    counts = {kk: 0 for kk in budgets}
    step: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def finish_step() -> None:
        probs = torch.stack([step[layer][0] for layer in layers])  # (L, H, n)
        logits = torch.stack([step[layer][1] for layer in layers])
        n = probs.shape[-1]
        if n <= sinks + local:
            step.clear()
            return
        probs = probs.clone()
        probs[..., :sinks] = 0.0  # only the middle of the context counts (see the docstring)
        probs[..., n - local :] = 0.0
        for kk in budgets:
            if kk >= n:
                continue
            sel = torch.zeros_like(probs).scatter_(-1, logits[..., :-1].topk(kk, dim=-1).indices, 1.0)
            sel[..., -1] = 1.0  # the current token is always read
            on = torch.einsum("shn,lhn->sl", sel, probs)  # mass layer l puts on layer s's selection
            total = probs.sum((1, 2))  # (L,)
            for r in range(start + 1, len(layers)):
                read = on[start, start + 1 : r].sum() + total[r] + on[r, r + 1 :].sum()
                sums[kk][r] += float(read / total[start + 1 :].sum())
            counts[kk] += 1
        step.clear()

    def record(r: dict) -> None:
        if r["query"].shape[2] != 1 or r["layer"] not in layers:
            return
        q = r["query"][0, :, 0].float()  # (H, D)
        k = r["key"][0].float().repeat_interleave(q.shape[0] // r["key"].shape[1], dim=0)  # (H, n, D)
        logits = torch.einsum("hd,hnd->hn", q, k) * r["scaling"]
        step[r["layer"]] = (logits.softmax(-1).cpu(), logits.cpu())
        if r["layer"] == layers[-1]:
            finish_step()

    _decode_recorded(model, prompts, new_tokens, record, "calibrate tidaldecode" if progress else None)
    kept = [kk for kk in budgets if counts[kk]]
    if not kept:
        raise ValueError(f"no calibration budget fits the caches seen; accepted: budgets < the prompt length, and "
                         f"prompts longer than sinks + local = {sinks + local} tokens (budgets {list(budgets)})")
    scores = {kk: (sums[kk] / counts[kk]).tolist() for kk in kept}
    candidates = layers[start + 1 :]
    return {
        "method": "tidaldecode",
        "attnkit_version": attnkit.__version__,
        "dense_layers": dense_layers,
        "selection_layer": layers[start],
        "budgets": kept,
        "candidates": candidates,
        "kept_mass": [[round(scores[kk][i], 4) for i in range(start + 1, len(layers))] for kk in kept],
        "best_reselect": [candidates[max(range(len(candidates)), key=lambda i: scores[kk][start + 1 + i])]
                          for kk in kept],
    }


def write_profile(profile: dict, path: str | Path) -> Path:
    """Write a profile as JSON (never pickled), creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile))
    return path


def calibrate_token_sparse(model, prompts: list[torch.Tensor], progress: bool = False) -> dict:
    """Token Sparse Attention's offline layer choice: the representation drift of every decoder layer,
    R_l = mean over tokens of ||h_out - h_in|| / (||h_in|| + 1e-8), averaged over the prompts (1, L) (dense
    forwards, no method active). The method sparsifies the layers at or below the drift's ``delta`` quantile."""
    from tqdm.auto import tqdm

    from attnkit.analysis.residual import decoder_layers

    layers = decoder_layers(model)
    sums = [0.0] * len(layers)
    hooks = []

    def hook(i):
        def after(module, args, kwargs, out):
            h_in = (args[0] if args else kwargs["hidden_states"]).float()
            h_out = (out[0] if isinstance(out, tuple) else out).float()
            sums[i] += ((h_out - h_in).norm(dim=-1) / (h_in.norm(dim=-1) + 1e-8)).mean().item()
        return after

    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_hook(hook(i), with_kwargs=True))
    try:
        bar = tqdm(prompts, desc="token_sparse drift", disable=not progress, unit="prompt")
        with torch.no_grad():
            for ids in bar:
                model(input_ids=ids)
    finally:
        for hk in hooks:
            hk.remove()
    drift = [s / len(prompts) for s in sums]
    return {"method": "token_sparse", "num_layers": len(layers), "drift": drift,
            "sparse_at_delta_0.5": [i for i, r in enumerate(drift) if r <= float(torch.tensor(drift).quantile(0.5))]}


def calibrate_tca(model, prompts: list[torch.Tensor], tau: float = 0.9, block: int = 128, configs: int = 14,
                  window: int = 512, alpha: float = 0.5, progress: bool = False) -> dict:
    """TCA-Attention's offline budgets: one dense forward per prompt (1, L); per global layer and KV head, the
    cheapest configuration (:func:`attnkit.methods.stored.tca.config_table`) whose chosen tokens plus the local
    ``window`` hold at least ``tau`` of the last query's attention, the most demanding prompt deciding."""
    from tqdm.auto import tqdm

    from attnkit.methods.stored.tca import block_counts, config_table, select_tokens
    from attnkit.reference import attention_probs

    table = config_table(block, configs)
    need: dict[int, torch.Tensor] = {}
    for ids in tqdm(prompts, desc="tca budgets", disable=not progress, unit="prompt"):
        records = []
        with torch.no_grad(), attnkit.apply(model, "full") as run:
            run.recorder = lambda r: records.append((r["layer"], r["query"][:, :, -1:], r["key"]))
            model(input_ids=ids)
        for layer, q, k in records:
            if run.layer_types[layer] == "sliding_attention":
                continue
            probs, _ = attention_probs(q, k, None, q.shape[-1] ** -0.5)  # (1, H, 1, n): the last query
            hkv, n = k.shape[1], k.shape[2]
            s = probs.view(1, hkv, -1, n).mean(2)  # (1, Hkv, n)
            pos = torch.arange(n, device=k.device)
            old = (pos <= n - 1 - window).expand(1, hkv, n)
            kb = (pos // block).expand(1, hkv, n)
            ks = torch.tensor(block_counts(block), device=k.device)
            best = torch.full((hkv,), configs - 1, dtype=torch.long)
            for c in range(configs - 1, -1, -1):  # cheapest passing configuration wins
                p = table[c].to(k.device).expand(1, hkv, -1)
                chosen = select_tokens(s, kb, old, p, ks, alpha, int(kb.max()) + 1) | ~old
                ok = ((s * chosen).sum(-1)[0] >= tau * s.sum(-1)[0]).cpu()
                best = torch.where(ok, c, best)
            need[layer] = best if layer not in need else torch.maximum(need[layer], best)
    return {"method": "tca", "block": block, "configs": configs, "window": window, "tau": tau, "alpha": alpha,
            "layers": {str(i): v.tolist() for i, v in sorted(need.items())},
            "expected_tokens_per_block": [round(float((table[c] * torch.tensor(block_counts(block))).sum()), 2)
                                          for c in range(configs)]}
