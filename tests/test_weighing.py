"""ZeroTuning and ACT against independent computations: the paper's probability rescale, ACT's five steps, the
log-sum-exp correction, profiles and the head searches (with a scripted objective, so no model quality is needed)."""

from __future__ import annotations

import json

import pytest
import torch

import attnkit
from attnkit import calibrate_heads
from attnkit.eval.sample import Sample
from attnkit.methods.read import weighing
from attnkit.methods.read.act import act_factor
from attnkit.reference import dense_attention, expand_kv
from tiny import tiny_gemma3, tiny_llama


def padded_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of 30 and 22 tokens, left-padded: ids (2, 30), mask (2, 30)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (2, 30), generator=g)
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, :8] = 0
    ids[1, :8] = 0
    return ids, mask


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3])
def test_zerotuning_is_the_papers_rescale_of_the_initial_tokens_probability(make):
    model = make()
    ids, mask = padded_batch()
    gamma, records = 2.5, []
    with torch.no_grad(), attnkit.apply(model, "zerotuning", gamma=gamma, heads="1-3") as run:
        run.recorder = lambda r: records.append({k: v.clone() if torch.is_tensor(v) else v for k, v in r.items()})
        model(input_ids=ids, attention_mask=mask)
    assert records
    for r in records:
        _, probs, _ = dense_attention(r["query"], r["key"], r["value"], r["mask"], r["scaling"])
        layer_pos = (r["bias"] != 0).any(2)  # (B, H, n): where the recorded bias sits
        first = torch.tensor([0, 8])  # each row's first real token (slot = its left padding)
        p = probs.clone()
        for b in range(2):
            p[b, 1:, :, first[b]] *= gamma  # heads 1-3 only
            assert layer_pos[b, 1:].nonzero()[:, 1].unique().tolist() == [first[b].item()]
        p = p / p.sum(-1, keepdim=True)
        want = torch.matmul(p, expand_kv(r["value"].float(), p.shape[1]))
        real = mask.bool()[:, None, :, None]  # pad query rows are discarded by the model
        assert torch.allclose(r["out"] * real, want * real, atol=1e-5), (r["layer"], (r["out"] - want).abs().max())


def test_bias_initial_equals_dense_attention_with_the_bias_where_the_initial_token_is_seen():
    torch.manual_seed(0)
    b, h, hkv, q, n, d = 2, 4, 2, 5, 9, 8
    query, key, value = torch.randn(b, h, q, d), torch.randn(b, hkv, n, d), torch.randn(b, hkv, n, d)
    pos = torch.arange(n).repeat(b, hkv, 1) - torch.tensor([0, 2]).view(2, 1, 1)  # row 1: two pad slots
    pos = pos.where(pos >= 0, torch.tensor(-1))
    mask = (pos.unsqueeze(2) >= 0).expand(b, hkv, q, n).clone()
    mask[0, :, 3, 0] = False  # one query of row 0 does not see its initial token (a sliding window)
    gain = torch.tensor([0.0, 1.5, -0.5, 3.0])
    out, lse = weighing.attention_lse(query, key, value, mask, 0.3, None)
    got = weighing.bias_initial(out, lse, query, key, value, pos, 0.3, None, gain, mask)
    bias = weighing.initial_bias_tensor(pos, h, q, gain)
    want, _, _ = dense_attention(query, key, value, mask, 0.3, bias=bias)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_attention_lse_in_row_blocks_and_implicit_causal_mask(monkeypatch):
    torch.manual_seed(1)
    query, key, value = torch.randn(1, 4, 11, 8), torch.randn(1, 2, 11, 8), torch.randn(1, 2, 11, 8)
    causal = torch.ones(11, 11).tril().bool().view(1, 1, 11, 11)
    want_out, _, want_lse = dense_attention(query, key, value, causal, 0.35)
    monkeypatch.setattr(weighing, "ROWS", 4)
    for mask, prefix in ((causal, False), (None, True)):
        out, lse = weighing.attention_lse(query, key, value, mask, 0.35, None, causal_prefix=prefix)
        assert torch.allclose(out, want_out, atol=1e-6) and torch.allclose(lse, want_lse, atol=1e-6)



@pytest.mark.skipif(not torch.cuda.is_available(), reason="the memory-efficient kernel's path runs on CUDA")
@pytest.mark.parametrize("hkv,mask_heads,dtype", [(1, 1, "bfloat16"), (2, 1, "bfloat16"), (2, 2, "bfloat16"),
                                                   (1, 1, "float32"), (2, 2, "float32")])
