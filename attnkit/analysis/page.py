"""``analysis.html``: the analysis figures as a self-contained page, in the evaluation report's look.

Same building blocks as ``attnkit report`` (:mod:`attnkit.eval.report_html`): inline SVG plots, inline styles and
the inline render check that sets ``<body data-rendered="N/M" data-errors="...">`` for a headless browser test.
"""

from __future__ import annotations

from attnkit.analysis import plots
from attnkit.eval.report_html import CHECK_JS, CSS, EARLY_JS, Doc, esc

SECTIONS = [("summary", "Summary"), ("sinks", "Attention sinks"), ("massive", "Massive activations"),
            ("cosine", "Cosine to first token"), ("heads", "Echo / induction heads"),
            ("streaming", "Streaming heads"), ("maps", "Attention maps")]


def _fmt_heads(pairs, n: int = 8) -> str:
    shown = ", ".join(f"L{l}·kv{h}" for l, h in pairs[:n])
    return (shown + (f" … ({len(pairs)} in all)" if len(pairs) > n else "")) or "none"


def summary_rows(d: dict) -> list[tuple[str, str]]:
    """Headline numbers of one analysis, as (what, value) rows."""
    s, m, h = d["sinks"], d["massive"], d["heads"]
    first = "BOS" if s["first_is_bos"] else "first token (no BOS: an essay token)"
    feats = ", ".join(f"{f} ({c} layers)" for f, c in list(m["feature_indices"].items())[:6]) or "none"
    top_ind = ", ".join(f"L{l}h{hh} {v:.3f}" for l, hh, v in h["top_induction"][:5])
    top_echo = ", ".join(f"L{l}h{hh} {v:.3f}" for l, hh, v in h["top_echo"][:3])
    return [
        (f"Sink_0^{s['eps']:g} ({first})", f"{s['sink_pct']['0']:.1f}% of {s['samples']} samples × layers × heads"),
        ("Sink_k for k = " + ", ".join(s["sink_pct"]), ", ".join(f"{v:.1f}%" for v in s["sink_pct"].values())),
        ("layers with massive activations", ", ".join(map(str, m["massive_layers"])) or "none"),
        ("their feature indices", feats),
        ("largest |activation|", f"{max(x['max'] for x in m['layers']):.1f}"),
        ("head scores input", f"{h['meta'].get('tokens')} tokens = start + {h['length']} × {h['repeats']}"),
        ("top induction heads", top_ind), ("top echo heads", top_echo),
        ("retrieval heads (14% induction ∪ 1% echo)", _fmt_heads(h["retrieval_heads"])),
        ("streaming candidates (KV heads)", _fmt_heads(d["streaming"]["candidates"])),
    ]


def _meta(runs: list[dict], labels: list[str]) -> list[tuple[str, str]]:
    out = []
    for label, d in zip(labels, runs):
        c, o = d["config"], d["options"]
        out.append((label, f"{c['architecture']}, {c['layers']} layers × {c['heads']} heads "
                           f"({c['num_key_value_heads']} KV), context {c['context']}, {c['dtype']} on {c['device']}"))
        out.append((f"{label}: inputs", f"sinks {o['samples']} × {o['tokens']} tokens, residual "
                                        f"{o['residual_samples']} × {o['residual_tokens']}, streaming "
                                        f"{o['residual_samples']} × {o['streaming_tokens']}, seed {o['seed']}"))
        out.append((f"{label}: time", ", ".join(f"{k} {v:.0f} s" for k, v in d["timings"].items())))
    out.append(("generated", runs[-1]["generated"]))
    return out


