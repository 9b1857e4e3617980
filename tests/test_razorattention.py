"""RazorAttention: the grouping and the compensation token against an independent dense computation, the memory
freed, the window rule and the head sources (explicit, profile, computed at apply time)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import torch

import attnkit
from attnkit.analysis.heads import HeadScores
from attnkit.methods.stored import razorattention as ra
from conftest import DEVICE, DTYPE
from test_methods import ATTN_TOL, MODELS, assert_close, ids_for, stream
from tiny import tiny_llama

SINKS, WINDOW = 3, 10


def dense_layer0_kv(model, ids):
    """Layer 0's rotated keys and values of the unmodified model over ids: (B, Hkv, L, D) each."""
    got = {}
    with torch.no_grad(), attnkit.apply(model, "full") as run:
        run.recorder = lambda r: got.setdefault("kv", (r["key"], r["value"])) if r["layer"] == 0 else None
        model(ids)
    return got["kv"]


def independent_output(q, k, v, p, retrieval, scaling, compensation=True):
    """Expected layer-0 output (B, H, 1, D) of the decode query at position p, head by head, from the dense K/V:
    retrieval KV heads read [0, p]; the others the sinks, [p - W, p] and one key / value = the mean of the keys /
    values at [SINKS, p - W) with logit + log(count)."""
    q, k, v = q.cpu(), k.cpu(), v.cpu()
    b, h, _, d = q.shape
    group = h // k.shape[1]
    out = torch.zeros(b, h, 1, v.shape[-1])
    for head in range(h):
        kv = head // group
        if kv in retrieval:
            keys, vals, bias = k[:, kv, : p + 1], v[:, kv, : p + 1], torch.zeros(p + 1)
        else:
            keep = list(range(SINKS)) + list(range(p - WINDOW, p + 1))
            dropped = list(range(SINKS, p - WINDOW))
            keys, vals, bias = k[:, kv, keep], v[:, kv, keep], torch.zeros(len(keep))
            if compensation and dropped:
                keys = torch.cat([keys, k[:, kv, dropped].mean(1, keepdim=True)], 1)
                vals = torch.cat([vals, v[:, kv, dropped].mean(1, keepdim=True)], 1)
                bias = torch.cat([bias, torch.tensor([float(len(dropped))]).log()])
        scores = torch.einsum("bd,bnd->bn", q[:, head, 0].float(), keys.float()) * scaling + bias
        out[:, head, 0] = torch.einsum("bn,bnd->bd", scores.softmax(-1), vals.float())
    return out


def capture_attend(run, layer_idx: int, sink: list) -> None:
    """Record (query, out) of the whole layer (all heads, after the groups are put back in head order)."""
    inner = run.method.attend

    def attend(run_, module, layer, query, key, value, scaling, softcap):
        out = inner(run_, module, layer, query, key, value, scaling, softcap)
        if layer.layer_idx == layer_idx:
            sink.append((query.clone(), out.clone(), scaling))
        return out

    run.method.attend = attend


@pytest.mark.parametrize("compensation", [True, False])
def test_each_head_sees_its_group_and_the_compensation_token(compensation):
    """Layer 0 (its K/V equal the dense model's): every decode output equals the per-head computation above."""
    model = tiny_llama(dtype=DTYPE).to(DEVICE)
    ids = ids_for(60, seed=1)
    k, v = dense_layer0_kv(model, ids)
    calls = []
    with torch.no_grad(), attnkit.apply(model, "razorattention", sinks=SINKS, window=WINDOW, heads=[[0, 1], [2, 0]],
                                         compensation=compensation) as run:
        capture_attend(run, 0, calls)
        stream(model, ids, chunk=9, decode=8)
        layer = run.cache.layers[0]
    decode = [c for c in calls if c[0].shape[2] == 1]
    assert len(decode) == 8
    for step, (q, out, scaling) in enumerate(decode):
        want = independent_output(q, k, v, 52 + step, {1}, scaling, compensation)
        assert_close(out.cpu(), want, f"decode step {step}", ATTN_TOL[DTYPE])
    # what the layer holds: the retrieval head everything, the other sinks + window, the sums of the rest
    pos = run.kept_positions(0)[0]
    assert sorted(p for p in pos[1].tolist() if p >= 0) == list(range(60))
    assert sorted(p for p in pos[0].tolist() if p >= 0) == list(range(SINKS)) + list(range(60 - WINDOW, 60))
    local = layer.local
    if compensation:
        dropped = slice(SINKS, 60 - WINDOW)
        assert local.comp_count[0, 0].item() == 60 - WINDOW - SINKS
        assert_close(local.comp_keys[0, 0], k[0, 0, dropped].float().sum(0), "key sum", ATTN_TOL[DTYPE])
        assert_close(local.comp_values[0, 0], v[0, 0, dropped].float().sum(0), "value sum", ATTN_TOL[DTYPE])
    else:
        assert local.comp_count.sum().item() == 0


