"""attnkit.kernels: the torch path against the dense reference (CPU, always), the Triton kernels (CUDA, or a
small subset through the Triton interpreter on CPU with TRITON_INTERPRET=1)."""

from __future__ import annotations

import importlib.util
import itertools
import os

import pytest
import torch

from attnkit import kernels
from attnkit.kernels import torch_ref
from attnkit.reference import dense_attention


@pytest.mark.parametrize("mask_heads", [None, 1, 2, 8])
def test_reference_equals_a_per_head_loop(mask_heads):
    """dense_attention (and attention_probs, its grouped scoring pass) against one softmax per query head over its
    KV head (h // G), with masks per batch / KV head / query head, soft-capping, a bias and an empty row."""
    from attnkit.reference import attention_probs

    g = torch.Generator().manual_seed(0)
    b, h, hkv, q, n, d = 2, 8, 2, 5, 11, 16
    query, key, value = (torch.randn(b, x, y, d, generator=g) for x, y in ((h, q), (hkv, n), (hkv, n)))
    mask = None if mask_heads is None else torch.rand(b, mask_heads, q, n, generator=g) < 0.6
    if mask is not None:
        mask[:, :, 2] = False  # an empty row: zero output and probabilities
    bias = torch.randn(1, h, 1, n, generator=g)
    out, probs, lse = dense_attention(query, key, value, mask, 0.3, softcap=5.0, bias=bias)
    for bi, hi in itertools.product(range(b), range(h)):
        s = 5.0 * torch.tanh(query[bi, hi] @ key[bi, hi // (h // hkv)].T * 0.3 / 5.0) + bias[0, hi]
        if mask is not None:
            s = s.masked_fill(~mask[bi, hi // (h // mask_heads) if mask_heads > 1 else 0], float("-inf"))
        p = torch.softmax(s, -1).nan_to_num(0.0)
        assert torch.allclose(probs[bi, hi], p, atol=1e-6), (bi, hi)
        assert torch.allclose(out[bi, hi], p @ value[bi, hi // (h // hkv)], atol=1e-5), (bi, hi)
    again, lse2 = attention_probs(query, key, mask, 0.3, softcap=5.0, bias=bias)
    assert torch.equal(again, probs) and torch.equal(lse2, lse)


def make_buffers(
    batch: int, heads: int, kv_heads: int, dim: int, cap: int, dtype: torch.dtype, device: str = "cpu",
    holes: float = 0.2, seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q (B, H, 1, D), k, v (B, Hkv, cap, D) and pos (B, Hkv, cap) with a fraction of -1 holes."""
    gen = torch.Generator().manual_seed(seed)
    # q scaled up so softmaxes are peaked enough for a wrong mask to show.
    q = (2 * torch.randn(batch, heads, 1, dim, generator=gen)).to(device, dtype)
    k = torch.randn(batch, kv_heads, cap, dim, generator=gen).to(device, dtype)
    v = torch.randn(batch, kv_heads, cap, dim, generator=gen).to(device, dtype)
    pos = torch.arange(cap).expand(batch, kv_heads, cap).clone()
    pos[torch.rand(batch, kv_heads, cap, generator=gen) < holes] = -1
    return q, k, v, pos.to(device)


def dense_mask(pos: torch.Tensor, n: int) -> torch.Tensor:
    """(B, Hkv, 1, cap) bool: valid slot below n."""
    return ((pos >= 0) & (torch.arange(pos.shape[-1], device=pos.device) < n)).unsqueeze(2)


def sparse_mask(pos: torch.Tensor, idx: torch.Tensor, page_size: int) -> torch.Tensor:
    """(B, Hkv, 1, cap) bool: valid slot whose page is among idx (built by membership, not by gathering)."""
    page_of_slot = torch.arange(pos.shape[-1], device=pos.device) // page_size
    selected = (page_of_slot[:, None] == idx.unsqueeze(2)).any(-1)  # (B, Hkv, cap)
    return (selected & (pos >= 0)).unsqueeze(2)


def random_pages(batch: int, kv_heads: int, pages: int, k: int, unused: int = 1, seed: int = 0) -> torch.Tensor:
    """(B, Hkv, k) unique page ids, the first ``unused`` entries of each row set to -1."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(pages, generator=gen)[:k] for _ in range(batch * kv_heads)])
    idx = idx.view(batch, kv_heads, -1).clone()
    idx[..., :unused] = -1
    return idx


def assert_close_rel(out: torch.Tensor, ref: torch.Tensor, tol: float) -> None:
    assert torch.isfinite(out).all(), "non-finite output (poisoned memory read back?)"
    err = (out.float() - ref).abs().max().item()
    assert err <= tol * max(ref.abs().max().item(), 1e-3), f"max error {err:.3g}, ref max {ref.abs().max().item():.3g}"


# --------------------------------------------------------------------------------------------------------------
# torch path (CPU, always)


@pytest.mark.parametrize("kv_heads", [8, 2, 1])
@pytest.mark.parametrize("n_as_tensor", [False, True])
def test_torch_decode_matches_reference(kv_heads: int, n_as_tensor: bool) -> None:
    q, k, v, pos = make_buffers(2, 8, kv_heads, 32, 50, torch.float32)
    n = 37
    out = torch_ref.decode_attention(q, k, v, pos, torch.tensor([n]) if n_as_tensor else n, scale=0.3)
    ref = dense_attention(q, k, v, dense_mask(pos, n), scaling=0.3)[0]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_torch_decode_empty_rows_are_zero() -> None:
    q, k, v, pos = make_buffers(2, 4, 2, 16, 20, torch.float32)
    pos[1] = -1
    out = torch_ref.decode_attention(q, k, v, pos, 20)
    assert (out[1] == 0).all() and (out[0] != 0).any()
    assert (torch_ref.decode_attention(q, k, v, pos, 0) == 0).all()


@pytest.mark.parametrize("page_size", [1, 16, 64])
def test_torch_sparse_matches_reference(page_size: int) -> None:
    cap = 150  # not a multiple of 16 or 64: a partial last page
    q, k, v, pos = make_buffers(2, 8, 2, 32, cap, torch.float32)
    pages = -(-cap // page_size)
    idx = random_pages(2, 2, pages, min(5, pages), unused=1)
    out = torch_ref.sparse_decode_attention(q, k, v, pos, idx, page_size)
    ref = dense_attention(q, k, v, sparse_mask(pos, idx, page_size))[0]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def per_head_pages(idx: torch.Tensor, heads: int, seed: int) -> torch.Tensor:
    """(B, H, K) from (B, Hkv, K) page ids: each query head its own shuffle of its KV head's row, one more
    entry unused per head, so the heads of a group read different sets."""
    gen = torch.Generator().manual_seed(seed)
    b, hkv, k = idx.shape
    rows = idx.repeat_interleave(heads // hkv, dim=1).clone()
    for i, j in itertools.product(range(b), range(heads)):
        rows[i, j] = rows[i, j, torch.randperm(k, generator=gen)]
        rows[i, j, j % k] = -1
    return rows


@pytest.mark.parametrize("page_size", [1, 16])
def test_torch_sparse_per_query_head_matches_reference(page_size: int) -> None:
    cap = 150
    q, k, v, pos = make_buffers(2, 8, 2, 32, cap, torch.float32)
    pages = -(-cap // page_size)
    idx = per_head_pages(random_pages(2, 2, pages, min(6, pages), unused=1), 8, seed=1)
    out = torch_ref.sparse_decode_attention(q, k, v, pos, idx, page_size)
    ref = dense_attention(q, k, v, sparse_mask(pos.repeat_interleave(4, dim=1), idx, page_size))[0]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"idx \(2, 3, 6\)"):
        torch_ref.sparse_decode_attention(q, k, v, pos, idx[:, :3], page_size)


def test_torch_decode_attention_mass_is_the_groups_probabilities() -> None:
    q, k, v, pos = make_buffers(2, 8, 2, 16, 50, torch.float32)
    pos[1, :, :45] = -1
    pos[1, 1] = -1  # a KV head with nothing to attend to
    out, mass = torch_ref.decode_attention_mass(q, k, v, pos, 40, scale=0.3)
    ref, probs, _ = dense_attention(q, k[:, :, :40], v[:, :, :40], dense_mask(pos[:, :, :40], 40), scaling=0.3)
    torch.testing.assert_close(out, ref.float(), atol=1e-5, rtol=1e-5)
    want = probs.nan_to_num(0.0).sum(2).view(2, 2, 4, 40).sum(2)
    torch.testing.assert_close(mass, want, atol=1e-5, rtol=1e-5)
    assert (mass[1, 1] == 0).all() and torch.allclose(mass[0].sum(-1), torch.full((2,), 4.0))


def test_torch_out_buffer_is_written() -> None:
    q, k, v, pos = make_buffers(1, 4, 1, 16, 30, torch.float32)
    out = torch.full_like(q, float("nan"))
    result = kernels.decode_attention(q, k, v, pos, 30, out=out)
    assert result.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, torch_ref.decode_attention(q, k, v, pos, 30))


def naive_quest(q: torch.Tensor, summary: torch.Tensor) -> torch.Tensor:
    batch, heads = q.shape[:2]
    _, kv_heads, pages = summary.shape[:3]
    group = heads // kv_heads
    scores = torch.empty(batch, kv_heads, pages)
    for b, h, p in itertools.product(range(batch), range(kv_heads), range(pages)):
        kmax, kmin = summary[b, h, p, 0].float(), summary[b, h, p, 1].float()
        if torch.isinf(kmax).all():
            scores[b, h, p] = float("-inf")
            continue
        qg = q[b, h * group : (h + 1) * group, 0].float()
        scores[b, h, p] = torch.maximum(qg * kmax, qg * kmin).sum()
    return scores


def test_quest_scores_match_naive_bound() -> None:
    q, k, v, pos = make_buffers(2, 8, 2, 16, 70, torch.float32)
    pos[0, 0, 16:32] = -1  # page 1 of row 0, head 0 empty
    summary = kernels.page_summaries(k, pos, 16)
    assert summary.shape == (2, 2, 5, 2, 16)
    scores = kernels.quest_scores(q, summary)
    torch.testing.assert_close(scores, naive_quest(q, summary), atol=1e-4, rtol=1e-5)
    assert scores[0, 0, 1] == float("-inf") and torch.isfinite(scores[1]).all()
    # It is an upper bound of every valid key's q.k in the page, for each head of the group.
    qk = torch.einsum("bhgd,bhnd->bhgn", q.view(2, 2, 4, 16), k).sum(2)  # group-summed q.k per slot
    for p in range(5):
        keys = slice(16 * p, 16 * (p + 1))
        ok = pos[..., keys] >= 0
        assert (qk[..., keys].masked_fill(~ok, float("-inf")).amax(-1) <= scores[..., p] + 1e-4).all()


def test_update_page_summary_matches_recompute() -> None:
    _, k, _, _ = make_buffers(2, 4, 2, 8, 40, torch.float32)
    page_size = 8
    pos = torch.full((2, 2, 40), -1)
    summary = kernels.page_summaries(k, pos, page_size)
    assert (summary[..., 0, :] == float("-inf")).all() and (summary[..., 1, :] == float("inf")).all()
    for slot in [0, 1, 7, 8, 9, 33, 39]:
        pos[..., slot] = slot
        kernels.update_page_summary(summary, k[:, :, slot : slot + 1], torch.tensor(slot), page_size)
        torch.testing.assert_close(summary, kernels.page_summaries(k, pos, page_size))


def test_topk_pages_rules() -> None:
    scores = torch.tensor([[[5.0, 1.0, 4.0, 3.0, 9.0, 8.0]]])
    idx = kernels.topk_pages(scores, 2, 4, force_last=False)  # pages 4, 5 excluded
    assert sorted(idx.flatten().tolist()) == [0, 2]
    idx = kernels.topk_pages(scores, 2, torch.tensor([4]), force_last=True)  # page 3 forced in
    assert sorted(idx.flatten().tolist()) == [0, 3]
    idx = kernels.topk_pages(scores, 4, 2, force_last=True)  # only 2 selectable pages: pad with -1
    assert sorted(idx.flatten().tolist()) == [-1, -1, 0, 1]
    idx = kernels.topk_pages(scores, 8, 6, force_last=False)  # k > P
    assert sorted(idx.flatten().tolist()) == [-1, -1, 0, 1, 2, 3, 4, 5]
    empty = torch.tensor([[[float("-inf"), 2.0, float("-inf")]]])  # pages without valid keys are never taken
    assert sorted(kernels.topk_pages(empty, 2, 3, force_last=False).flatten().tolist()) == [-1, 1]
    assert (kernels.topk_pages(scores, 3, 0, force_last=True) == -1).all()


def test_backend_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    assert kernels.backend("cpu") == "torch"
    monkeypatch.setenv("ATTNKIT_KERNELS", "torch")
    assert kernels.backend("cuda") == "torch"


# --------------------------------------------------------------------------------------------------------------
# Triton kernels: swept on CUDA; a small subset on CPU through the interpreter (TRITON_INTERPRET=1).

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" and HAS_TRITON
ON_GPU = torch.cuda.is_available() and HAS_TRITON
TRITON_DEVICE = "cuda" if ON_GPU else "cpu"
needs_triton = pytest.mark.skipif(
    not (ON_GPU or INTERPRET),
    reason="Triton kernels need a CUDA GPU; the torch path above is what CPU and CI use",
)
TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-4}

if ON_GPU:
    # The sweep of the brief; batch and GQA ratio cycle with the case index to keep the count moderate.
    DTYPES = [torch.bfloat16, torch.float16]
    DENSE_CASES = [
        (length, ratio, dim, dtype, 1 + 2 * (i % 2))
        for i, (length, ratio, dim, dtype) in enumerate(
            itertools.product([1, 77, 1000, 4099], [1, 4, 8], [64, 128, 256], DTYPES)
        )
    ]
    SPARSE_CASES = [
        (length, [1, 4, 8][i % 3], dim, dtype, 1 + 2 * (i % 2), page)
        for i, (length, dim, dtype, page) in enumerate(
            itertools.product([1, 77, 1000, 4099], [64, 128, 256], DTYPES, [1, 16, 64])
        )
    ]
else:
    # The interpreter computes bf16 tl.dot wrongly (numpy has no bf16), so it checks fp16 and fp32.
    DENSE_CASES = [(77, 4, 64, torch.float16, 3), (200, 1, 128, torch.float32, 1), (1, 8, 64, torch.float32, 1)]
    SPARSE_CASES = [
        (77, 4, 64, torch.float16, 3, 16),
        (300, 8, 128, torch.float32, 1, 1),
        (150, 1, 64, torch.float32, 1, 64),
    ]


def _triton():
    from attnkit.kernels import triton_decode

    return triton_decode


def _poison(like: torch.Tensor) -> torch.Tensor:
    """A NaN-filled buffer like ``like``; also leaves freed NaN memory for the kernels' scratch allocations."""
    scratch = torch.full((1 << 20,), float("nan"), device=like.device)
    del scratch
    return torch.full_like(like, float("nan"))


@needs_triton
@pytest.mark.parametrize("length,ratio,dim,dtype,batch", DENSE_CASES)
def test_triton_dense(length: int, ratio: int, dim: int, dtype: torch.dtype, batch: int) -> None:
    kv_heads = 2
    cap = length + 37  # slots past n hold data that must be ignored
    q, k, v, pos = make_buffers(batch, kv_heads * ratio, kv_heads, dim, cap, dtype, TRITON_DEVICE, seed=length)
    if batch > 1:
        pos[1] = -1  # a row with nothing to attend to
    n = torch.tensor([length], device=TRITON_DEVICE, dtype=torch.int32)
    out = _triton().decode_attention(q, k, v, pos, n, out=_poison(q))
    ref = dense_attention(q, k, v, dense_mask(pos, length))[0]
    assert_close_rel(out, ref, TOL[dtype])
    out_int = _triton().decode_attention(q, k, v, pos, length, out=_poison(q))
    assert_close_rel(out_int, ref, TOL[dtype])


@needs_triton
@pytest.mark.parametrize("length,ratio,dim,dtype,batch,page", SPARSE_CASES)
def test_triton_sparse(length: int, ratio: int, dim: int, dtype: torch.dtype, batch: int, page: int) -> None:
    kv_heads = 2
    q, k, v, pos = make_buffers(batch, kv_heads * ratio, kv_heads, dim, length, dtype, TRITON_DEVICE, seed=length)
    pages = -(-length // page)
    select = min(pages, 40 if page == 1 else 9)
    idx = random_pages(batch, kv_heads, pages, select, unused=1 if select > 1 else 0, seed=length).to(TRITON_DEVICE)
    ref = dense_attention(q, k, v, sparse_mask(pos, idx, page))[0]
    for ids in (idx, idx.int()):
        out = _triton().sparse_decode_attention(q, k, v, pos, ids, page, out=_poison(q))
        assert_close_rel(out, ref, TOL[dtype])


@needs_triton
@pytest.mark.parametrize("length,ratio,dim,dtype,batch,page", SPARSE_CASES)
def test_triton_sparse_per_query_head(length: int, ratio: int, dim: int, dtype: torch.dtype, batch: int,
                                      page: int) -> None:
    kv_heads = 2
    heads = kv_heads * ratio
    q, k, v, pos = make_buffers(batch, heads, kv_heads, dim, length, dtype, TRITON_DEVICE, seed=length)
    pages = -(-length // page)
    select = min(pages, 40 if page == 1 else 9)
    idx = per_head_pages(random_pages(batch, kv_heads, pages, select, unused=0, seed=length), heads, seed=length)
    idx = idx.to(TRITON_DEVICE)
    ref = dense_attention(q, k, v, sparse_mask(pos.repeat_interleave(ratio, dim=1), idx, page))[0]
    out = _triton().sparse_decode_attention(q, k, v, pos, idx, page, out=_poison(q))
    assert_close_rel(out, ref, TOL[dtype])


@needs_triton
@pytest.mark.parametrize("n,ratio,dim,batch", [(77, 4, 64, 1), (300, 1, 128, 2)] if not ON_GPU else
                         [(77, 4, 64, 1), (300, 1, 128, 2), (2049, 4, 128, 1), (1000, 8, 256, 2), (513, 8, 64, 3)])
def test_triton_decode_attention_mass(n: int, ratio: int, dim: int, batch: int) -> None:
    dtype = torch.float16
    q, k, v, pos = make_buffers(batch, 2 * ratio, 2, dim, n + 9, dtype, TRITON_DEVICE, seed=n)
    if batch > 1:
        pos[1, 0] = -1  # a KV head with nothing to attend to
    out, mass = _triton().decode_attention_mass(q, k, v, pos, n, scale=0.2)
    ref_out, ref_mass = torch_ref.decode_attention_mass(q.float(), k.float(), v.float(), pos, n, scale=0.2)
    assert_close_rel(out, ref_out, TOL[dtype])
    torch.testing.assert_close(mass, ref_mass, atol=2e-3, rtol=2e-2)


@needs_triton
def test_triton_matches_quest_pipeline() -> None:
    """Selection + sparse kernel end to end against the torch path, with the dispatching API."""
    dtype = torch.float16
    q, k, v, pos = make_buffers(1, 8, 2, 64, 200, dtype, TRITON_DEVICE)
    summary = kernels.page_summaries(k, pos, 16)
    idx = kernels.topk_pages(kernels.quest_scores(q, summary), 4, 13, force_last=True)
    out = _triton().sparse_decode_attention(q, k, v, pos, idx, 16)
    ref = torch_ref.sparse_decode_attention(q.float(), k.float(), v.float(), pos, idx, 16)
    assert_close_rel(out, ref, TOL[dtype])


# --------------------------------------------------------------------------------------------------------------
# Fused Quest scoring (attnkit.kernels.triton_select) and select_pages.


def _select():
    from attnkit.kernels import triton_select

    return triton_select


def masked_reference(q: torch.Tensor, summary: torch.Tensor, n_valid: int, force_last: bool) -> torch.Tensor:
    """topk_pages' masked scores of quest_scores, from an fp32 copy of the summary (the kernel accumulates in fp32)."""
    scores = torch_ref.quest_scores(q.float(), summary.float())
    page_ids = torch.arange(scores.shape[-1], device=scores.device)
    scores = scores.masked_fill(page_ids >= n_valid, float("-inf"))
    if force_last:
        scores = scores.masked_fill(page_ids == n_valid - 1, float("inf"))
    return scores


if ON_GPU:
    SELECT_CASES = [
        (cap, ratio, dim, dtype, 1 + (i % 2), page)
        for i, (cap, ratio, dim, dtype, page) in enumerate(
            itertools.product([1, 200, 5000], [1, 4, 8], [64, 128, 256], DTYPES, [16, 64])
        )
    ]
else:
    SELECT_CASES = [(200, 4, 64, torch.float16, 2, 16), (150, 1, 128, torch.float32, 1, 64)]


@needs_triton
@pytest.mark.parametrize("cap,ratio,dim,dtype,batch,page", SELECT_CASES)
def test_triton_quest_scores_masked(cap: int, ratio: int, dim: int, dtype: torch.dtype, batch: int, page: int) -> None:
    kv_heads = 2
    q, k, _, pos = make_buffers(batch, kv_heads * ratio, kv_heads, dim, cap, dtype, TRITON_DEVICE, seed=cap)
    pages = -(-cap // page)
    if pages > 2:
        pos[0, 0, page : 2 * page] = -1  # an empty page inside the valid range
    summary = torch_ref.page_summaries(k, pos, page).contiguous()
    for n_valid, force in [(pages, True), (max(1, pages - 2), False), (max(1, pages // 2), True), (0, True)]:
        ref = masked_reference(q, summary, n_valid, force)
        n_dev = torch.tensor([n_valid], device=TRITON_DEVICE, dtype=torch.int32)
        for n_arg in (n_valid, n_dev):
            out = torch.full((batch, kv_heads, pages), float("nan"), device=TRITON_DEVICE)
            got = _select().quest_scores_masked(q, summary, n_arg, force, out=out)
            assert got.data_ptr() == out.data_ptr() and got.dtype == torch.float32
            inf = torch.isinf(ref)
            assert torch.equal(torch.isinf(got), inf) and torch.equal(got[inf], ref[inf])
            scale = ref[~inf].abs().max().item() if (~inf).any() else 1.0
            assert ((got[~inf] - ref[~inf]).abs() <= 1e-4 * max(scale, 1.0)).all()


def test_select_pages_matches_topk_pages() -> None:
    """Same selected set as quest_scores + topk_pages (random fp32 data: no ties), on whatever path dispatches."""
    device = "cuda" if ON_GPU else "cpu"
    for dtype in ([torch.bfloat16, torch.float16] if ON_GPU else [torch.float32]):
        q, k, _, pos = make_buffers(2, 8, 2, 64, 300, dtype, device, seed=3)
        summary = torch_ref.page_summaries(k, pos, 16)  # 19 pages
        for kk, n_valid, force in [(4, 19, True), (4, 10, False), (30, 19, True), (5, 0, True)]:
            n_arg = torch.tensor([n_valid], device=device) if kk == 4 else n_valid
            got = kernels.select_pages(q, summary, kk, n_arg, force_last=force)
            ref = torch_ref.topk_pages(masked_reference(q, summary, 19, False), kk, n_valid, force)
            assert got.shape == (2, 2, kk)
            assert torch.equal(got.sort(-1).values.cpu(), ref.sort(-1).values.cpu())


@needs_triton
def test_triton_select_pages_matches_topk_pages() -> None:
    """The Triton scoring + torch.topk against topk_pages on random scores without ties."""
    dtype = torch.float16 if INTERPRET and not ON_GPU else torch.bfloat16
    q, k, _, pos = make_buffers(1, 8, 2, 64, 400, dtype, TRITON_DEVICE, seed=5)
    pos[0, 1, :64] = -1  # pages 0-3 of head 1 empty
    summary = torch_ref.page_summaries(k, pos, 16)  # 25 pages
    for kk, n_valid, force in [(6, 25, True), (6, 11, False), (40, 25, True)]:
        got = _select().select_pages(q, summary, kk, torch.tensor([n_valid], device=TRITON_DEVICE), force)
        ref = torch_ref.topk_pages(masked_reference(q, summary, 25, False), kk, n_valid, force)
        assert torch.equal(got.sort(-1).values.cpu(), ref.sort(-1).values.cpu())


@needs_triton
def test_triton_topk_bisect_matches_topk_pages() -> None:
    """One-program bisection top-k == torch top-k as sets, with -inf (invalid), +inf (forced) and k > valid."""
    from attnkit.kernels.triton_select import topk_bisect

    g = torch.Generator().manual_seed(7)
    cases = [(10, 4), (300, 128), (5, 8)] if INTERPRET and not ON_GPU else [(10, 4), (300, 128), (5, 8), (2048, 32), (8192, 128), (16384, 32)]
    for pages, k in cases:
        scores = torch.randn(3, pages, generator=g)
        scores[0, : pages // 3] = float("-inf")
        scores[1, 2] = float("inf")
        scores[2, : max(0, pages - 2)] = float("-inf") if pages < 50 else scores[2, : max(0, pages - 2)]
        got = topk_bisect(scores.to(TRITON_DEVICE), k).cpu()
        want = torch_ref.topk_pages(scores, k, pages, force_last=False)
        assert torch.equal(got.sort(-1).values, want.sort(-1).values), f"P={pages}, k={k}"


def test_torch_tokenselect_votes_are_summed_head_softmaxes() -> None:
    q, k, _, pos = make_buffers(2, 8, 2, 16, 60, torch.float32)
    pos = pos[:, :1].expand(-1, 2, -1).contiguous()  # TokenSelect's full cache: one layout for all KV heads
    hi = torch.tensor([[40], [25]])
    votes = torch_ref.tokenselect_votes(q, k, pos, 3, hi, 50)
    for b in range(2):
        cand = (pos[b, 0, :50] >= 3) & (pos[b, 0, :50] < hi[b, 0])
        want = torch.zeros(50)
        for h in range(8):
            s = (q[b, h, 0] @ k[b, h // 4, :50].T).masked_fill(~cand, float("-inf"))
            want += s.softmax(-1)
        assert torch.allclose(votes[b][cand], want[cand], atol=1e-5)
        assert torch.isneginf(votes[b][~cand]).all()


def test_torch_head_scores_are_each_heads_raw_scores() -> None:
    q, k, _, pos = make_buffers(2, 8, 2, 16, 60, torch.float32)
    pos = pos[:, :1].expand(-1, 2, -1).contiguous()
    hi = torch.tensor([[40], [25]])
    scores = torch_ref.head_scores(q, k, pos, 3, hi, 50)
    assert scores.shape == (2, 8, 50)
    for b, h in itertools.product(range(2), range(8)):
        cand = (pos[b, 0, :50] >= 3) & (pos[b, 0, :50] < hi[b, 0])
        want = (q[b, h, 0] @ k[b, h // 4, :50].T).masked_fill(~cand, float("-inf"))
        torch.testing.assert_close(scores[b, h], want, atol=1e-5, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("ratio,dim,batch", [(4, 64, 1), (1, 128, 2)] if not ON_GPU else
                         [(4, 64, 1), (1, 128, 2), (4, 128, 1), (8, 256, 2)])
def test_triton_head_scores_match_torch(ratio: int, dim: int, batch: int) -> None:
    from attnkit.kernels import triton_select

    q, k, _, pos = make_buffers(batch, 2 * ratio, 2, dim, 300, torch.float16, TRITON_DEVICE, seed=dim)
    pos = pos[:, :1].expand(-1, 2, -1).contiguous()
    hi = torch.tensor([[250], [90]][:batch], device=TRITON_DEVICE)
    got = triton_select.head_scores(q, k, pos, 2, hi, 280)
    want = torch_ref.head_scores(q, k, pos, 2, hi, 280)
    assert torch.equal(torch.isneginf(got), torch.isneginf(want))
    fin = torch.isfinite(want)
    torch.testing.assert_close(got[fin], want[fin], atol=2e-2, rtol=2e-3)


TS_CASES = (
    [(cap, ratio, dim, dtype, batch) for cap, ratio, dim, dtype, batch in
     [(77, 4, 64, torch.bfloat16, 1), (1000, 1, 128, torch.float16, 3), (4099, 8, 128, torch.bfloat16, 1),
      (4099, 4, 256, torch.bfloat16, 2), (300, 8, 64, torch.float16, 1)]]
    if ON_GPU else [(77, 4, 64, torch.float16, 1), (90, 2, 64, torch.float16, 2)]
)


@needs_triton
@pytest.mark.parametrize("cap,ratio,dim,dtype,batch", TS_CASES)
def test_triton_tokenselect_votes_match_torch(cap: int, ratio: int, dim: int, dtype: torch.dtype, batch: int) -> None:
    from attnkit.kernels import triton_select

    kv_heads = 2
    q, k, _, pos = make_buffers(batch, kv_heads * ratio, kv_heads, dim, cap, dtype, TRITON_DEVICE, seed=cap)
    pos = pos[:, :1].expand(-1, kv_heads, -1).contiguous()
    span = cap - 3  # slots past the span are never candidates
    hi = torch.tensor([[cap - 9 - 5 * b] for b in range(batch)], device=TRITON_DEVICE)
    got = triton_select.tokenselect_votes(q, k, pos, 4, hi, span)
    want = torch_ref.tokenselect_votes(q, k, pos, 4, hi, span)
    assert torch.equal(torch.isneginf(got), torch.isneginf(want))
    fin = torch.isfinite(want)
    assert torch.allclose(got[fin], want[fin], rtol=1e-3, atol=1e-5), (got[fin] - want[fin]).abs().max()
    if batch > 1:  # skipped rows are left alone, the others are unchanged
        skip = torch.zeros(batch, dtype=torch.bool, device=TRITON_DEVICE)
        skip[0] = True
        again = triton_select.tokenselect_votes(q, k, pos, 4, hi, span, skip=skip)
        assert torch.equal(again[1:], got[1:])


@needs_triton
@pytest.mark.parametrize("heads,kv_heads,splits", [(8, 2, 3), (32, 8, 5), (64, 8, 1)])
def test_triton_votes_kernel_matches_torch(heads: int, kv_heads: int, splits: int) -> None:
    """The votes stage alone, from torch-made scores and split statistics (runs in the interpreter too)."""
    from attnkit.kernels import triton_select

    batch, cap, dim = 2, 150, 64
    q, k, _, pos = make_buffers(batch, heads, kv_heads, dim, cap, torch.bfloat16, TRITON_DEVICE, seed=heads)
    pos = pos[:, :1].expand(-1, kv_heads, -1).contiguous()
    span, lo = cap - 3, 4
    hi = torch.tensor([cap - 9, cap - 40], device=TRITON_DEVICE)
    kpos = pos[:, 0, :span]
    cand = (kpos >= lo) & (kpos < hi.view(-1, 1))
    group = heads // kv_heads
    scores = torch.matmul(q.float().reshape(batch, kv_heads, group, dim), k[:, :, :span].float().transpose(-1, -2))
    scores = scores.masked_fill(~cand.view(batch, 1, 1, span), float("-inf")).contiguous()
    bounds = torch.linspace(0, span, splits + 1).long().tolist()
    parts = [scores[..., a:b] for a, b in zip(bounds, bounds[1:])]
    m = torch.stack([p.amax(-1) for p in parts], -1)
    safe = torch.where(m == float("-inf"), 0.0, m)
    l = torch.stack([torch.exp(p - s.unsqueeze(-1)).sum(-1) for p, s in zip(parts, safe.unbind(-1))], -1)
    got = triton_select.votes_from_scores(scores, m.contiguous(), l.contiguous(), pos, lo, hi)
    want = torch_ref.tokenselect_votes(q, k, pos, lo, hi.view(-1, 1), span)
    assert torch.equal(torch.isneginf(got), torch.isneginf(want))
    fin = torch.isfinite(want)
    assert torch.allclose(got[fin], want[fin], rtol=1e-4, atol=1e-6), (got[fin] - want[fin]).abs().max()


@pytest.mark.parametrize("q,n", [(6, 6), (5, 17), (1, 9)])
def test_split_causal_is_bottom_right_causal(q: int, n: int) -> None:
    """The cuDNN prefill's split (older keys unmasked + the chunk's square causal block, merged by log-sum-exp)
    with a float32 kernel standing in for cuDNN, against one bottom-right causal attention."""
    from attnkit.hf.attention import split_causal

    def attend(query, key, value, causal, scaling):
        m = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool)
        out, _, lse = dense_attention(query, key, value, (m.tril() if causal else m)[None, None], scaling)
        return out, lse

    gen = torch.Generator().manual_seed(n)
    query, key, value = (torch.randn(2, x, y, 16, generator=gen) for x, y in ((8, q), (2, n), (2, n)))
    mask = (torch.arange(n).view(1, -1) <= torch.arange(n - q, n).view(-1, 1))[None, None]
    want, _, _ = dense_attention(query, key, value, mask, 0.3)
    assert torch.allclose(split_causal(attend, query, key, value, 0.3), want, atol=1e-6)


@pytest.mark.parametrize("hkv", [1, 2])
def test_masked_sdpa_one_kv_head_takes_a_fused_kernel(monkeypatch, hkv: int) -> None:
    """Grouped KV heads under a mask reach SDPA with the query's head count, one KV head included (Gemma-3-270M:
    left at one head, the fused kernels refused the unequal counts and every masked chunk ran the float32 math
    path). On CUDA only the memory-efficient kernel is allowed, so a refusal raises; equal to the reference."""
    from attnkit.hf import attention

    dev = "cuda" if ON_GPU else "cpu"
    dt = torch.bfloat16 if ON_GPU else torch.float32
    gen = torch.Generator().manual_seed(5)
    b, h, n, d = 2, 4, 200, 64
    query, key, value = (torch.randn(b, x, n, d, generator=gen).to(dev, dt) for x in (h, hkv, hkv))
    pos = torch.arange(n)
    mask = ((pos.view(n, 1) >= pos.view(1, n)) & (pos.view(1, n) >= pos.view(n, 1) - 30)).expand(b, 1, n, n).to(dev)
    seen = []
    real = attention.F.scaled_dot_product_attention
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: seen.append((k.shape[1], kw["enable_gqa"])) or real(q, k, v, **kw))
    if ON_GPU:
        monkeypatch.setattr(attention, "_BACKENDS", [torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION])
    got = attention._sdpa(query, key, value, mask, 0.125, False)
    want, _, _ = dense_attention(query.float(), key.float(), value.float(), mask, 0.125)
    assert seen == ([(h, False)] if ON_GPU else [(hkv, True)])
    assert torch.allclose(got.float(), want, atol=2e-2 if ON_GPU else 1e-5), (got.float() - want).abs().max()
    one = attention.per_head(key, h)
    assert one.shape == (b, h, n, d) and torch.equal(one[:, -1], key[:, -1 if hkv == 1 else 1])


@pytest.mark.parametrize("mask_kind", ["window", "padded_window", "per_kv_head"])
def test_masked_sdpa_in_query_chunks_equals_one_call(monkeypatch, mask_kind: str) -> None:
    """A masked attention whose scores pass MASKED_SCORE_BYTES runs in query chunks, each over the key columns
    its mask opens: a sliding window (Gemma-3's local layers), the same under left padding (pad queries see
    everything), a mask per KV head; equal to the dense reference."""
    from attnkit.hf import attention

    dev = "cuda" if ON_GPU else "cpu"
    gen = torch.Generator().manual_seed(3)
    b, h, hkv, n, d, window = 2, 8, 2, 300, 32, 40
    query, key, value = (torch.randn(b, x, n, d, generator=gen).to(dev) for x in (h, hkv, hkv))
    qpos = torch.arange(n).view(1, n).repeat(b, 1)
    if mask_kind == "padded_window":
        qpos[1] = torch.arange(n) - 37  # row 1: 37 pad slots (position < 0) on the left
    kpos = qpos.clone()
    qq, k = qpos.view(b, 1, n, 1), kpos.view(b, 1, 1, n)
    mask = (k <= qq) & (k >= qq - window) & (k >= 0) | (qq < 0)
    if mask_kind == "per_kv_head":
        mask = mask.repeat(1, hkv, 1, 1)
        mask[:, 1, :, :5] = True  # the second KV head also keeps 5 sinks
    mask = mask.to(dev)
    want, _, _ = dense_attention(query.float(), key.float(), value.float(), mask, 0.2)
    one = attention.sdpa(query, key, value, mask, 0.2)
    monkeypatch.setattr(attention, "MASKED_SCORE_BYTES", b * h * n * 4 * 64)  # 64 query rows per chunk
    calls = []
    real = attention._sdpa
    monkeypatch.setattr(attention, "_sdpa", lambda *a: calls.append(a[1].shape[2]) or real(*a))
    got = attention.sdpa(query, key, value, mask, 0.2)
    assert len(calls) == 5  # five chunks, each over fewer keys than the cache (but pad queries see them all)
    assert (calls[-1] if mask_kind == "padded_window" else max(calls)) <= 64 + window + 5
    tol = 1e-4 if ON_GPU else 1e-5  # float32 on CUDA: the fused kernels' own summation order
    assert torch.allclose(one, want, atol=tol) and torch.allclose(got, want, atol=tol), (got - want).abs().max()


def test_masked_score_bytes_knob_refuses_a_bad_value() -> None:
    import subprocess
    import sys

    env = {**os.environ, "ATTNKIT_MASKED_SCORE_BYTES": "1e9"}
    out = subprocess.run([sys.executable, "-c", "import attnkit.hf.attention"], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "ATTNKIT_MASKED_SCORE_BYTES='1e9' is invalid; accepted: a number of bytes >= 1" \
        in out.stderr


def test_prefill_kernel_names_the_accepted_values(monkeypatch) -> None:
    from attnkit.hf.attention import prefill_kernel

    assert prefill_kernel() == "flash"
    monkeypatch.setenv("ATTNKIT_PREFILL_KERNEL", "cudnn")
    assert prefill_kernel() == "cudnn"
    monkeypatch.setenv("ATTNKIT_PREFILL_KERNEL", "fa3")
    with pytest.raises(ValueError, match="ATTNKIT_PREFILL_KERNEL='fa3' is not a prefill kernel; accepted: flash, "
                                         "cudnn"):
        prefill_kernel()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the flash prefill path runs on CUDA only (CPU uses SDPA)")
@pytest.mark.parametrize("kernel", ["flash", "cudnn"])
@pytest.mark.parametrize("q,n,heads,kv_heads,dim", [(64, 64, 8, 8, 64), (100, 1000, 32, 8, 128), (1, 300, 8, 2, 128),
                                                    (512, 4099, 16, 2, 256), (7, 9, 4, 1, 64)])
def test_flash_prefill_is_bottom_right_causal(q: int, n: int, heads: int, kv_heads: int, dim: int, kernel: str,
                                              monkeypatch) -> None:
    import warnings

    from attnkit.hf.attention import causal_prefill

    monkeypatch.setenv("ATTNKIT_PREFILL_KERNEL", kernel)
    gen = torch.Generator().manual_seed(q + n)
    query = torch.randn(2, heads, q, dim, generator=gen).cuda().bfloat16()
    key = torch.randn(2, kv_heads, n, dim, generator=gen).cuda().bfloat16()
    value = torch.randn(2, kv_heads, n, dim, generator=gen).cuda().bfloat16()
    mask = (torch.arange(n).view(1, -1) <= torch.arange(n - q, n).view(-1, 1)).cuda().view(1, 1, q, n)
    want, _, _ = dense_attention(query, key, value, mask, dim**-0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # cuDNN refusing a shape (its fallback warning) fails the test
        got = causal_prefill(query, key, value, dim**-0.5)
    assert_close_rel(got.float(), want.float(), TOL[torch.bfloat16])


@needs_triton
def test_fused_cache_append_and_ring_match_the_torch_path() -> None:
    """The fused bookkeeping kernels against the torch ops they replace (append: scatters and a sink original;
    ring: advance, rescue of a short row's sink, free, and the StreamingLLM sink turn)."""
    from attnkit.hf.cache import WindowLayer
    from attnkit.kernels import triton_cache

    dev, dtype = TRITON_DEVICE, torch.float16
    gen = torch.Generator().manual_seed(0)
    b, h, cap, d, s, w = 2, 3, 24, 64, 4, 10
    keys = torch.randn(b, h, cap, d, generator=gen).to(dev, dtype)
    vals = torch.randn(b, h, cap, d, generator=gen).to(dev, dtype)
    pos = torch.randint(-1, 30, (b, h, cap), generator=gen).to(dev)
    kn = torch.randn(b, h, 1, d, generator=gen).to(dev, dtype)
    vn = torch.randn(b, h, 1, d, generator=gen).to(dev, dtype)
    wslot = torch.tensor([[[5], [7], [s + w]], [[s], [9], [2]]], device=dev)
    qpos = torch.tensor([[2], [17]], device=dev)
    sk = torch.zeros(b, h, s + 1, d, device=dev)
    k1, v1, p1, s1 = keys.clone(), vals.clone(), pos.clone(), sk.clone()
    triton_cache.append(k1, v1, p1, kn, vn, wslot, qpos, s1[:, :, :s], s)
    k2, v2, p2, s2 = keys.clone(), vals.clone(), pos.clone(), sk.clone()
    k2.scatter_(2, wslot.unsqueeze(-1).expand(b, h, 1, d), kn)
    v2.scatter_(2, wslot.unsqueeze(-1).expand(b, h, 1, d), vn)
    p2.scatter_(2, wslot, qpos.view(b, 1, 1).expand(b, h, 1))
    s2[0, :, 2] = kn[0, :, 0].float()  # row 0's token is at position 2 < sinks; row 1's is not a sink
    assert torch.equal(k1, k2) and torch.equal(v1, v2) and torch.equal(p1, p2) and torch.equal(s1, s2)

    inv = (1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))).to(dev)
    count = torch.tensor([[40], [3]], device=dev)
    pos[1, 0, s] = 1  # a short row's sink in the ring, in the slot the ring reuses next
    sinks = torch.randn(b, h, s + 1, d, generator=gen).to(dev)
    got = [keys.clone(), vals.clone(), pos.clone(), torch.full_like(wslot, s + w)]
    triton_cache.ring_after(*got, count, s, w, sinks[:, :, :s], inv)
    layer = WindowLayer(w, s, 0, None, rope_inv_freq=inv)
    want = [keys.clone(), vals.clone(), pos.clone(), torch.full_like(wslot, s + w)]
    layer.keys, layer.values, layer.pos, layer.wslot = want
    layer.count, layer.device = count, torch.device(dev)
    layer.sink_keys, layer._sink_scratch = sinks[:, :, :s], sinks
    import attnkit.kernels as kernels_mod

    original = kernels_mod.fused_cache
    kernels_mod.fused_cache = lambda *a: None  # the torch path, also on the GPU
    try:
        layer.static_after()
    finally:
        kernels_mod.fused_cache = original
    assert_close_rel(got[0].float(), want[0].float(), 1e-3)
    for g, wnt in zip(got[1:], want[1:]):
        assert torch.equal(g, wnt)


@needs_triton
def test_fused_append_folds_the_key_into_its_page_summary() -> None:
    """Quest's static append: the key joins the max / min of page qpos // page of its row (per row, per KV head)."""
    from attnkit.kernels import triton_cache

    dev, dtype = TRITON_DEVICE, torch.float16
    gen = torch.Generator().manual_seed(1)
    b, h, cap, d, page = 2, 3, 64, 64, 16
    keys = torch.randn(b, h, cap, d, generator=gen).to(dev, dtype)
    vals, pos = torch.randn(b, h, cap, d, generator=gen).to(dev, dtype), torch.full((b, h, cap), -1, device=dev)
    kn = (3 * torch.randn(b, h, 1, d, generator=gen)).to(dev, dtype)
    summary = torch.randn(b, h, cap // page, 2, d, generator=gen).to(dev, dtype)
    summary[:, :, :, 1] -= 2  # min below max
    summary[1, :, 1, 0], summary[1, :, 1, 1] = float("-inf"), float("inf")  # an empty page
    qpos = torch.tensor([[37], [16]], device=dev)
    wslot = torch.tensor([[[40]] * h, [[20]] * h], device=dev)
    got = summary.clone()
    triton_cache.append(keys.clone(), vals, pos.clone(), kn, kn, wslot, qpos, summary=got, page=page)
    want = summary.clone()
    for row, p in enumerate(qpos.view(-1).tolist()):
        want[row, :, p // page, 0] = torch.maximum(want[row, :, p // page, 0], kn[row, :, 0])
        want[row, :, p // page, 1] = torch.minimum(want[row, :, p // page, 1], kn[row, :, 0])
    assert torch.equal(got, want)


# --------------------------------------------------------------------------------------------------------------
# Quest's fused decode step (attnkit.kernels.triton_quest.quest_attention): top-k inside the sparse kernel.

if ON_GPU:
    QUEST_CASES = [
        (cap, ratio, dim, dtype, 1 + (i % 2), page, kk)
        for i, (cap, ratio, dim, dtype, (page, kk)) in enumerate(
            itertools.product([100, 4099, 70000], [1, 4, 8], [64, 128, 256], DTYPES,
                              [(16, 8), (64, 32), (32, 1), (128, 5)])
        )
    ]
else:
    QUEST_CASES = [(700, 4, 64, torch.float16, 1, 16, 8), (300, 2, 64, torch.float32, 2, 32, 3),
                   (500, 1, 64, torch.float32, 1, 64, 20), (2000, 2, 64, torch.float32, 1, 16, 30)]


@needs_triton
@pytest.mark.parametrize("use_pdl", [False, True] if ON_GPU else [False])
@pytest.mark.parametrize("cap,ratio,dim,dtype,batch,page,kk", QUEST_CASES)
def test_triton_quest_attention_reads_the_bisection_top_k(
    cap: int, ratio: int, dim: int, dtype: torch.dtype, batch: int, page: int, kk: int, use_pdl: bool, monkeypatch
) -> None:
    """Same pages as scoring + topk_bisect and the same output as the sparse kernel over them, for a full, a
    half and a one-page valid range (forced last page), k above and below the valid pages, holes in pos; with
    and without programmatic dependent launch on a GPU."""
    from attnkit.kernels import triton_decode
    from attnkit.kernels.triton_quest import quest_attention

    monkeypatch.setattr(triton_decode, "PDL", use_pdl)
    kv_heads = 2
    q, k, v, pos = make_buffers(batch, kv_heads * ratio, kv_heads, dim, cap, dtype, TRITON_DEVICE, seed=cap + kk)
    summary = torch_ref.page_summaries(k, pos, page).contiguous()
    pages = summary.shape[2]
    for n_valid in (pages, max(1, pages // 2), 1):
        idx = torch.full((batch, kv_heads, kk), -7, dtype=torch.long, device=TRITON_DEVICE)
        n_dev = torch.tensor([n_valid], device=TRITON_DEVICE)
        out = quest_attention(q, k, v, pos, summary, kk, n_dev, page, out=_poison(q), idx_out=idx)
        want = _select().topk_bisect(_select().quest_scores_masked(q, summary, n_valid, True), kk)
        assert torch.equal(idx.sort(-1).values.cpu(), want.sort(-1).values.cpu()), f"n_valid={n_valid}"
        ref = torch_ref.sparse_decode_attention(q.float(), k.float(), v.float(), pos, want, page)
        assert_close_rel(out, ref, TOL[dtype])


def test_quest_attention_dispatch_equals_select_then_read() -> None:
    """The dispatching API on whatever path this machine takes: the selection of select_pages, read sparsely."""
    device = "cuda" if ON_GPU else "cpu"
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    q, k, v, pos = make_buffers(1, 8, 2, 128, 1000, dtype, device, seed=11)
    summary = torch_ref.page_summaries(k, pos, 16).contiguous()  # 63 pages
    out = kernels.quest_attention(q, k, v, pos, summary, 10, torch.tensor([50], device=device), 16)
    idx = kernels.select_pages(q, summary, 10, 50)
    ref = torch_ref.sparse_decode_attention(q.float(), k.float(), v.float(), pos, idx, 16)
    assert_close_rel(out, ref, TOL[dtype])


@pytest.mark.skipif(not (ON_GPU and torch.cuda.get_device_capability()[0] >= 9),
                    reason="programmatic dependent launch needs a Hopper (sm_90) or newer GPU")
def test_pdl_chain_in_a_cuda_graph_equals_plain_launches(monkeypatch) -> None:
    """A decode step's kernel chain (append with the page fold, Quest, dense, sparse, TokenSelect votes), each
    reading what the one before wrote, captured in a CUDA graph with programmatic dependent launch: bit for bit
    the plain launches' results, replay after replay (a missing wait would read stale buffers)."""
    from attnkit.kernels import triton_cache, triton_decode
    from attnkit.kernels.triton_quest import quest_attention
    from attnkit.kernels.triton_select import tokenselect_votes

    b, hq, hkv, d, cap, page = 2, 32, 8, 128, 70000, 64
    q, k, v, pos = make_buffers(b, hq, hkv, d, cap, torch.bfloat16, "cuda", seed=3)
    pos[..., -2000:] = -1  # free slots the appends fill
    summary = torch_ref.page_summaries(k, pos, page).contiguous()
    n_pages = torch.tensor([summary.shape[2]], device="cuda")
    n_all = torch.tensor([cap], device="cuda")
    hi = torch.full((b, 1), cap - 512, device="cuda")
    qpos = torch.full((b, 1), cap - 2000, device="cuda")
    wslot = torch.full((b, hkv, 1), cap - 2000, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(4)

    def step(state, kn):
        kk, vv, pp, ss = state
        triton_cache.append(kk, vv, pp, kn, kn, wslot, qpos, summary=ss, page=page)
        idx = torch.empty(b, hkv, 32, dtype=torch.int64, device="cuda")
        a = quest_attention(q, kk, vv, pp, ss, 32, n_pages, page, idx_out=idx)
        c = triton_decode.decode_attention(a, kk, vv, pp, n_all)
        e = triton_decode.sparse_decode_attention(c, kk, vv, pp, idx, page)
        votes = tokenselect_votes(e, kk, pp, 4, hi, cap)
        return a, c, e, votes, idx

    new_keys = [torch.randn(b, hkv, 1, d, generator=gen, device="cuda").to(torch.bfloat16) for _ in range(3)]
    monkeypatch.setattr(triton_decode, "PDL", False)
    plain_state = [t.clone() for t in (k, v, pos, summary)]
    want = [step(plain_state, kn) for kn in new_keys]
    monkeypatch.setattr(triton_decode, "PDL", True)
    state = [t.clone() for t in (k, v, pos, summary)]
    kn_buf = new_keys[0].clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile every kernel outside the capture, on a scratch copy
        step([t.clone() for t in state], kn_buf)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step(state, kn_buf)
    for i, kn in enumerate(new_keys):
        kn_buf.copy_(kn)
        graph.replay()
        torch.cuda.synchronize()
        for got, ref in zip(outs, want[i]):
            assert torch.equal(got, ref), f"replay {i}"


def test_take_rows_equals_gather() -> None:
    """Per-head slots and shared slots (batch 1 takes index_select, larger batches advanced indexing)."""
    gen = torch.Generator().manual_seed(5)
    for b, h in ((1, 2), (3, 2), (9, 8)):  # the last: more (row, head) pairs than the CPU's per-pair loop takes
        x = torch.randn(b, h, 40, 8, generator=gen)[:, :, :33]  # a prefix view of a capacity buffer
        per_head = torch.randint(0, 33, (b, h, 7), generator=gen)
        want = x.gather(2, per_head.unsqueeze(-1).expand(b, h, 7, 8))
        assert torch.equal(kernels.take_rows(x, per_head), want)
        shared = torch.randint(0, 33, (b, 5), generator=gen)
        want = x.gather(2, shared.view(b, 1, 5, 1).expand(b, h, 5, 8))
        assert torch.equal(kernels.take_rows(x, shared), want)
        pos = torch.randint(-1, 9, (b, h, 33), generator=gen)
        assert torch.equal(kernels.take_rows(pos, per_head), pos.gather(2, per_head))