def test_attention_lse_under_a_mask_takes_the_efficient_kernel_on_cuda(monkeypatch, hkv: int, mask_heads: int,
                                                                        dtype: str):
    """Padded batches (ZeroTuning's and ACT's calibrations) on CUDA: the memory-efficient kernel's output
    and log-sum-exp, in row blocks, with an empty row, an unaligned key count and a per-KV-head mask, against the
    float32 reference."""
    gen = torch.Generator().manual_seed(hkv + mask_heads)
    b, h, q, n, d = 2, 4, 40, 75, 64
    query, key, value = (torch.randn(b, x, y, d, generator=gen) for x, y in ((h, q), (hkv, n), (hkv, n)))
    qpos = torch.arange(n - q, n).view(1, 1, q, 1)
    kpos = (torch.arange(n) - torch.tensor([0, 6]).view(b, 1)).view(b, 1, 1, n)  # row 1: six pad slots
    mask = ((kpos <= qpos) & (kpos >= 0)).expand(b, mask_heads, q, n).clone()
    if mask_heads > 1:
        mask[:, 1, :, 40:50] = False  # the second KV head drops some keys
    mask[1, :, 3] = False  # a query with nothing to read
    want_out, _, want_lse = dense_attention(query, key, value, mask, 0.125)
    monkeypatch.setattr(weighing, "ROWS", 16)
    monkeypatch.setattr(weighing, "_EFFICIENT_OK", [True])  # a refusal in another case must not decide this one
    calls = []
    real = weighing._efficient_lse
    monkeypatch.setattr(weighing, "_efficient_lse", lambda *a: calls.append(1) or real(*a))
    cuda = [x.cuda().to(getattr(torch, dtype)) for x in (query, key, value)]
    tol = 3e-2 if dtype == "bfloat16" else 1e-4
    out, lse = weighing.attention_lse(*cuda, mask.cuda(), 0.125, None)
    assert calls and weighing._EFFICIENT_OK[0]
    assert torch.allclose(out.cpu(), want_out, atol=tol), (out.cpu() - want_out).abs().max()
    seen = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), seen)
    assert torch.allclose(lse.cpu()[seen], want_lse[seen], atol=tol)


def act_official(p: torch.Tensor, beta: float, tau: float) -> torch.Tensor:
    """ACT's five steps on one head's square (T, T) causal probabilities, written as loops."""
    t = p.shape[0]
    s = [sum(p[i, k] for i in range(k, t)) / (t - k) for k in range(t)]
    sinks = [k for k in range(1, t) if s[k] > tau]
    out = p.clone()
    for i in range(t):
        removed = (1 - beta) * sum(p[i, k] for k in sinks)
        for k in sinks:
            out[i, k] = beta * p[i, k]
        w = p[i].clone()
        w[sinks] = 0
        if w.sum() > 0:
            out[i] += removed * w / w.sum()
    out[0, 0] = 1.0
    return out


def test_act_factor_follows_the_official_five_steps():
    torch.manual_seed(2)
    t = 12
    scores = torch.randn(1, 1, t, t, dtype=torch.float64) * 2
    scores[..., 3] += 3.0  # a hidden sink at key 3
    mask = torch.ones(t, t).tril().bool()
    p = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
    seen = mask.double().sum(0).view(1, 1, 1, t)
    initial = torch.zeros(1, 1, 1, t, dtype=torch.bool)
    initial[..., 0] = True
    got = p * act_factor(p, seen, initial, beta=0.4, tau=0.1)
    want = act_official(p[0, 0], beta=0.4, tau=0.1)
    assert torch.allclose(got[0, 0], want, atol=1e-10), (got[0, 0] - want).abs().max()
    assert torch.allclose(got.sum(-1), torch.ones(1, 1, t, dtype=torch.float64), atol=1e-10)


def test_zerotuning_profile_and_settings_errors(tmp_path):
    model = tiny_llama()
    with pytest.raises(ValueError, match="gamma=0"):
        attnkit.registry.make_method("zerotuning", gamma=0)
    with pytest.raises(ValueError, match="layers='a-b'"):
        attnkit.registry.make_method("zerotuning", layers="a-b")
    with pytest.raises(ValueError, match=r"heads='9'.*\[0, 3\]"):
        with attnkit.apply(model, "zerotuning", heads="9"):
            pass
    with pytest.raises(ValueError, match="not found"):
        attnkit.registry.make_method("zerotuning", profile=str(tmp_path / "missing.json"))
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"method": "zerotuning", "num_layers": 30, "num_heads": 9, "gammas": []}))
    with pytest.raises(ValueError, match="30 layers x 9 heads; this model has 3 x 4"):
        with attnkit.apply(model, "zerotuning", profile=str(wrong)):
            pass
    with pytest.raises(ValueError, match="heads='3:x'"):
        attnkit.registry.make_method("act", heads="3:x")
    with pytest.raises(ValueError, match="head 5:0 is invalid"):
        with attnkit.apply(model, "act", heads="5:0"):
            pass


def test_zerotuning_profile_loads_per_head_gammas(tmp_path):
    model = tiny_llama()
    path = tmp_path / "zt.json"
    path.write_text(json.dumps({"method": "zerotuning", "num_layers": 3, "num_heads": 4,
                                "gammas": [[0, 1, 2.0], [2, 3, 0.5]]}))
    with attnkit.apply(model, "zerotuning", profile=str(path)) as run:
        method = run.method
    assert method.gain(0, torch.device("cpu")).tolist() == [0, 1.0, 0, 0]
    assert method.gain(1, torch.device("cpu")) is None
    assert method.gain(2, torch.device("cpu")).tolist() == [0, 0, 0, -0.5]