def test_prefill_is_dense_and_compression_waits_for_decoding():
    model = tiny_llama(dtype=DTYPE).to(DEVICE)
    ids = ids_for(50, seed=2)
    with torch.no_grad():
        want = model(ids).logits
        with attnkit.apply(model, "razorattention", sinks=SINKS, window=WINDOW, heads=[[1, 1]]) as run:
            cache = attnkit.inference.new_cache(model)
            got = attnkit.inference.forward_chunks(model, ids, cache, chunk=16)
            assert all(k.min() == 50 for k in run.kept_tokens())  # nothing evicted during the prefill
            model(input_ids=ids[:, :1], use_cache=True, **{attnkit.session.cache_argument(model): cache})
            kept = run.kept_tokens()
    assert_close(got, want[:, -1:], "dense prefill logits")
    assert kept[1][0].tolist() == [SINKS + WINDOW, 51] and kept[0][0].tolist() == [SINKS + WINDOW] * 2


@pytest.mark.parametrize("name", list(MODELS))
def test_every_head_retrieval_equals_full_exactly(name):
    model = MODELS[name](dtype=DTYPE).to(DEVICE)
    n_kv = model.config.num_key_value_heads
    every = [[layer, h] for layer in range(model.config.num_hidden_layers) for h in range(n_kv)]
    ids = ids_for(40, seed=3, batch=2)
    with torch.no_grad():
        with attnkit.apply(model, "full"):
            want = stream(model, ids, chunk=7, decode=6)
        with attnkit.apply(model, "razorattention", sinks=2, window=4, heads=every):
            got = stream(model, ids, chunk=7, decode=6)
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", list(MODELS))
def test_window_covering_the_context_equals_full(name):
    model = MODELS[name](dtype=DTYPE).to(DEVICE)
    ids = ids_for(40, seed=4, batch=2)
    with torch.no_grad():
        with attnkit.apply(model, "full"):
            want = stream(model, ids, chunk=7, decode=6)
        with attnkit.apply(model, "razorattention", window=40, heads=[[1, 0]]):
            got = stream(model, ids, chunk=7, decode=6)
    assert_close(got, want, f"{name}: window >= context")


