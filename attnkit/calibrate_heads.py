"""Head searches on a task's calibration split for the reweighting methods: ZeroTuning's gammas and ACT's heads.

Both score every candidate with :func:`attnkit.eval.choice.score_choices` on the ``calib`` split (disjoint from the
``eval`` split the sweeps report) inside one ``attnkit.apply`` block whose method's heads change between forwards.

Objectives (higher is better): ``accuracy`` (supervised, as both papers), with the mean log-probability of the gold
option among the options as a tie-break (1e-3 weight: 64 samples move accuracy in steps of 1.6%), or ``entropy``
(ZeroTuning's unsupervised variant: minus the mean entropy of the option distribution; labels unused).

ZeroTuning (our rule; the official repository lacks its calibration file): 1. probe every (layer, query head)
alone at ``up`` (default 1.5) and at ``down`` (default 0.67), as the paper's head-level analysis does; a head is
up-effective (down-effective) if its probe beats the baseline. 2. Scale all up-effective heads together by each
gamma > 1 of the grid, and all down-effective heads by each gamma < 1; keep the best configuration if it beats
the baseline (else the profile is empty: the unmodified model). ``mode="layer"`` probes whole layers (all heads of
one layer) instead, 1/H of the forwards.

ACT (the official head filter, rule inferred from its code): apply ACT to one head at a time in layers 2 .. L-2
and keep the heads whose probe beats the baseline.

Speed: ``variants`` candidates share each forward (the batch holds that many copies of the calibration rows, each
copy under its own candidate; :func:`attnkit.eval.choice.score_choice_variants`). The objectives are the same up to
float rounding, which batch size can move; 8 on CUDA (a 135M model's forwards of 64 short rows are launch-bound), 1
on the CPU (compute-bound there).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
import torch

import attnkit
from attnkit.eval.choice import score_choice_variants
from attnkit.eval.sample import Sample
from attnkit.session import text_config

OBJECTIVES = ("accuracy", "entropy")


def objective(results: list[dict], labels: list[int], kind: str) -> tuple[float, float]:
    """(objective, accuracy) of score_choices results; see the module docstring."""
    acc = sum(r["correct"] for r in results) / len(results)
    logps, ents = [], []
    for r, y in zip(results, labels):
        logp = torch.log_softmax(torch.tensor(r["scores"], dtype=torch.float64), 0)
        logps.append(float(logp[y]))
        ents.append(float(-(logp.exp() * logp).sum()))
    if kind == "entropy":
        return -sum(ents) / len(ents), acc
    return acc + 1e-3 * sum(logps) / len(logps), acc


class _Scorer:
    """Scores the calibration samples under up to ``variants`` candidates of the open run's method per forward;
    counts candidates for the progress bar."""

    def __init__(self, model, tokenizer, samples: list[Sample], kind: str, bar, variants: int) -> None:
        self.model, self.tok, self.samples, self.kind, self.bar = model, tokenizer, samples, kind, bar
        self.labels = [s.extra["label"] for s in samples]
        self.variants = variants

    def many(self, candidates: list, set_chunk) -> list[tuple[float, float]]:
        """(objective, accuracy) per candidate; ``set_chunk(chunk)`` sets the method for a chunk of them."""
        out = []
        for i in range(0, len(candidates), self.variants):
            chunk = candidates[i : i + self.variants]
            set_chunk(chunk)
            for res in score_choice_variants(self.model, self.tok, self.samples, len(chunk)):
                out.append(objective(res, self.labels, self.kind))
            if self.bar is not None:
                self.bar.update(len(chunk))
        return out


def default_variants(model) -> int:
    return 8 if next(model.parameters()).is_cuda else 1


def _bar(total: int, desc: str, progress: bool):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="candidate")


def _check_variants(model, variants: int | None) -> int:
    if variants is None:
        return default_variants(model)
    if not isinstance(variants, int) or variants < 1:
        raise ValueError(f"variants={variants!r} is invalid; accepted: an integer >= 1 (candidates per forward)")
    return variants


def _check(kind: str, samples: list[Sample]) -> None:
    if kind not in OBJECTIVES:
        raise ValueError(f"objective={kind!r} is invalid; accepted: {', '.join(OBJECTIVES)}")
    if not samples:
        raise ValueError("no calibration samples")


def calibrate_zerotuning(model, tokenizer, samples: list[Sample], kind: str = "accuracy", mode: str = "head",
                         up: float = 1.5, down: float = 0.67,
                         grid: tuple[float, ...] = (0.25, 0.5, 0.67, 0.8, 1.25, 1.5, 2.0, 3.0, 4.0),
                         progress: bool = True, variants: int | None = None) -> dict:
    """Search ZeroTuning's (layer, head, gamma) on calibration ``samples``; returns the profile (a dict).
    ``variants``: candidates per forward (None: 8 on CUDA, 1 on the CPU)."""
    _check(kind, samples)
    variants = _check_variants(model, variants)
    if mode not in ("head", "layer"):
        raise ValueError(f"mode={mode!r} is invalid; accepted: 'head', 'layer'")
    if not (up > 1 > down > 0) or any(g <= 0 or g == 1 for g in grid):
        raise ValueError(f"gammas are invalid (up={up}, down={down}, grid={grid}); accepted: up > 1 > down > 0, "
                         "grid values > 0 and != 1")
    cfg = text_config(model)
    n_layers, n_heads = cfg.num_hidden_layers, cfg.num_attention_heads
    units = [(l, h) for l in range(n_layers) for h in range(n_heads)] if mode == "head" else \
        [(l, None) for l in range(n_layers)]
    method = attnkit.registry.make_method("zerotuning")
    bar = _bar(1 + 2 * len(units) + len(grid), "zerotuning", progress)

    def table(cells: list[tuple[int, int | None]], gamma: float) -> torch.Tensor:
        t = torch.zeros(n_layers, n_heads)
        for l, h in cells:
            t[l, slice(None) if h is None else h] = gamma - 1
        return t

    with torch.no_grad(), attnkit.apply(model, method):
        score = _Scorer(model, tokenizer, samples, kind, bar, variants)

        def set_chunk(chunk: list[tuple[list, float]]) -> None:
            method.set_gains(torch.stack([table(cells, gamma) for cells, gamma in chunk]))

        (base, base_acc), = score.many([([], 1.0)], set_chunk)
        probes = [([unit], gamma) for unit in units for gamma in (up, down)]
        ups, downs = [], []
        for (cells, gamma), (value, _) in zip(probes, score.many(probes, set_chunk)):
            if value > base:
                (ups if gamma > 1 else downs).append((value - base, cells[0]))
        combos = [([u for _, u in (ups if gamma > 1 else downs)], gamma) for gamma in grid]
        tried = [c for c in combos if c[0]]
        if bar is not None:
            bar.update(len(combos) - len(tried))
        best = (base, base_acc, [], 1.0)
        for (cells, gamma), (value, acc) in zip(tried, score.many(tried, set_chunk)):
            if value > best[0]:  # grid order: the first of equal objectives wins
                best = (value, acc, cells, gamma)
        method.set_gains(torch.zeros(n_layers, n_heads))
    if bar is not None:
        bar.close()
    value, acc, cells, gamma = best
    expanded = [(l, h2) for l, h in cells for h2 in ([h] if h is not None else range(n_heads))]
    return {"method": "zerotuning", "num_layers": n_layers, "num_heads": n_heads, "objective": kind, "mode": mode,
            "gammas": [[l, h, gamma] for l, h in expanded], "calib_objective": value, "calib_accuracy": acc,
            "baseline_objective": base, "baseline_accuracy": base_acc, "samples": len(samples),
            "up_effective": [list(u) for _, u in sorted(ups, reverse=True)],
            "down_effective": [list(u) for _, u in sorted(downs, reverse=True)], "probe": [up, down],
            "grid": list(grid), "variants": variants}


def calibrate_act(model, tokenizer, samples: list[Sample], kind: str = "accuracy", beta: float = 0.4,
                  tau: float = 0.1, progress: bool = True, variants: int | None = None) -> dict:
    """ACT's head filter on calibration ``samples``: heads of layers 2 .. L-2 whose probe beats the baseline.
    ``variants``: candidates per forward (None: 8 on CUDA, 1 on the CPU)."""
    _check(kind, samples)
    variants = _check_variants(model, variants)
    cfg = text_config(model)
    n_layers, n_heads = cfg.num_hidden_layers, cfg.num_attention_heads
    units = [(l, h) for l in range(2, n_layers - 1) for h in range(n_heads)]
    method = attnkit.registry.make_method("act", beta=beta, tau=tau)
    bar = _bar(2 + len(units), "act", progress)
    with torch.no_grad(), attnkit.apply(model, method):
        score = _Scorer(model, tokenizer, samples, kind, bar, variants)
        (base, base_acc), = score.many([[]], method.set_head_variants)
        probes = [[unit] for unit in units]
        values = score.many(probes, method.set_head_variants)
        kept = [(value - base, heads[0]) for heads, (value, _) in zip(probes, values) if value > base]
        heads = [u for _, u in sorted(kept, reverse=True)]
        (value, acc), = score.many([heads], method.set_head_variants) if heads else [(base, base_acc)]
        method.set_heads(heads)
    if bar is not None:
        bar.close()
    return {"method": "act", "num_layers": n_layers, "num_heads": n_heads, "objective": kind, "beta": beta,
            "tau": tau, "heads": [list(u) for u in heads], "calib_objective": value, "calib_accuracy": acc,
            "baseline_objective": base, "baseline_accuracy": base_acc, "samples": len(samples),
            "variants": variants}


def write_json(profile: dict, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile, indent=1) + "\n")
    return path


def wilson(correct: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (lo, hi)."""
    if n == 0:
        return (math.nan, math.nan)
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half