class FakeScore:
    """A scripted objective: +1 per head scaled in the direction ``want`` marks, -1 per head scaled against it;
    read from the method's state after each chunk is set, variant by variant."""

    def __init__(self, method, want: torch.Tensor, variants: int) -> None:
        self.method, self.want, self.variants = method, want, variants

    def many(self, candidates, set_chunk):
        out = []
        for i in range(0, len(candidates), self.variants):
            chunk = candidates[i : i + self.variants]
            set_chunk(chunk)
            table = getattr(self.method, "_table", None)
            for v in range(len(chunk)):
                if table is None:  # ACT: the heads variant v uses
                    chosen = torch.zeros_like(self.want)
                    for layer, heads in self.method._by_layer.items():
                        use = self.method._use.get(layer)
                        chosen[layer, heads] = 1.0 if use is None else use[v].float()
                    value = float((chosen * self.want).sum())
                else:
                    t = table[v]
                    value = float((torch.sign(t) * self.want).sum() - (t.abs() > 1.2).sum() * 0.5)
                out.append((value, value))
        return out


@pytest.mark.parametrize("variants", [1, 3])
def test_the_head_searches_keep_the_heads_that_help(monkeypatch, variants: int):
    model = tiny_llama()
    want = torch.zeros(3, 4)
    want[0, 1], want[2, 2], want[1, 0] = 1, 1, -1  # two up-effective heads, one down-effective
    made = {}
    real_make = attnkit.registry.make_method

    def make(name, **kw):
        made["m"] = real_make(name, **kw)
        return made["m"]

    monkeypatch.setattr(calibrate_heads.attnkit.registry, "make_method", make)
    monkeypatch.setattr(calibrate_heads, "_Scorer", lambda *a: FakeScore(made["m"], want, variants))
    sample = Sample("t", 0, 64, "x", "", ("a",), 1, "choice_match",
                                        {"options": [" a", " b"], "label": 0, "scoring": "label_logit"})
    prof = calibrate_heads.calibrate_zerotuning(model, None, [sample], progress=False, variants=variants)
    assert sorted(map(tuple, prof["up_effective"])) == [(0, 1), (2, 2)]
    assert prof["down_effective"] == [[1, 0]]
    assert sorted((l, h) for l, h, _ in prof["gammas"]) == [(0, 1), (2, 2)]
    assert {g for *_, g in prof["gammas"]} == {1.25}  # the first grid value of the best objective
    # ACT probes layers 2 .. L-2: none for 3 layers, layer 2 for the 4-layer model
    model4 = tiny_gemma3()
    want4 = torch.zeros(4, 4)
    want4[2, 3] = 1
    monkeypatch.setattr(calibrate_heads, "_Scorer", lambda *a: FakeScore(made["m"], want4, variants))
    prof = calibrate_heads.calibrate_act(model4, None, [sample], progress=False, variants=variants)
    assert prof["heads"] == [[2, 3]]


def test_candidates_in_one_forward_score_as_each_alone():
    """score_choice_variants under V ZeroTuning gain tables / ACT head sets equals score_choices under each alone."""
    from attnkit.eval.choice import score_choice_variants, score_choices
    from test_choice_tasks import ByteTokenizer, _sample

    model, tok = tiny_llama(), ByteTokenizer()
    samples = [_sample(0, "Sentence: good film\nAnswer:", [" negative", " positive"], 1, "label_logit"),
               _sample(1, "A longer sentence: it pads the other rows.\nAnswer:", [" no", " yes"], 0, "label_logit"),
               _sample(2, "Question: why?\nAnswer:", [" because", " no", " it rains a lot"], 2, "loglik")]
    g = torch.Generator().manual_seed(0)
    tables = [torch.zeros(3, 4)] + [torch.where(torch.rand(3, 4, generator=g) < 0.5, 0.0,
                                                torch.rand(3, 4, generator=g) * 4 - 0.8) for _ in range(2)]
    zt = attnkit.registry.make_method("zerotuning")
    act = attnkit.registry.make_method("act", tau=0.05)
    sets = [[(1, 0)], [], [(1, 2), (2, 1), (0, 3)]]
    for method, chunk, set_one, set_all in (
            (zt, tables, zt.set_gains, lambda c: zt.set_gains(torch.stack(c))),
            (act, sets, act.set_heads, act.set_head_variants)):
        with torch.no_grad(), attnkit.apply(model, method):
            alone = []
            for c in chunk:
                set_one(c)
                alone.append(score_choices(model, tok, samples))
            set_all(chunk)
            together = score_choice_variants(model, tok, samples, len(chunk))
        for a, t in zip(alone, together):
            for ra, rt in zip(a, t):
                assert max(abs(x - y) for x, y in zip(ra["scores"], rt["scores"])) < 1e-4
        # the candidates differ, so a wrong variant-to-rows mapping would fail above
        assert max(abs(x - y) for x, y in zip(alone[0][2]["scores"], alone[2][2]["scores"])) > 1e-3
    with pytest.raises(ValueError, match="variants=0 is invalid"):
        score_choice_variants(model, tok, samples, 0)