def render(runs: list[dict], labels: list[str]) -> str:
    """The whole page for one analysis or two side by side (with their differences)."""
    panels = list(zip(labels, runs))
    doc = Doc()
    doc.heading(2, "Summary", "summary")
    header = ["quantity"] + labels
    rows = [summary_rows(d) for d in runs]
    doc.table(header, [[rows[0][i][0]] + [r[i][1] for r in rows] for i in range(len(rows[0]))])

    doc.heading(2, "Attention sinks", "sinks")
    doc.para("α_k = Σ_{i≥k} A[i,k] / (T−k): the mean attention key k receives from the queries that can see it, "
             "per (sample, layer, query head), on T-token essay windows; Sink_k^ε = % of (sample, layer, head) "
             "with α_k > ε (Gu et al., ICLR 2025). Index 0 is the first token (the paper's k = 1).")
    doc.figure("sink-heatmap", plots.sink_heatmap(panels), "α₀ per layer and query head, mean over samples.")
    doc.figure("sink-bars", plots.sink_bars(panels), "Sink_k^ε per key index and Sink_0^ε per layer.")

    doc.heading(2, "Massive activations", "massive")
    doc.para("Per decoder layer output: the largest and the median |activation| over every token and feature; "
             "circles mark layers with massive activations (|a| > 100 and ≥ 1000 × median, Sun et al. 2024), "
             "coloured by what contributes most of the flagged entries: carried in the residual, attention or MLP.")
    doc.figure("massive", plots.massive_figure(panels), "Max and median |activation| per layer (log scale).")
    for label, d in panels:
        body = [[s, e["token"], e["text"].replace("\n", "\\n"), e["feature"], f"{e['value']:.1f}",
                 f"{e['carried']:.1f}", f"{e['attention']:.1f}", f"{e['mlp']:.1f}", e["source"]]
                for s, layer in enumerate(d["massive"]["layers"]) for e in layer["entries"][:4]]
        if body:
            doc.table(["layer", "token", "text", "feature", "value", "carried", "attention", "MLP", "source"], body,
                      f"{label}: largest flagged entries (up to 4 per layer)", collapsed=True)
        else:
            doc.para(f"{label}: no massive activations.", "empty")

    doc.heading(2, "Cosine to first token", "cosine")
    doc.para("cos(h_l[0], h_l[t]) per layer (row 0: embeddings), mean over samples. Tokens with a high similarity "
             "to the first token are candidate intermediate sinks (AVSR sink diagnostics).")
    doc.figure("cosine", plots.cosine_figure(panels), "Cosine similarity of each token's hidden state to token 0's.")
    for label, d in panels:
        c = d["cosine"]
        body = [[layer, f"{100 * frac:.2f}%", ", ".join(f"{e['text']!r}@{e['token']} {e['cos']:.2f}" for e in hi[:4])]
                for layer, (frac, hi) in enumerate(zip(c["fraction"], c["high"])) if hi]
        if body:
            doc.table(["layer", f"tokens with cos > {c['threshold']:g}", "highest (text@index cos)"], body,
                      f"{label}: high-similarity tokens", collapsed=True)

    doc.heading(2, "Echo / induction heads", "heads")
    doc.para("RazorAttention's scores on a start token + L random tokens repeated R times: echo = attention to "
             "the same token in earlier repeats, induction = to the token that followed it, mean over the queries "
             "of repeats ≥ 1. Hatched rows are sliding-window layers (they cannot see an earlier repeat beyond "
             "their window and are never retrieval heads).")
    doc.figure("heads", plots.head_score_figure(panels), "Echo and induction score per layer and query head.")
    for label, d in panels:
        h = d["heads"]
        body = [[l, hh, f"{v:.4f}", f"{h['echo'][l][hh]:.4f}"] for l, hh, v in h["top_induction"]]
        doc.table(["layer", "query head", "induction", "echo"], body, f"{label}: top induction heads")

    doc.heading(2, "Streaming heads", "streaming")
    s0 = runs[0]["streaming"]
    doc.para(f"Attention mass on the first {s0['sinks']} tokens plus the {s0['recent']} most recent keys, per query "
             f"head, on {s0['tokens']}-token essay windows. Red boxes: streaming candidates (every query head of "
             f"the KV group ≥ {s0['mass_min']:g} and not a retrieval head).")
    doc.figure("streaming", plots.streaming_figure(panels), "Streaming mass per layer and query head.")

    doc.heading(2, "Attention maps", "maps")
    doc.para("Float32 attention probabilities of a few layers and heads on one short essay window.")
    for i, (label, d) in enumerate(panels):
        doc.figure(f"maps-{i}", plots.maps_figure(label, d["maps"]), f"{label}: attention maps.")
    if len(runs) == 2:
        doc.para("Comparison: each figure shows the left and right analysis side by side and, where both have the "
                 "same shape, their difference (right − left).")
    return _page(f"attnkit analysis · {' vs '.join(labels)}", _meta(runs, labels), doc,
                 f"Generated by attnkit analyze; {doc.n_plots} plots, viewable offline; data in analysis.json.")


def _page(title: str, meta: list[tuple[str, str]], doc: Doc, footer: str) -> str:
    items = "".join(f"<div><dt>{esc(k)}</dt><dd>{esc(v)}</dd></div>" for k, v in meta)
    nav = " ".join(f'<a href="#{esc(a)}">{esc(t)}</a>' for a, t in SECTIONS)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title)}</title><style>{CSS}</style><script>{EARLY_JS}</script></head>"
            f'<body><main><header><h1>{esc(title)}</h1><dl class="meta">{items}</dl><nav>{nav}</nav></header>\n'
            + "\n".join(doc.html)
            + f"\n<footer>{esc(footer)}</footer></main><script>{CHECK_JS}</script></body></html>\n")
