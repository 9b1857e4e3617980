"""Which layers and heads lose the needle: selection recall of the query-aware methods, per layer, on a real model.

At the first answer token of RULER NIAH samples (dense prefill, dense decode, recorded per layer), for every
global layer and query head: the attention mass on the needle's value tokens under dense attention, and
whether each selection rule would have kept those tokens at a budget of k tokens:
  - ``own``: the head's own top-k of q.k at this layer (the best any per-head token selection can do:
    FASA's and TidalDecode's selection layers aim at it);
  - ``tidal``: TidalDecode's reuse: the top-k chosen at the layer's selection layer (the first sparse layer, or
    the re-selection layer for the layers after it), same query head;
  - ``quest``: Quest's top pages per KV head by its page upper bound (group-summed), page size ``--page``.
Recall = fraction of the needle's value tokens kept. Reported per layer for the head that puts the most
attention on the needle (the retrieval head), and the mean over heads weighted by needle mass. Then, for each
candidate TidalDecode re-selection layer r (selection at the first ``--tidal-layers`` entry, re-selection at r):
the share of all the needle's attention mass, over layers past the first selection layer, that falls on tokens
the layer would still read (the selection layers themselves read densely).

Example: python benchmarks/selection_recall.py --length 4096 --task niah_single_2 --samples 10 --budget 1024
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import attnkit
from attnkit.eval.runner import get_model
from attnkit.eval.sample import build_prompt
from attnkit.eval.tasks import get_task
from attnkit.kernels.torch_ref import page_summaries, quest_scores


class _Ids:
    eos_token_id = None

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return ""


def needle_positions(tokenizer, ids: list[int], reference: str) -> list[int]:
    """Token positions of every occurrence of ``reference`` (the needle's value: the question names only its key)
    in the prompt, by character offsets; [] when the ids do not round-trip through the text."""
    text = tokenizer.decode(ids)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if enc["input_ids"] != ids:
        return []
    out, start = [], text.find(reference)
    while start >= 0:
        end = start + len(reference)
        out += [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start]
        start = text.find(reference, end)
    return sorted(set(out))


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(..., n) bool: the k largest per row."""
    k = min(k, scores.shape[-1])
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(k, dim=-1).indices, True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="niah_single_2")
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--page", type=int, default=16)
    ap.add_argument("--tidal-layers", default="2,13", help="TidalDecode's selection layers (its defaults)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=Path("results/selection_recall.json"))
    args = ap.parse_args()

    model, tok = get_model(args.model, args.device, None)
    task = get_task(args.task)
    samples = task.samples(tok, args.length, args.samples, 42)
    n_layers = model.config.num_hidden_layers
    select_at = sorted(int(x) for x in args.tidal_layers.split(","))
    per_layer = {i: {"mass": [], "own": [], "tidal": [], "quest": [], "own_w": [], "tidal_w": [], "quest_w": []}
                 for i in range(n_layers)}
    used = 0
    reselect: dict[int, list[float]] = {}
    for sample in samples:
        ids = build_prompt(tok, sample, True)
        needle = needle_positions(tok, ids, sample.references[0])
        if not needle:
            continue
        used += 1
        steps: dict[int, dict] = {}

        def record(r: dict) -> None:
            if r["query"].shape[2] == 1 and r["layer"] not in steps:
                steps[r["layer"]] = {"q": r["query"][0, :, 0].float(), "k": r["key"][0].float(), "s": r["scaling"]}

        with attnkit.apply(model, "full") as run:
            run.recorder = record
            attnkit.generate(model, _Ids(), ids, max_new_tokens=2, stop_at_eos=False)
        own_sel: dict[int, torch.Tensor] = {}
        masses: dict[int, torch.Tensor] = {}  # layer -> (H, len(needle)) attention on each needle token
        for layer in range(n_layers):
            q, k, scale = steps[layer]["q"], steps[layer]["k"], steps[layer]["s"]  # (H, D), (Hkv, n, D)
            h, hkv = q.shape[0], k.shape[0]
            kk = k.repeat_interleave(h // hkv, dim=0)  # (H, n, D)
            logits = torch.einsum("hd,hnd->hn", q, kk) * scale
            probs = logits.softmax(-1)
            mass = probs[:, needle].sum(-1)  # (H,)
            masses[layer] = probs[:, needle]
            own = topk_mask(logits[:, :-1], args.budget)  # the current token is always read
            own_sel[layer] = own
            governing = max([s for s in select_at if s <= layer], default=None)
            tidal = own_sel[governing] if governing is not None and governing < layer else own
            pos = torch.arange(k.shape[1]).expand(1, hkv, -1)
            summary = page_summaries(k.unsqueeze(0), pos, args.page)
            pscore = quest_scores(q.view(1, h, 1, -1), summary)[0]  # (Hkv, P)
            pages = topk_mask(pscore, max(1, args.budget // args.page))  # (Hkv, P)
            quest = pages.repeat_interleave(args.page, dim=-1)[:, : k.shape[1]].repeat_interleave(h // hkv, dim=0)
            rec = {name: sel[:, needle].float().mean(-1) for name, sel in (("own", own), ("tidal", tidal),
                                                                           ("quest", quest))}
            top = int(mass.argmax())
            w = mass / mass.sum().clamp_min(1e-12)
            d = per_layer[layer]
            d["mass"].append(float(mass.max()))
            for name, r in rec.items():
                d[name].append(float(r[top]))
                d[name + "_w"].append(float((r * w).sum()))
        first = select_at[0]
        for r in range(first + 1, n_layers):
            kept = total = 0.0
            for layer in range(first + 1, n_layers):
                if layer == r:
                    kept += float(masses[layer].sum())
                else:
                    sel = own_sel[first if layer < r else r]
                    kept += float((masses[layer] * sel[:, needle]).sum())
                total += float(masses[layer].sum())
            reselect.setdefault(r, []).append(kept / max(total, 1e-12))
    rows = []
    for layer, d in per_layer.items():
        if not d["mass"]:
            continue
        mean = {name: sum(v) / len(v) for name, v in d.items()}
        rows.append({"layer": layer, **{k: round(v, 3) for k, v in mean.items()}})
    result = {"model": args.model, "task": args.task, "length": args.length, "samples_used": used,
              "budget": args.budget, "page": args.page, "tidal_layers": select_at, "layers": rows,
              "reselect_kept_mass": {r: round(sum(v) / len(v), 3) for r, v in reselect.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"{args.model} {args.task} {args.length} tokens, budget {args.budget}, {used} samples with the needle found")
    print("| layer | needle mass (top head) | own top-k (top head) | tidal reuse (top head) | quest pages (top head) "
          "| own (mass-weighted) | tidal (mass-weighted) | quest (mass-weighted) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['layer']} | {r['mass']:.2f} | {r['own']:.2f} | {r['tidal']:.2f} | {r['quest']:.2f} | "
              f"{r['own_w']:.2f} | {r['tidal_w']:.2f} | {r['quest_w']:.2f} |")
    kept = result["reselect_kept_mass"]
    best = max(kept, key=kept.get)
    print(f"needle attention mass still read, by TidalDecode re-selection layer (selection at {select_at[0]}): "
          + ", ".join(f"{r}: {v:.2f}" for r, v in kept.items()) + f"; best {best}")


if __name__ == "__main__":
    main()
