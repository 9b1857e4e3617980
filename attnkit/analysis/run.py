"""``analyze``: every analysis of one model (optionally under a method) into ``analysis.json`` + ``analysis.html``.

``analysis.json`` holds every figure's data (plain JSON: lists of floats, no tensors); the HTML page is drawn
from it alone (:mod:`attnkit.analysis.page`), so two saved analyses can be compared later without the models.
"""

from __future__ import annotations

import datetime as _dt
import json
import time
from pathlib import Path

import torch

import attnkit
from attnkit.analysis import capture
from attnkit.analysis.activations import residual_analysis
from attnkit.analysis.heads import head_scores, top_heads
from attnkit.analysis.inputs import essay_windows
from attnkit.analysis.maps import attention_maps, check_indices
from attnkit.analysis.sinks import sink_metric
from attnkit.analysis.streaming import streaming_heads
from attnkit.session import layer_types, text_config

FORMAT = "attnkit-analysis"


def model_summary(model: torch.nn.Module) -> dict:
    cfg = text_config(model)
    return {"architecture": type(model).__name__, "layers": cfg.num_hidden_layers,
            "heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
            "head_dim": getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
            "hidden_size": cfg.hidden_size, "context": getattr(cfg, "max_position_embeddings", None),
            "layer_types": layer_types(cfg), "sliding_window": getattr(cfg, "sliding_window", None),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "device": str(next(model.parameters()).device)}


def default_map_layers(n_layers: int) -> list[int]:
    return sorted({0, n_layers // 2, n_layers - 1})


def compute(model, tokenizer, name: str, *, method: str = "full", settings: dict | None = None,
            samples: int = 100, tokens: int = 64, eps: float = 0.3, heads_length: int = 2500, repeats: int = 4,
            layers: list[int] | None = None, seed: int = 0, residual_samples: int = 4, residual_tokens: int = 256,
            streaming_tokens: int = 512, map_tokens: int = 48, progress: bool = True) -> dict:
    """Run every analysis and return the ``analysis.json`` dict (see :func:`analyze`)."""
    settings = dict(settings or {})
    attnkit.make_method(method, **settings)  # a bad name or value fails before any forward
    cfg = text_config(model)
    # checked here, not only in the last stage: a bad index failed after minutes of the other stages
    n_layers = cfg.num_hidden_layers
    layers = default_map_layers(n_layers) if layers is None else check_indices("layers", layers, n_layers)
    stages = ["sink metric", "massive activations + cosine", "head scores", "streaming heads", "attention maps"]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(stages), desc=f"analyze {name}", unit="stage")
    timings: dict[str, float] = {}
    out: dict = {"format": FORMAT, "version": 1, "model": name, "method": method, "settings": settings,
                 "config": model_summary(model),
                 "options": {"samples": samples, "tokens": tokens, "eps": eps, "heads_length": heads_length,
                             "repeats": repeats, "layers": layers, "seed": seed, "residual_samples": residual_samples,
                             "residual_tokens": residual_tokens, "streaming_tokens": streaming_tokens,
                             "map_tokens": map_tokens},
                 "attnkit_version": attnkit.__version__,
                 "generated": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    with capture.use_method(method, settings):
        def stage(label: str, fn):
            if bar is not None:
                bar.set_postfix_str(label)
            t0 = time.perf_counter()
            result = fn()
            timings[label] = round(time.perf_counter() - t0, 2)
            if bar is not None:
                bar.update(1)
            return result

        sinks = stage(stages[0], lambda: sink_metric(model, tokenizer, samples, tokens, eps, seed=seed,
                                                     progress=progress))
        massive, cosine = stage(stages[1], lambda: residual_analysis(model, tokenizer, residual_samples,
                                                                     residual_tokens, seed=seed))
        scores = stage(stages[2], lambda: head_scores(model, heads_length, repeats, seed, progress,
                                                      tokenizer=tokenizer))
        stream = stage(stages[3], lambda: streaming_heads(model, tokenizer, residual_samples, streaming_tokens,
                                                          seed=seed))
        map_ids = essay_windows(tokenizer, 1, map_tokens, seed + 3)[0]
        maps = stage(stages[4], lambda: attention_maps(model, tokenizer, map_ids, layers,
                                                       list(range(min(4, cfg.num_attention_heads)))))
    if bar is not None:
        bar.close()
    retrieval = scores.retrieval_heads()
    out.update(
        sinks=sinks.to_dict(), massive=massive.to_dict(), cosine=cosine.to_dict(),
        heads={**scores.to_dict(), "retrieval_heads": [list(p) for p in retrieval],
               "top_induction": top_heads(scores.induction, 10), "top_echo": top_heads(scores.echo, 10)},
        streaming=stream.to_dict(scores), maps=maps.to_dict(), timings=timings)
    return out


def write(data: dict | list[dict], out_dir: str | Path, labels: list[str] | None = None) -> tuple[Path, Path]:
    """Write ``analysis.json`` and ``analysis.html`` for one analysis dict, or two side by side."""
    from attnkit.analysis.page import render

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = data if isinstance(data, list) else [data]
    labels = labels or [run_label(r) for r in runs]
    doc = runs[0] if len(runs) == 1 else {"format": FORMAT + "-compare", "version": 1, "labels": labels,
                                          "runs": runs}
    json_path, html_path = out_dir / "analysis.json", out_dir / "analysis.html"
    json_path.write_text(json.dumps(doc) + "\n", encoding="utf-8")
    html_path.write_text(render(runs, labels), encoding="utf-8")
    return json_path, html_path


def run_label(data: dict) -> str:
    if data["method"] == "full":
        return data["model"]
    settings = ",".join(f"{k}={v}" for k, v in data["settings"].items())
    return f"{data['model']} · {data['method']}" + (f"[{settings}]" if settings else "")


def analyze(model, tokenizer, out_dir: str | Path, name: str, **options) -> dict:
    """Every analysis of ``model`` into ``out_dir/analysis.json`` and ``out_dir/analysis.html``; returns the data.

    Options (all keyword): method / settings (an attnkit method active during every forward: what the method lets
    each query see is what is measured), samples / tokens / eps (sink metric: 100 x 64, 0.3), heads_length /
    repeats (RazorAttention head scores: 2500 x 4, capped to the context), layers (attention-map layers), seed,
    residual_samples / residual_tokens (massive activations and cosine: 4 x 256), streaming_tokens (512),
    map_tokens (48), progress.
    """
    data = compute(model, tokenizer, name, **options)
    write(data, out_dir)
    return data


def analyze_compare(left: dict, right: dict, out_dir: str | Path, labels: list[str] | None = None) -> tuple[Path, Path]:
    """Two analyses (two models, or one model with and without a method) on one page: both panels per figure
    and their differences. ``left`` / ``right`` are :func:`analyze` results (or loaded ``analysis.json``)."""
    if labels is None:
        labels = [run_label(left), run_label(right)]
        if labels[0] == labels[1]:
            labels = [f"{labels[0]} (left)", f"{labels[1]} (right)"]
    return write([left, right], out_dir, labels)


def load(path: str | Path) -> dict:
    """A saved ``analysis.json`` (single analysis)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a single attnkit analysis (format {data.get('format')!r})")
    return data


def random_weights_like(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """A model of the same config with freshly initialised random weights (transformers' own init), same device
    and dtype: the control that shows what an untrained network's attention looks like."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    param = next(model.parameters())
    fresh = AutoModelForCausalLM.from_config(model.config, dtype=param.dtype)
    return fresh.to(param.device).eval()