def test_held_bytes_drop_by_the_freed_heads_share_exactly():
    model = tiny_llama(dtype=DTYPE).to(DEVICE)
    ids = ids_for(200, seed=5)
    with torch.no_grad():
        with attnkit.apply(model, "full") as dense:
            stream(model, ids, chunk=16, decode=4)
        with attnkit.apply(model, "razorattention", sinks=SINKS, window=WINDOW, heads=[[0, 1], [2, 0]]) as run:
            stream(model, ids, chunk=16, decode=4)
    b, n_kv, d, elt = 1, 2, 16, torch.finfo(DTYPE).bits // 8
    per_head_full = [layer.held_bytes() // n_kv for layer in dense.cache.layers]  # same slot growth as full
    local = b * (SINKS + WINDOW + 2) * d * 2 * elt + b * (2 * d + 1) * 4  # slots + float32 sums and count
    local_heads = [1, 2, 1]  # per layer: heads [[0, 1], [2, 0]] leave one, two and one KV head local
    assert dense.kv_bytes() - run.kv_bytes() == sum(n * (per_head_full[i] - local) for i, n in enumerate(local_heads))
    assert run.stats()["razorattention"]["retrieval_heads"] == 2


def test_for_budget_and_the_papers_window_rule(monkeypatch):
    method = ra.RazorAttention.for_budget(64)
    assert method.sinks + method.window + 1 == 64
    model = tiny_llama(dtype=DTYPE).to(DEVICE)
    monkeypatch.setattr(ra, "LOCAL_MIN", 8)  # S0 = 8, C = 5: a 60-token prompt keeps max(8, 12) = 12
    ids = ids_for(60, seed=6)
    with torch.no_grad(), attnkit.apply(model, "razorattention", sinks=2, heads=[]) as run:
        stream(model, ids, chunk=16, decode=1)
    assert set(run.kept_positions(0)[0, 0].tolist()) == {0, 1} | set(range(60 - 12, 60))


def test_heads_from_a_profile_and_computed_at_apply_time(tmp_path):
    model = tiny_llama(dtype=DTYPE).to(DEVICE)
    g = torch.Generator().manual_seed(0)
    scores = HeadScores(torch.rand(3, 4, generator=g), torch.rand(3, 4, generator=g), [None] * 3, 2, 8, 4)
    path = scores.to_json(tmp_path / "heads.json")
    method = attnkit.make_method("razorattention", profile=str(path), induction_frac=0.34, echo_frac=0.17)
    want = scores.retrieval_heads(0.34, 0.17)
    assert len(want) == 3
    with attnkit.apply(model, method) as run:
        model(ids_for(20))
        got = sorted((i, h) for i, layer in enumerate(run.cache.layers) for h in layer.retrieval)
    assert got == want
    ra._SCORES.clear()
    with attnkit.apply(model, "razorattention", window=8) as run:
        model(ids_for(20))
        computed = ra._SCORES[model]
    assert computed.echo.shape == (3, 4) and computed.length == (2048 - 1) // 4
    with attnkit.apply(model, "razorattention", window=8):  # cached: not computed again
        assert ra._SCORES[model] is computed


@pytest.mark.parametrize("settings, field", [
    ({"window": 0}, "window"), ({"sinks": -1}, "sinks"), ({"induction_frac": 1.5}, "induction_frac"),
    ({"heads": [[0]]}, "heads"), ({"heads": "all"}, "heads"), ({"compensation": 1}, "compensation"),
    ({"profile": 3}, "profile"),
])
def test_invalid_settings_are_refused(settings, field):
    with pytest.raises(ValueError, match=f"razorattention: {field}"):
        attnkit.make_method("razorattention", **settings)


def test_heads_outside_the_model_and_missing_profiles_are_refused(tmp_path):
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"heads entry \(0, 2\) is invalid; accepted: layer in \[0, 2\], kv_head"):
        attnkit.apply(model, "razorattention", heads=[[0, 2]])
    with pytest.raises(ValueError, match="profile=.* is invalid"):
        attnkit.apply(model, "razorattention", profile=str(tmp_path / "missing.json"))


def test_readme_mean_row_is_the_committed_databases():
    """The README's RazorAttention means come from docs/results/razor_smollm2_4k.db (mean over tasks of the
    per-task mean score), not from a hand-typed figure."""
    root = Path(__file__).resolve().parent.parent
    db = sqlite3.connect(root / "docs" / "results" / "razor_smollm2_4k.db")
    rows = db.execute("select method || budget, avg(s) from (select method, budget, task, 100 * avg(score) s "
                      "from results group by method, budget, task) group by method, budget").fetchall()
    mean = dict(rows)
    full, rule, small = mean["full"], mean["razorattention4005"], mean["razorattention517"]
    row = (f"| mean of the 13 tasks | {full:.1f} | {rule:.1f} ({rule - full:+.1f}) | "
           f"{small:.1f} ({small - full:+.1f}) |")
    assert row in (root / "README.md").read_text(), row
