"""Method-specific rules of the decode-time selection family (the generic tests run them against the dense
reference): PyramidKV's per-layer budgets, TidalDecode's shared selection."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit.methods.stored.pyramidkv import pyramid_older
from conftest import DEVICE, DTYPE
from test_methods import assert_close, global_layers, ids_for, step, stream
from tiny import tiny_llama


def test_pyramid_budgets_shrink_with_depth_and_keep_the_total():
    for budget, window, beta, prompt, layers in [(1024, 32, 20, 8192, 32), (96, 16, 20, 400, 30), (64, 8, 4, 5000, 7)]:
        kept = [pyramid_older(budget, window, beta, prompt, d, layers) for d in range(layers)]
        assert kept == sorted(kept, reverse=True) and kept[0] > kept[-1], kept
        share = budget - window
        assert abs(sum(kept) - layers * share) <= layers / 2, (sum(kept), layers * share)  # the same total
    # a prompt shorter than twice the share: SnapKV's uniform budget; the bottom layer never exceeds the prompt
    assert {pyramid_older(96, 16, 20, 150, d, 30) for d in range(30)} == {80}
    assert pyramid_older(20, 4, 20, 36, 0, 5) == 36 - 4


def test_pyramidkv_keeps_per_layer_budgets_after_the_prompt():
    model = tiny_llama(dtype=DTYPE).to(DEVICE)
    ids = ids_for(200, seed=3)
    settings = dict(budget=40, window=8, kernel=3, beta=4)
    with torch.no_grad(), attnkit.apply(model, "pyramidkv", **settings) as run:
        stream(model, ids, chunk=50, decode=1)
        layers = global_layers(run)
        kept = [int(run.kept_tokens()[i].max()) for i in layers]
    want = [pyramid_older(40, 8, 4, 200, d, len(layers)) + 8 + 1 for d in range(len(layers))]  # + window + 1 decoded
    assert kept == want, (kept, want)


@pytest.mark.parametrize("method", ["snapkv", "pyramidkv"])
def test_snapkv_prefill_without_a_mask_equals_the_masked_path(method):
    """Without a recorder the prompt's chunks take the plain causal kernel and the observation window's
    probabilities a small (w, n) pass; with one, the (q, n) mask path: same logits, same kept positions."""
    model = tiny_llama(dtype=DTYPE).to(DEVICE)
    ids = ids_for(200, seed=5)
    settings = dict(budget=40, window=8, kernel=3, **({"beta": 4} if method == "pyramidkv" else {}))
    got = {}
    for masked in (False, True):
        with torch.no_grad(), attnkit.apply(model, method, **settings) as run:
            if masked:
                run.recorder = lambda call: None
            stream(model, ids[:, :-3], chunk=50, decode=0)
            scores = [run.cache.layers[i].scores.clone() for i in global_layers(run)]  # the window's, per slot
            logits = [step(model, ids[:, t : t + 1], run.cache).logits for t in range(197, 200)]
            got[masked] = scores, torch.cat(logits, 1), [run.kept_positions(i).tolist() for i in global_layers(run)]
    for plain, masked in zip(got[False][0], got[True][0]):
        assert_close(plain, masked, "observation window scores")
    assert_close(got[False][1], got[True][1], "decode logits")
    assert got[False][2] == got[True][2]


def test_snapkv_frees_the_prompt_buffers_after_compressing():
    class Ids:
        eos_token_id = None
        pad_token_id = 0

        def decode(self, ids, skip_special_tokens=True):
            return ""

    model = tiny_llama(dtype=DTYPE).to(DEVICE)
    prompt = ids_for(300, seed=6)
    with torch.no_grad(), attnkit.apply(model, "snapkv", budget=40, window=8) as run:
        attnkit.generate(model, Ids(), prompt, max_new_tokens=6, prefill_chunk=64, stop_at_eos=False)
        layer = run.cache.layers[0]
        # 40 kept + the 5 decode steps still to come, rounded up to the 64-slot growth unit (not the 306 slots
        # allocated for the prompt)
        assert layer.capacity == 64, layer.capacity
        per_slot = 2 * layer.keys.shape[1] * layer.keys.shape[-1] * layer.keys.element_size()
        assert run.kv_bytes() == len(run.cache.layers) * 64 * per_slot


def test_tidaldecode_later_layers_reuse_each_heads_selection():
    model = tiny_llama(dtype=DTYPE).to(DEVICE)
    records = []
    with torch.no_grad(), attnkit.apply(model, "tidaldecode", top_k=8, dense_layers=0, reselect_layer=-1) as run:
        run.recorder = lambda r: records.append({k: v.clone() if torch.is_tensor(v) else v for k, v in r.items()})
        stream(model, ids_for(40, seed=2), chunk=40, decode=3)
    steps = [r for r in records if r["query"].shape[2] == 1]
    sparse = [r for r in steps if r["layer"] in (1, 2)]
    assert len(sparse) == 2 * 3
    for first, second in zip(sparse[::2], sparse[1::2]):
        m1, m2 = first["mask"][:, :, 0], second["mask"][:, :, 0]  # (B, H, n): what each query head read
        assert torch.equal(m1, m2), "layer 2 must read layer 0's selection"
        assert (m1.sum(-1) == 8).all() and m1[..., -1].all(), "top_k per head, the current token included"
        assert not (m1 == m1[:, :1]).all(), "selection is per query head"
    selection = [r for r in steps if r["layer"] == 0]
    for sel, used in zip(selection, sparse[::2]):  # layer 0's top-7 by q.k per head, plus the current token
        q, k = sel["query"][:, :, 0], sel["key"]
        scores = torch.einsum("bhd,bhnd->bhn", q.float(), k.float().repeat_interleave(q.shape[1] // k.shape[1], 1))
        want = scores[..., :-1].topk(7, dim=-1).indices
        got = used["mask"][:, :, 0, :-1].nonzero()[:, -1].view(*want.shape[:2], 7)
        assert torch.equal(got, want.sort(-1).values)


def test_tidaldecode_refuses_layers_the_model_does_not_have():
    model = tiny_llama(dtype=DTYPE).to(DEVICE)
    with pytest.raises(ValueError, match=r"reselect_layer=13 is invalid for a model of 3 layers; accepted"):
        attnkit.apply(model, "tidaldecode")


@pytest.mark.parametrize("threshold,full_on_checks", [(1.0, True), (-1.0, False)])
def test_recycled_attention_partial_steps_and_drift_checks(threshold, full_on_checks):
    model = tiny_llama(dtype=DTYPE).to(DEVICE)
    records = []
    settings = dict(recycled=6, stride=3, threshold=threshold)
    with torch.no_grad(), attnkit.apply(model, "recycled_attention", **settings) as run:
        run.recorder = lambda r: records.append({k: v.clone() if torch.is_tensor(v) else v for k, v in r.items()})
        stream(model, ids_for(40, seed=5), chunk=40, decode=7)
        layer = run.cache.layers[1]
        assert layer.decode_step == 7
        assert int(layer.n - 1) in layer.recycled[0, 0].tolist(), "the newest token joins the recycled cache"
    steps = [r for r in records if r["query"].shape[2] == 1 and r["layer"] == 1]
    assert len(steps) == 7
    for t, r in enumerate(steps, start=1):
        read = r["mask"][0, :, 0].sum(-1)  # (Hkv,) slots read per KV head
        n = r["key"].shape[2]
        if t % 3 == 0 and full_on_checks:
            assert (read == n).all(), f"step {t}: a drifted row reads the whole cache"
        else:
            assert (read == 6 + 1).all(), f"step {t}: recycled slots + the current token"


def test_recycled_choice_ranks_as_a_stable_sort():
    """The top-k over (value bits, reversed slot) keys picks and orders exactly as the stable descending sort of
    the pooled scores it replaced: ties (max-pooling makes runs of them) to the lower slot, holes never."""
    import torch.nn.functional as F

    from attnkit.methods.read.recycled_attention import RecycledAttention, RecycledLayer

    g = torch.Generator().manual_seed(0)
    b, h, hkv, n = 2, 4, 2, 300
    for recycled in (16, 64, 400):
        cfg = RecycledAttention(recycled=recycled, pool=7)
        layer = RecycledLayer(cfg, 0, None)
        layer.keys = torch.zeros(b, hkv, n, 8)
        layer.pos = torch.arange(n).expand(b, hkv, n).clone()
        layer.pos[1, :, :40] = -1  # a padded row
        probs = (torch.rand(b, h, n, generator=g) * 4).floor() / 4  # many exact ties
        probs[0, :, 100] = 0.0
        got = layer.choose(probs)
        grouped = probs.view(b, hkv, h // hkv, n).amax(2)
        pooled = F.max_pool1d(grouped.flatten(0, 1).unsqueeze(1), 7, stride=1, padding=3).view(b, hkv, n)
        pooled = pooled.masked_fill(layer.pos < 0, float("-inf"))
        take = min(recycled, n)
        best, top = pooled.sort(dim=-1, descending=True, stable=True)
        want = top[..., :take].masked_fill(best[..., :take] == float("-inf"), -1).flip(-1)
        want = F.pad(want, (recycled - take, 0), value=-1)
        assert torch.equal(got, want), recycled


def test_fasa_calibration_profile_drives_the_chunks(tmp_path):
    from attnkit.calibrate import calibrate_fasa, write_profile
    from attnkit.methods.read.fasa import FASA

    model = tiny_llama(dtype=DTYPE).to(DEVICE)
    prompts = [ids_for(40, seed=s) for s in (1, 2)]
    profile = calibrate_fasa(model, prompts, budgets=(4, 8, 1000), new_tokens=3)
    assert profile["budgets"] == [4, 8] and profile["layers"] == [0, 1, 2] and profile["steps"] == [6, 6]
    table = torch.tensor(profile["agreement"])  # (budgets, layers, heads, D/2)
    assert table.shape == (2, 3, 4, 8) and 0 <= table.min() and table.max() <= 1
    path = write_profile(profile, tmp_path / "fasa.json")
    method = FASA(budget=8, chunks=2, profile=str(path), dense_layers=0)
    want = table[1, 2].topk(2, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(method.layer_chunks(2), want)
    with torch.no_grad(), attnkit.apply(model, method) as run:
        stream(model, ids_for(40, seed=3), chunk=40, decode=2)
        assert torch.equal(run.cache.layers[2].chunks, want)


def test_tidaldecode_calibration_scores_each_reselection_layer():
    from attnkit.calibrate import calibrate_tidaldecode
    from attnkit.inference import generate

    model = tiny_llama(dtype=DTYPE).to(DEVICE)  # 3 global layers: select at 0, re-select at 1 or 2
    prompt = ids_for(40, seed=5)
    profile = calibrate_tidaldecode(model, [prompt], budgets=(8, 40, 1000), new_tokens=1, dense_layers=0,
                                    sinks=2, local=4)
    assert profile["budgets"] == [8, 40] and profile["selection_layer"] == 0 and profile["candidates"] == [1, 2]
    assert profile["kept_mass"][1] == pytest.approx([1.0, 1.0], abs=1e-4)  # 40 past tokens: everything is read
    # the same score by hand from the recorded step (n = 41 keys)
    probs, logits = {}, {}

    def record(r):
        if r["query"].shape[2] == 1:
            q = r["query"][0, :, 0].float()
            k = r["key"][0].float().repeat_interleave(q.shape[0] // r["key"].shape[1], dim=0)
            logits[r["layer"]] = (q.unsqueeze(1) * k).sum(-1) * r["scaling"]
            p = logits[r["layer"]].softmax(-1)
            p[:, :2] = 0  # only the middle counts: not the 2 sinks nor the 4 local tokens
            p[:, -4:] = 0
            probs[r["layer"]] = p

    class Ids:
        eos_token_id = None

        def decode(self, ids, skip_special_tokens=True):
            return ""

    with torch.no_grad(), attnkit.apply(model, "full") as run:
        run.recorder = record
        generate(model, Ids(), prompt, max_new_tokens=2, stop_at_eos=False)
    sel = {}
    for layer, lg in logits.items():
        m = torch.zeros_like(lg, dtype=torch.bool)
        m[torch.arange(lg.shape[0]).unsqueeze(1), lg[:, :-1].topk(8, dim=-1).indices] = True
        m[:, -1] = True
        sel[layer] = m
    total = probs[1].sum() + probs[2].sum()
    want_r1 = (probs[1].sum() + (probs[2] * sel[1]).sum()) / total  # layer 2 reads layer 1's selection
    want_r2 = ((probs[1] * sel[0]).sum() + probs[2].sum()) / total  # layer 1 reads layer 0's
    assert profile["kept_mass"][0] == pytest.approx([float(want_r1), float(want_r2)], abs=1e-3)
    assert profile["best_reselect"][0] == (1 if want_r1 >= want_r2 else 2)
    with pytest.raises(ValueError, match="dense_layers=2 leaves fewer than 2 global layers"):
        calibrate_tidaldecode(model, [prompt], budgets=(8,), new_tokens=1, dense_layers=2)


def test_fasa_refuses_bad_profiles(tmp_path):
    from attnkit.methods.read.fasa import FASA

    with pytest.raises(ValueError, match="not found"):
        FASA(profile=str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a readable JSON profile"):
        FASA(profile=str(bad))
    bad.write_text('{"method": "quest"}')
    with pytest.raises(ValueError, match="is not a FASA profile"):
        FASA(profile=str(bad))
    wrong = tmp_path / "wrong.json"
    wrong.write_text('{"method": "fasa", "head_dim": 128, "pairing": "rope", "budgets": [8], "layers": [0], '
                     '"agreement": [[[[0.5]]]]}')
    model = tiny_llama(dtype=DTYPE).to(DEVICE)
    with pytest.raises(ValueError, match="calibrated for head_dim 128"):
        attnkit.apply(model, "fasa", profile=str(wrong), chunks=2)


def test_spatten_prunes_the_same_tokens_from_every_layer_for_good():
    model = tiny_llama(dtype=DTYPE).to(DEVICE)
    ids = ids_for(60, seed=4)
    with torch.no_grad(), attnkit.apply(model, "spatten", budget=20, value_threshold=0.0, recent=3) as run:
        stream(model, ids, chunk=12, decode=6)
        held = [set(p for p in run.kept_positions(i)[0, 0].tolist() if p >= 0) for i in range(3)]
        cascade = run.shared["spatten"]
        # before the next forward, the layers before the last one still hold the last decision's victims;
        # one more step applies it to every layer
        stream_more = run.cache
        model(input_ids=ids[:, :1], use_cache=True, **{attnkit.session.cache_argument(model): stream_more})
        after = [set(p for p in run.kept_positions(i)[0, 0].tolist() if p >= 0) for i in range(3)]
    # the last layer decides at the end of a forward; the layers before it drop those tokens at the next one
    dead = set(range(61)) - set(cascade.alive[0, :61].nonzero().view(-1).tolist())
    assert len(after[2]) == 20 and after[0] == after[1] and after[2] <= after[0]
    assert after[0] - after[2] <= dead and len(after[0] - after[2]) <= 1, "one token set for all layers (cascade)"
    gone = set(range(60)) - held[2]  # pruned before the extra step
    assert gone and not (gone & after[0]) and not (dead & after[2]), "pruned tokens never come back"
    assert {58, 59, 60} <= after[2], "the recent tokens are protected"


def test_spatten_value_pruning_zeroes_negligible_probabilities():
    model = tiny_llama(dtype=DTYPE).to(DEVICE)
    records = []
    with torch.no_grad(), attnkit.apply(model, "spatten", budget=64, value_threshold=0.02) as run:
        run.recorder = lambda r: records.append({k: v.clone() if torch.is_tensor(v) else v for k, v in r.items()})
        stream(model, ids_for(40, seed=6), chunk=40, decode=2)
    pruned_any = False
    for r in records:
        out, probs, _ = attnkit.dense_attention(r["query"], r["key"], r["value"], r["mask"], r["scaling"])
        kept = probs.masked_fill(r["value_pruned"], 0.0)
        from attnkit.reference import expand_kv

        want = torch.matmul(kept, expand_kv(r["value"], r["query"].shape[1]).float())
        assert torch.allclose(r["out"].float(), want, atol=1e-5)
        pruned_any |= bool(r["value_pruned"].any())
    assert pruned_any


def test_spatten_progressive_quantization_simulation():
    from attnkit.methods.stored.spatten import quantize_split
    from attnkit.reference import expand_kv

    x = torch.randn(2, 3, 5, 16, dtype=torch.float32)
    full, msb = quantize_split(x, 4, 4)
    assert (full - x).abs().max() <= x.abs().amax(-1, keepdim=True).max() / 127  # 8 bits: error <= one step
    assert (msb - x).abs().mean() > (full - x).abs().mean()  # the MSBs alone are coarser
    model = tiny_llama(dtype=DTYPE).to(DEVICE)
    ids = ids_for(40, seed=6)
    for threshold in (0.0, 0.3, 1.01):  # never / sometimes / always fetch the LSBs
        records = []
        settings = dict(budget=64, value_threshold=0.0, msb_bits=3, lsb_bits=5, quant_threshold=min(threshold, 1.0))
        with torch.no_grad(), attnkit.apply(model, "spatten", **settings) as run:
            run.recorder = lambda r: records.append({k: v.clone() if torch.is_tensor(v) else v for k, v in r.items()})
            stream(model, ids, chunk=40, decode=2)
            share = run.stats()["spatten"]["lsb_refetch_share"]
        rows = refetched = 0
        for r in records:
            fk, mk = quantize_split(r["key"], 3, 5)
            fv, mv = quantize_split(r["value"], 3, 5)
            h = r["query"].shape[1]
            _, coarse, _ = attnkit.dense_attention(r["query"], mk, mv, r["mask"], r["scaling"])
            _, fine, _ = attnkit.dense_attention(r["query"], fk, fv, r["mask"], r["scaling"])
            refetch = coarse.amax(-1, keepdim=True) < min(threshold, 1.0)
            want = torch.where(refetch, torch.matmul(fine, expand_kv(fv, h).float()),
                               torch.matmul(coarse, expand_kv(mv, h).float()))
            atol = 1e-5 if DTYPE == torch.float32 else 2e-2
            assert torch.allclose(r["out"].float(), want, atol=atol), "each row reads what it fetched"
            rows, refetched = rows + refetch.numel(), refetched + int(refetch.sum())
        assert share == pytest.approx(refetched / rows)
        if threshold == 0.0:
            assert share == 0.0
        elif threshold == 0.3:
            assert 0.0 < share < 1.0
    assert share > 0.9  # at 1.0 only rows with one visible key (probability exactly 1) skip the LSBs
    with pytest.raises(ValueError, match="msb_bits=1"):
        attnkit.make_method("spatten", msb_bits=1)


def test_spatten_cascade_head_pruning():
    model = tiny_llama(dtype=DTYPE).to(DEVICE)
    ids = ids_for(40, seed=7)
    records = []
    with torch.no_grad(), attnkit.apply(model, "spatten", budget=64, value_threshold=0.0, head_keep=0.5) as run:
        run.recorder = lambda r: records.append({k: v.clone() if torch.is_tensor(v) else v for k, v in r.items()})
        stream(model, ids, chunk=20, decode=4)
        sh = run.shared["spatten"]
        assert run.stats()["spatten"]["heads_alive"] == [2]  # 4 query heads, half kept
    alive_sets = []
    for r in records:
        silent = (r["out"].float().abs().sum((2, 3)) == 0)[0]  # (H,): heads that gave zeros
        alive_sets.append(set((~silent).nonzero().view(-1).tolist()))
    assert alive_sets[0] == {0, 1, 2, 3}, "the first layer call runs every head"
    assert all(b <= a for a, b in zip(alive_sets[1:], alive_sets[2:])), "a pruned head never comes back"
    assert alive_sets[-1] == set(sh.head_alive[0].nonzero().view(-1).tolist()) and len(alive_sets[-1]) == 2
    with pytest.raises(ValueError, match="head_keep=0.0"):
        attnkit.make_method("spatten", head_keep=0.0)
