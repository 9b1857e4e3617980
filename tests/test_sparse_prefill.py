"""The sparse-prefill family: kernels against the dense reference, and each method's own selection rule."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit.kernels.sparse_prefill import (
    block_token_mask,
    causal_visibility,
    compact_attention,
    compact_mask,
    masked_attention,
    group_stats,
)
from attnkit.methods.read.token_sparse import keep_counts
from attnkit.session import cache_argument
from conftest import DEVICE, DTYPE
from tiny import tiny_llama


def rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE)


@pytest.mark.parametrize("score_bytes", [None, 2 * 4 * 20 * 4 * 3])  # default; 3 query rows per chunk
@pytest.mark.parametrize("padded", [False, True])
def test_compact_attention_equals_reference_under_its_mask(monkeypatch, padded, score_bytes):
    if score_bytes is not None:
        monkeypatch.setattr(attnkit.hf.attention, "MASKED_SCORE_BYTES", score_bytes)
    b, h, hkv, n, q, d = 2, 4, 2, 40, 16, 8
    query, key, value = rand(b, h, q, d), rand(b, hkv, n, d, seed=1), rand(b, hkv, n, d, seed=2)
    kpos = torch.arange(n, device=DEVICE).expand(b, n).clone()
    if padded:  # row 1 left-padded by 5 slots
        kpos[1] = torch.arange(n, device=DEVICE) - 5
        kpos[1, :5] = -1
    qpos = kpos[:, -q:]
    g = torch.Generator().manual_seed(3)
    sets = []
    for _ in range(b * h):  # each (row, head): a random subset of 20 slots, some rows shorter (-1 first)
        keep = torch.randperm(n, generator=g)[: int(torch.randint(8, 21, (1,), generator=g))].sort().values
        sets.append(torch.cat([torch.full((20 - len(keep),), -1), keep]))
    sets = torch.stack(sets).view(b, h, 20).to(DEVICE)
    if padded:  # pad slots are never chosen
        sets[1] = torch.where((sets[1] >= 0) & (sets[1] < 5), -1, sets[1])
        sets[1] = sets[1].sort(-1).values
    n_query = int((sets >= n - q).sum(-1).max())
    out, lse = compact_attention(query, key, value, kpos, sets, n_query, 0.3)
    mask = compact_mask(sets, n, q, kpos, qpos)
    want, _, want_lse = attnkit.dense_attention(query, key, value, mask, 0.3)
    assert torch.allclose(out, want, atol=1e-5)
    real = torch.isfinite(want_lse)
    assert torch.allclose(lse[real], want_lse[real], atol=1e-5)
    dropped = ~mask.any(-1)  # queries outside their head's set get a zero update
    assert dropped.any() and (out[dropped] == 0).all()


def test_masked_attention_blocks_equal_one_call():
    query, key, value = rand(1, 4, 30, 8), rand(1, 2, 30, 8, seed=1), rand(1, 2, 30, 8, seed=2)
    pos = torch.arange(30, device=DEVICE)[None]
    mask = causal_visibility(pos, pos) & (rand(1, 1, 30, 30, seed=4) > 0)
    out, lse = masked_attention(query, key, value, mask, 0.4, block=7)
    want, _, want_lse = attnkit.dense_attention(query, key, value, mask, 0.4)
    assert torch.allclose(out, want, atol=1e-6) and torch.equal(torch.isinf(lse), torch.isinf(want_lse))


def test_block_token_mask_and_pooling():
    blocks = torch.tensor([[[[True, False], [True, True]]]])
    m = block_token_mask(blocks, q=5, n=6, block_q=3, block_k=4)
    assert m.shape == (1, 1, 5, 6)
    assert m[0, 0, :3].tolist() == [[True] * 4 + [False] * 2] * 3 and m[0, 0, 3:].all()
    x = torch.arange(10.0).view(1, 1, 10, 1)
    means, _, cnt = group_stats(x, (torch.arange(10) // 4)[None], 3)
    assert means.flatten().tolist() == [1.5, 5.5, 8.5] and cnt.flatten().tolist() == [4, 4, 2]


def test_token_sparse_keep_rule_drops_the_lowest_mass_below_tau():
    # head-mean scores 0.5, 0.3, 0.1, 0.05, 0.05 -> normalised cumsum ascending 0.05, 0.1, 0.2, 0.5, 1.0
    scores = torch.tensor([[[0.5, 0.3, 0.1, 0.05, 0.05]]])
    cand = torch.ones(1, 5, dtype=torch.bool)
    # 0.05 and 0.1 are below 0.15: two, plus the official code's one more
    assert keep_counts(scores, cand, tau=0.15, min_tokens=0).tolist() == [2]
    assert keep_counts(scores, cand, tau=0.15, min_tokens=4).tolist() == [4]
    assert keep_counts(scores, cand, tau=0.0, min_tokens=0).tolist() == [5]


def test_token_sparse_selects_each_heads_top_tokens_plus_the_window():
    model = tiny_llama().to(DEVICE)
    ids = torch.randint(3, 256, (1, 50), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    records = []
    with torch.no_grad(), attnkit.apply(model, "token_sparse", min_tokens=6, window=4, tau=0.5, kernel=3,
                                        layers="1") as run:
        run.recorder = lambda r: records.append(r)
        model(ids)
    sparse = [r for r in records if r["layer"] == 1]
    assert len(sparse) == 1 and all(r["mask"] is None or r["mask"].shape[1] == 1 for r in records if r["layer"] != 1)
    mask = sparse[0]["mask"][0]  # (H, q, n)
    kept_keys = mask.any(1)  # (H, n): slots some query of the head read
    assert kept_keys[:, -4:].all()  # the window is always kept
    assert (kept_keys.sum(-1) < 50).all() and (kept_keys.sum(-1) >= 6 + 4).all()
    assert (mask.any(-1) == kept_keys).all()  # queries and keys share each head's set
    assert not torch.equal(kept_keys[0], kept_keys[1])  # per-head sets


def test_token_sparse_refuses_bad_settings():
    with pytest.raises(ValueError, match="kernel=4"):
        attnkit.make_method("token_sparse", kernel=4)
    with pytest.raises(ValueError, match="tau=2"):
        attnkit.make_method("token_sparse", tau=2)
    model = tiny_llama()
    with pytest.raises(ValueError, match="layers='9'"):
        with attnkit.apply(model, "token_sparse", layers="9"):
            pass


def test_dhsa_mass_ratios_match_a_direct_count():
    from attnkit.methods.read.dhsa import mass_ratios

    n, w = 24, 4
    query, key, value = rand(1, 2, n, 8), rand(1, 1, n, 8, seed=1), rand(1, 1, n, 8, seed=2)
    pos = torch.arange(n, device=DEVICE)[None]
    vis = causal_visibility(pos, pos)
    got = mass_ratios(query, key, value, pos, pos, 0.5, w=w, block=5)
    _, probs, _ = attnkit.dense_attention(query, key, value, vis, 0.5)
    m = probs.mean(1)[0]  # (n, n)
    for c in range(w - 1, n - w):
        past = m[c + w + 1 :, c - w + 1 : c + 1].sum()
        fut = m[c + w + 1 :, c + 1 : c + w + 1].sum()
        want = (max(past, fut) + 1e-6) / (min(past, fut) + 1e-6)
        assert abs(got[0, c].item() - want.item()) < 1e-4 * want.item(), c


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton mass kernels are the default on CUDA only")
def test_dhsa_mass_ratios_fall_back_to_the_torch_sums_when_the_kernel_fails(monkeypatch):
    from attnkit.methods.read import dhsa

    n = 64
    query, key = rand(1, 2, n, 16).cuda(), rand(1, 1, n, 16, seed=1).cuda()
    pos = torch.arange(n, device="cuda")[None]
    want = dhsa.mass_ratios(query, key, None, pos, pos, 0.5, kernel="torch")
    torch.testing.assert_close(dhsa.mass_ratios(query, key, None, pos, pos, 0.5), want, rtol=1e-3, atol=0)  # kernels

    def broken(*args):
        raise RuntimeError("out of shared memory")

    monkeypatch.setattr(dhsa, "_mass_triton", broken)
    with pytest.warns(UserWarning, match="Triton mass kernels failed .*out of shared memory"):
        torch.testing.assert_close(dhsa.mass_ratios(query, key, None, pos, pos, 0.5), want, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="out of shared memory"):  # asked for by name: no silent fallback
        dhsa.mass_ratios(query, key, None, pos, pos, 0.5, kernel="triton")


def test_dhsa_mass_chunks_keep_the_strongest_boundaries_apart():
    from attnkit.methods.read.dhsa import mass_chunks

    n = 60
    ratio = torch.ones(1, n)
    ratio[0, 20], ratio[0, 24], ratio[0, 40] = 3.0, 5.0, 2.0  # 20 is within 8 of the stronger 24
    ids = mass_chunks(ratio, torch.arange(n)[None], n_chunks=10)
    starts = (ids[0, 1:] != ids[0, :-1]).nonzero()[:, 0] + 1
    assert starts.tolist() == [25, 41]  # a boundary after slot c starts a chunk at c + 1
    assert mass_chunks(ratio, torch.arange(n)[None], n_chunks=2).max() == 1  # only the strongest


def test_dhsa_fixed_chunks_read_what_the_papers_rule_picks():
    """One query block's read set from an independent loop: recent keys, best chunks by head-averaged reps,
    then the earliest chosen entries swapped for the sinks."""
    model = tiny_llama().to(DEVICE)
    ids = torch.randint(3, 256, (1, 48), generator=torch.Generator().manual_seed(8)).to(DEVICE)
    cfg = dict(budget=14, block=8, chunk=4, recent=4, sinks=2, dense_tail=0, boundaries="fixed")
    records = []
    with torch.no_grad(), attnkit.apply(model, "dhsa", **cfg) as run:
        run.recorder = lambda r: records.append(r)
        model(ids)
    r = records[1]
    q, k = r["query"][0].float(), r["key"][0].float()  # (H, 48, D), (Hkv, 48, D)
    qm, km = q.mean(0), k.mean(0)
    blk = 4  # queries 32..39: keys 0..39 visible
    qrep = qm[blk * 8 : blk * 8 + 8].mean(0) * 8**0.5
    krep = torch.stack([km[c * 4 : c * 4 + 4].mean(0) * 2 for c in range(10)])
    order = sorted(range(10), key=lambda c: (-(krep[c] @ qrep).item()))
    recent = set(range(36, 40))
    picked = []
    for c in order:
        for t in sorted(range(c * 4, c * 4 + 4), reverse=True):
            if t not in recent and len(picked) < 14 - 4:
                picked.append(t)
    chosen = sorted(recent | set(picked))[2:]
    want = set(chosen) | {0, 1}
    got = r["mask"][0, 0, blk * 8 + 7].nonzero()[:, 0].tolist()  # the block's last query reads the whole set
    assert set(got) == want


def test_rectified_pooled_rule_matches_a_direct_loop():
    """Critical blocks, GAPR and IPAR of one query head from plain loops over blocks (causal adaptation)."""
    model = tiny_llama().to(DEVICE)
    bs, n = 4, 48
    ids = torch.randint(3, 256, (1, n), generator=torch.Generator().manual_seed(6)).to(DEVICE)
    cfg = dict(block=bs, p_remain=0.5, drop=0.5, sinks=1, local=0)
    records = []
    with torch.no_grad(), attnkit.apply(model, "rectified", **cfg) as run:
        run.recorder = lambda r: records.append(r)
        model(ids)
    r = records[1]
    h, hkv = r["query"].shape[1], r["key"].shape[1]
    head = h - 1
    q = r["query"][0, head].float()
    k, v = r["key"][0, head // (h // hkv)].float(), r["value"][0, head // (h // hkv)].float()
    nb = n // bs
    blk = lambda x, j: x[j * bs : (j + 1) * bs]  # noqa: E731
    for i in (5, 11):
        qi = blk(q, i)
        qm, qd = qi.mean(0), (qi - qi.mean(0)).abs().mean(0)
        logits, counts = [], []
        for j in range(i + 1):
            c = bs if j < i else (bs + 1) / 2  # the diagonal: 1, 2, .., bs keys seen
            logits.append((qm @ blk(k, j).mean(0)) * r["scaling"] + torch.log(torch.tensor(c)))
        p = torch.stack(logits).softmax(0)
        cand = [j for j in range(1, i)]  # block 0 is the sink, block i the diagonal
        cand.sort(key=lambda j: -p[j].item())
        cum, n_keep = 0.0, 1
        for j in cand:
            cum += p[j].item()
            if cum <= 0.5:
                n_keep += 1
        n_keep = min(max(n_keep, int(0.5 * len(cand))), len(cand))
        critical = {0, i} | set(cand[:n_keep])
        scale, add = 0.0, torch.zeros_like(qm)
        for j in range(i + 1):
            km = blk(k, j).mean(0)
            kd = (blk(k, j) - km).abs().mean(0)
            if j not in critical and (qm @ km).abs() > (qd @ km).abs() + (qm @ kd).abs():
                add += p[j] * blk(v, j).mean(0)
            else:
                scale += p[j].item()
        rows = slice(i * bs, (i + 1) * bs)
        assert torch.allclose(r["scale"][0, head, rows, 0], torch.tensor(scale), atol=1e-5)
        assert torch.allclose(r["addend"][0, head, rows], add.expand(bs, -1), atol=1e-5)
        read_blocks = {j for j in range(nb) if r["mask"][0, head, i * bs, j * bs]}
        assert read_blocks == critical


def test_token_sparse_drift_profile_picks_the_low_drift_layers(tmp_path):
    from attnkit.calibrate import calibrate_token_sparse, write_profile

    model = tiny_llama().to(DEVICE)
    prompts = [torch.randint(3, 256, (1, 32), generator=torch.Generator().manual_seed(s)).to(DEVICE) for s in (1, 2)]
    prof = calibrate_token_sparse(model, prompts)
    assert prof["num_layers"] == 3 and all(r > 0 for r in prof["drift"])
    path = write_profile(prof, tmp_path / "drift.json")
    low = sorted(range(3), key=lambda i: prof["drift"][i])
    with attnkit.apply(model, "token_sparse", profile=str(path), delta=0.0) as run:
        assert run.method.sparse_layers(run) == [low[0]]  # the 0 quantile: the lowest-drift layer alone
    with attnkit.apply(model, "token_sparse", profile=str(path), delta=1.0) as run:
        assert run.method.sparse_layers(run) == [0, 1, 2]
    bad = tmp_path / "bad.json"
    bad.write_text('{"drift": [1]}')
    with pytest.raises(ValueError, match="not a token_sparse profile"):
        attnkit.make_method("token_sparse", profile=str(bad))


def test_tca_block_choice_matches_a_direct_loop():
    from attnkit.methods.stored.tca import block_counts, config_table, select_tokens

    table = config_table(8, 5)
    assert torch.allclose(table.sum(-1), torch.ones(5))
    expect = (table * torch.tensor(block_counts(8))).sum(-1)
    assert (expect[1:] > expect[:-1]).all()  # ascending in tokens kept
    g = torch.Generator().manual_seed(2)
    n = 40
    s = torch.rand(1, n, generator=g).softmax(-1)
    kb = (torch.arange(n) // 8)[None]
    old = (torch.arange(n) < 33)[None]  # the last 7 are the local window
    p = table[2][None]
    chosen = select_tokens(s, kb, old, p, torch.tensor(block_counts(8)), 0.5, 5)
    # the loop: redundancy per block, ranks -> counts by cumulative shares from the largest k, top-k by s
    hs = []
    for j in range(5):
        e = [t for t in range(j * 8, j * 8 + 8) if t < 33]
        m = sum(s[0, t].item() for t in e)
        hs.append(0.5 * m + 0.5 * (1 - sum(s[0, t].item() ** 2 for t in e) / m**2))
    ranked = sorted(range(5), key=lambda j: -hs[j])
    ks = block_counts(8)[::-1]
    cum = p[0].flip(0).cumsum(0).tolist()
    want = set()
    for r, j in enumerate(ranked):
        frac = (r + 0.5) / 5
        k = ks[min(next((i for i, c in enumerate(cum) if c >= frac), len(ks) - 1), len(ks) - 1)]
        e = sorted((t for t in range(j * 8, j * 8 + 8) if t < 33), key=lambda t: -s[0, t].item())
        want |= set(e[:k])
    assert set(chosen[0].nonzero()[:, 0].tolist()) == want
    per_block = select_tokens(s, kb, old, p, torch.tensor(block_counts(8)), 0.5, 5, block=8)
    assert set(per_block[0].nonzero()[:, 0].tolist()) == want


def test_tca_per_block_ranks_equal_the_one_sort_path():
    """With slot = position (a partial last block, exact ties from quantised scores, heads and query blocks as
    leading dims) the per-block sorts choose exactly what the one sort over (block, -s) chooses."""
    from attnkit.methods.stored.tca import block_counts, config_table, select_tokens

    g = torch.Generator().manual_seed(4)
    lead, n, block = (2, 3, 5), 301, 16
    s = (torch.rand(*lead, n, generator=g) * 8).floor() / 64  # many exact ties
    kb = (torch.arange(n) // block).expand(*lead, n)
    old = torch.arange(n).expand(*lead, n) < torch.randint(100, 290, (*lead, 1), generator=g)
    p = config_table(block, 6)[torch.randint(0, 6, lead, generator=g)]
    ks = torch.tensor(block_counts(block))
    n_kb = -(-n // block)
    a = select_tokens(s, kb, old, p, ks, 0.5, n_kb)
    b = select_tokens(s, kb, old, p, ks, 0.5, n_kb, block=block)
    assert torch.equal(a, b)


def test_tca_calibration_and_shrunk_cache(tmp_path):
    from attnkit.calibrate import calibrate_tca, write_profile

    model = tiny_llama().to(DEVICE)
    prompts = [torch.randint(3, 256, (1, 64), generator=torch.Generator().manual_seed(1)).to(DEVICE)]
    prof = calibrate_tca(model, prompts, tau=0.5, block=4, configs=4, window=8)
    assert set(prof["layers"]) == {"0", "1", "2"} and all(0 <= c < 4 for v in prof["layers"].values() for c in v)
    tight = calibrate_tca(model, prompts, tau=0.999, block=4, configs=4, window=8)
    assert sum(map(sum, tight["layers"].values())) >= sum(map(sum, prof["layers"].values()))
    path = write_profile(prof, tmp_path / "tca.json")
    ids = torch.randint(3, 256, (1, 300), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    with torch.no_grad():
        with attnkit.apply(model, "full") as dense:
            attnkit.inference.forward_chunks(model, ids, attnkit.inference.new_cache(model), chunk=300)
            full_bytes = dense.cache.held_bytes()
        with attnkit.apply(model, "tca", profile=str(path), block=4, configs=4, window=8) as run:
            cache = attnkit.inference.new_cache(model)
            attnkit.inference.forward_chunks(model, ids, cache, chunk=300)
            records = []
            run.recorder = lambda r: records.append(r)
            model(input_ids=ids[:, -1:], **{cache_argument(model): cache})  # decoding starts: the cache shrinks
            for r in records:  # a decode step never reads a hole left by per-head compression
                pos = run.cache.layers[r["layer"]].stored_pos()
                assert r["mask"] is not None and not (r["mask"][:, :, 0] & (pos < 0)).any()
            kept = [run.kept_tokens()[i].max().item() for i in range(3)]
            assert max(kept) < 200 and cache.held_bytes() < 0.75 * full_bytes  # memory really freed
        with attnkit.apply(model, "tca", profile=str(path), block=4, configs=4, window=8, shrink=False) as run:
            cache = attnkit.inference.new_cache(model)
            attnkit.inference.forward_chunks(model, ids, cache, chunk=300)
            model(input_ids=ids[:, -1:], **{cache_argument(model): cache})  # decoding starts: nothing is dropped
            assert min(run.kept_tokens()[i].min().item() for i in range(3)) == 301
            assert run.stats()["prefill_read_share"] < 1  # the prefill was still sparse
    with pytest.raises(ValueError, match="calibrated with block 4"):
        attnkit.make_method("tca", profile=str(path))


@pytest.mark.parametrize("shared", [True, False])
def test_block_gather_attention_equals_the_masked_reference(shared):
    from attnkit.kernels.sparse_prefill import block_gather_attention, mask_to_lists, query_blocks

    b, h, hkv, n, q, d, blk = 2, 4, 2, 45, 20, 8, 6
    query, key, value = rand(b, h, q, d), rand(b, hkv, n, d, seed=1), rand(b, hkv, n, d, seed=2)
    kpos = torch.arange(n, device=DEVICE).expand(b, n).clone()
    kpos[1] = torch.arange(n, device=DEVICE) - 7  # row 1 left-padded by 7
    kpos[1, :7] = -1
    qpos = kpos[:, -q:]
    local, qidx, nqb = query_blocks(qpos, blk)
    assert (qidx >= 0).sum() == (qpos >= 0).sum()
    chosen = rand(b, 1 if shared else hkv, nqb, n, seed=5) > 0.3
    out = block_gather_attention(query, key, value, qidx, mask_to_lists(chosen), qpos, kpos, 0.3, group=2)
    per_q = chosen.gather(2, local.clamp_min(0).view(b, 1, q, 1).expand(b, chosen.shape[1], q, n))
    mask = per_q & causal_visibility(qpos, kpos)
    want, _, _ = attnkit.dense_attention(query, key, value, mask, 0.3)
    assert torch.allclose(out, want, atol=1e-5)


@pytest.mark.parametrize("chunk_start", [0, 32])
def test_flex_block_attention_equals_the_block_mask_reference(chunk_start):
    from attnkit.kernels.sparse_prefill import flex_block_attention

    b, h, hkv, n, d, blk = 1, 4, 2, 96, 16, 16
    q = n - chunk_start
    query, key, value = rand(b, h, q, d), rand(b, hkv, n, d, seed=1), rand(b, hkv, n, d, seed=2)
    nb = n // blk
    blocks = (rand(b, h, nb, nb, seed=3) > 0) | torch.eye(nb, dtype=torch.bool, device=DEVICE)
    first = chunk_start // blk
    out = flex_block_attention(query, key, value, blocks[:, :, first:], blk, 0.25, compiled=DEVICE == "cuda")
    pos = torch.arange(n, device=DEVICE)[None]
    mask = block_token_mask(blocks, n, n, blk, blk)[:, :, chunk_start:] & causal_visibility(pos[:, chunk_start:], pos)
    want, _, _ = attnkit.dense_attention(query, key, value, mask, 0.25)
    tol = 1e-5 if DTYPE == torch.float32 else 2e-2
    assert torch.allclose(out.float(), want, atol=tol)
    # token lists per KV head (TCA's shape) through the same kernel
    tokens = rand(b, hkv, nb, n, seed=6) > 0.5
    tokens |= block_token_mask(rand(b, hkv, nb, nb, seed=7) > 0.3, nb, n, 1, blk)  # whole blocks: "full" ones
    tokens[..., torch.arange(n, device=DEVICE) // blk == torch.arange(nb, device=DEVICE).view(-1, 1)] = True
    out = flex_block_attention(query, key, value, None, blk, 0.25, compiled=DEVICE == "cuda", tokens=tokens[:, :, first:])
    per_q = tokens.repeat_interleave(blk, 2)[:, :, chunk_start:n].repeat_interleave(h // hkv, 1)
    want, _, _ = attnkit.dense_attention(query, key, value, per_q & causal_visibility(pos[:, chunk_start:], pos), 0.25)
    assert torch.allclose(out.float(), want, atol=tol)


@pytest.mark.parametrize("kind", ["blocks", "tokens"])
@pytest.mark.parametrize("chunk_start", [0, 32])
def test_flex_block_mask_lists_full_blocks_only_where_every_pair_is_visible(kind, chunk_start):
    """The compiled kernel applies no mask_mod on "full" blocks (FlexAttention's eager path applies it everywhere,
    so the kernel test above cannot see a wrong full list): every full block must be visible in each of its
    (query, key) pairs, every chosen block with a visible pair listed once, and nothing else listed."""
    from attnkit.kernels.sparse_prefill import flex_block_mask

    b, h, hkv, n, blk = 1, 4, 2, 96, 16
    q, nb = n - chunk_start, n // blk
    first = chunk_start // blk
    if kind == "blocks":
        bm = flex_block_mask(h, q, n, blk, blocks=(rand(b, h, nb, nb, seed=3) > 0)[:, :, first:])
    else:
        tokens = rand(b, hkv, nb, n, seed=6) > 0.5
        tokens |= block_token_mask(rand(b, hkv, nb, nb, seed=7) > 0.3, nb, n, 1, blk)
        bm = flex_block_mask(h, q, n, blk, tokens=tokens[:, :, first:])
    qi, ki = torch.arange(q, device=DEVICE).view(-1, 1), torch.arange(n, device=DEVICE).view(1, -1)
    full_seen = 0
    for hi in range(h):
        dense = bm.mask_mod(0, hi, qi, ki)  # (q, n) what the query may read
        per_block = dense.view(q // blk, blk, nb, blk)
        for i in range(q // blk):
            partial = set(bm.kv_indices[0, hi, i, : bm.kv_num_blocks[0, hi, i]].tolist())
            full = set(bm.full_kv_indices[0, hi, i, : bm.full_kv_num_blocks[0, hi, i]].tolist())
            assert not partial & full
            for j in full:
                assert bool(per_block[i, :, j].all()), (hi, i, j)
            visible = {j for j in range(nb) if bool(per_block[i, :, j].any())}
            assert visible <= partial | full, (hi, i, visible - partial - full)
            full_seen += len(full)
    assert full_seen > 0  # the case exercises the full lists


@pytest.mark.parametrize("method", ["dhsa", "tca"])
def test_flex_kernel_equals_the_gather_kernel_in_the_model(method):
    """The two kernels of a method give the same logits (FlexAttention eager off CUDA)."""
    model = tiny_llama().to(DEVICE)
    ids = torch.randint(3, 256, (1, 64), generator=torch.Generator().manual_seed(9)).to(DEVICE)
    cfg = {"dhsa": dict(budget=12, block=16, chunk=4, recent=4, sinks=2, dense_tail=2, boundaries="fixed"),
           "tca": dict(block=16, window=8, configs=4)}[method]
    out = {}
    with torch.no_grad():
        for kernel in ("gather", "flex"):
            with attnkit.apply(model, method, kernel=kernel, **cfg):
                out[kernel] = model(ids).logits
    assert torch.allclose(out["gather"].float(), out["flex"].float(), atol=2e-4 if DTYPE == torch.float32 else 5e-2)


@pytest.mark.parametrize("method", ["token_sparse", "dhsa", "rectified", "tca"])
def test_sparse_prefill_reports_the_share_it_read(method):
    """run.stats()["prefill_read_share"]: attended (query, key) pairs over the causal ones, from the recorder's
    masks independently."""
    model = tiny_llama().to(DEVICE)
    ids = torch.randint(3, 256, (1, 64), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    cfg = {"token_sparse": dict(min_tokens=6, window=4, tau=0.4, kernel=3, layers="0-2"),
           "dhsa": dict(budget=12, block=8, chunk=4, recent=3, sinks=2, dense_tail=2, boundaries="fixed"),
           "rectified": dict(block=8, local=0), "tca": dict(block=8, window=8, configs=4)}[method]
    records = []
    with torch.no_grad(), attnkit.apply(model, method, **cfg) as run:
        run.recorder = lambda r: records.append(r)
        model(ids)
        share = run.stats()["prefill_read_share"]
    h = records[0]["query"].shape[1]
    read = sum(float(attnkit.reference.expand_kv(r["mask"], h).expand(-1, h, -1, -1).sum())
               for r in records if r["mask"] is not None)
    dense = sum(h * 64 * 65 / 2 for r in records if r["mask"] is not None)
    assert 0 < share < 1 and abs(share - read / dense) < 1e-6


@pytest.mark.parametrize("kind", ["blocks", "tokens"])
@pytest.mark.parametrize("q,n", [(80, 80), (48, 112), (64, 64)])
def test_compiled_flex_pads_to_few_shapes_and_equals_the_unpadded_kernel(monkeypatch, kind, q, n):
    """The compiled path pads queries and keys at the end to a multiple of FLEX_BUCKET (one kernel per padded
    shape instead of one per prompt length); the padded keys stay invisible and the padded queries are cut off.
    The eager flex_attention stands in for the compiled one."""
    import attnkit.kernels.sparse_prefill as sp
    from torch.nn.attention.flex_attention import flex_attention

    shapes = []

    def fn(query, key, value, **kw):
        shapes.append((query.shape[2], key.shape[2]))
        return flex_attention(query, key, value, **kw)

    monkeypatch.setattr(sp, "_FLEX", {"fn": fn})
    # on CUDA Inductor refuses 16-token blocks (earlier tests add 16 to the refused set): the stand-in never does
    monkeypatch.setattr(sp, "_FLEX_REFUSED", set())
    monkeypatch.setattr(sp, "FLEX_BUCKET", 64)
    b, h, hkv, d, blk = 2, 4, 2, 16, 16
    query, key, value = rand(b, h, q, d), rand(b, hkv, n, d, seed=1), rand(b, hkv, n, d, seed=2)
    nqb, nkb = -(-q // blk), -(-n // blk)
    if kind == "blocks":
        own = torch.arange(nkb, device=DEVICE) == torch.arange(nqb, device=DEVICE).view(-1, 1) + (n - q) // blk
        sel = dict(blocks=(rand(b, hkv, nqb, nkb, seed=3) > 0) | own, tokens=None)  # random blocks + its own
    else:
        tok = rand(b, hkv, nqb, n, seed=4) > 0.3
        own = torch.arange(q, device=DEVICE) // blk == torch.arange(nqb, device=DEVICE).view(-1, 1)
        tok[..., (n - q):][..., own] = True  # each query block reads its own tokens
        sel = dict(blocks=None, tokens=tok)
    want = sp.flex_block_attention(query, key, value, sel["blocks"], blk, 0.25, compiled=False, tokens=sel["tokens"])
    got = sp.flex_block_attention(query, key, value, sel["blocks"], blk, 0.25, compiled=True, tokens=sel["tokens"])
    assert shapes == [(-(-q // 64) * 64, -(-n // 64) * 64)]
    assert torch.allclose(got.float(), want.float(), atol=1e-5 if DTYPE == torch.float32 else 2e-2)


def test_flex_falls_back_to_the_uncompiled_kernel_when_inductor_refuses(monkeypatch):
    import attnkit.kernels.sparse_prefill as sp

    def refuse(*args, **kwargs):
        raise RuntimeError("NoValidChoicesError: No choices to select")

    monkeypatch.setattr(sp, "_FLEX", {"fn": refuse})
    monkeypatch.setattr(sp, "_FLEX_REFUSED", set())
    b, h, hkv, n, d, blk = 1, 4, 2, 32, 16, 4
    query, key, value = rand(b, h, n, d), rand(b, hkv, n, d, seed=1), rand(b, hkv, n, d, seed=2)
    blocks = torch.ones(b, h, n // blk, n // blk, dtype=torch.bool, device=DEVICE)
    with pytest.warns(UserWarning, match="refused 4-token blocks"):
        out = sp.flex_block_attention(query, key, value, blocks, blk, 0.25, compiled=True)
    assert sp._FLEX_REFUSED == {4}
    pos = torch.arange(n, device=DEVICE)[None]
    want, _, _ = attnkit.dense_attention(query, key, value, causal_visibility(pos, pos).expand(b, h, n, n), 0.25)
    assert torch.allclose(out.float(), want, atol=1e-5 if DTYPE == torch.float32 else 2e-2)
    again = sp.flex_block_attention(query, key, value, blocks, blk, 0.25, compiled=True)  # no second try, no warning
    assert torch.equal(again, out)


def test_dhsa_mass_kernels_equal_the_torch_sums():
    """The Triton row log-sum-exp and far-column mass, and mass_ratios through them, against the torch path: on
    CUDA in this process, on the CPU through the Triton interpreter in a subprocess (it must be set before triton
    is imported)."""
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if torch.cuda.is_available():
        from mass_kernel_check import check

        check("cuda")
        check("cuda", torch.bfloat16)
        return
    here = Path(__file__).parent
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{here.parent}{os.pathsep}{here}"}
    done = subprocess.run([sys.executable, str(here / "mass_kernel_check.py")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
