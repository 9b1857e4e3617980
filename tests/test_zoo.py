"""attnkit.zoo: every mixer against a direct float64 computation of its own definition, its decode path against
its parallel path, its state count against the tensors it carries; the MQAR generator against Zoology's layout;
the tiny LM's decode against its forward."""

from __future__ import annotations

import math
from typing import Callable

import pytest
import torch

from attnkit.zoo import LMConfig, TinyLM, build_mixer, mixer_class, mqar, mqar_accuracy
from attnkit.zoo.registry import _MIXERS

B, T, D_MODEL, HEADS = 2, 12, 16, 2
HEAD = D_MODEL // HEADS
TOL = 1e-10


# ---- plain float64 building blocks of the references ----

def lin(layer: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return x @ layer.weight.T + (0.0 if layer.bias is None else layer.bias)


def heads(x: torch.Tensor, h: int = HEADS) -> torch.Tensor:  # (B, T, h*D) -> (B, h, T, D)
    return x.view(x.shape[0], x.shape[1], h, -1).transpose(1, 2)


def qkv(mixer, x: torch.Tensor, h: int = HEADS) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return heads(lin(mixer.proj.q, x), h), heads(lin(mixer.proj.k, x), h), heads(lin(mixer.proj.v, x), h)


def out(mixer, y: torch.Tensor) -> torch.Tensor:  # (B, H, T, D) -> (B, T, d) through the output projection
    return lin(mixer.proj.o, y.transpose(1, 2).reshape(y.shape[0], y.shape[2], -1))


def per_query(fn: Callable[[int, int, int], torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """y[b, h, t] = fn(b, h, t) for every batch row, head and position."""
    y = torch.zeros_like(like)
    for b in range(like.shape[0]):
        for h in range(like.shape[1]):
            for t in range(like.shape[2]):
                y[b, h, t] = fn(b, h, t)
    return y


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


# ---- each mixer's definition, written directly ----

def softmax_reference(m, x: torch.Tensor) -> torch.Tensor:
    q, k, v = qkv(m, x)
    window = getattr(m.config, "window", None)

    def attend(b: int, h: int, t: int) -> torch.Tensor:
        lo = 0 if window is None else max(0, t - window + 1)  # the window counts the query's own key
        s = k[b, h, lo : t + 1] @ q[b, h, t] / math.sqrt(HEAD)
        w = torch.exp(s - s.max())
        return (w / w.sum()) @ v[b, h, lo : t + 1]

    return out(m, per_query(attend, v))


def kernel_sum(q, k, v, kernel: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], eps: float) -> torch.Tensor:
    """y_t = sum_{i<=t} kernel(q_t, k_i) v_i / (sum_{i<=t} kernel(q_t, k_i) + eps), term by term."""

    def one(b: int, h: int, t: int) -> torch.Tensor:
        num, den = torch.zeros_like(v[b, h, 0]), 0.0
        for i in range(t + 1):
            a = kernel(q[b, h, t], k[b, h, i])
            num, den = num + a * v[b, h, i], den + a
        return num / (den + eps)

    return per_query(one, v)


def linear_reference(m, x: torch.Tensor) -> torch.Tensor:
    q, k, v = qkv(m, x)
    phi = lambda z: torch.where(z > 0, z + 1.0, torch.exp(z))  # elu + 1
    return out(m, kernel_sum(q, k, v, lambda a, b: phi(a) @ phi(b), m.config.eps))


def base_conv_reference(m, x: torch.Tensor) -> torch.Tensor:
    w, bias = m.conv.conv.weight[:, 0], m.conv.conv.bias  # (d, K), (d,)
    taps = w.shape[1]
    conv = torch.zeros_like(x)
    for t in range(x.shape[1]):
        conv[:, t] = bias
        for j in range(taps):
            src = t - (taps - 1) + j
            if src >= 0:
                conv[:, t] += w[:, j] * x[:, src]
    return conv * lin(m.gate, x) + x


def based_reference(m, x: torch.Tensor) -> torch.Tensor:
    h = base_conv_reference(m.conv, x) if m.conv is not None else x
    q, k, v = qkv(m, h)
    f = m.config.feature_dim
    taylor = lambda a, b: 1 + (a @ b) / math.sqrt(f) + (a @ b) ** 2 / (2 * f)  # 2nd-order Taylor of exp
    return out(m, kernel_sum(q, k, v, taylor, m.config.eps))


def delta_reference(m, x: torch.Tensor) -> torch.Tensor:
    q, k, v = qkv(m, x)
    q, k = unit(q), unit(k)
    beta = torch.sigmoid(lin(m.beta, x)).transpose(1, 2)  # (B, H, T)
    y = torch.zeros_like(v)
    for b in range(B):
        for h in range(HEADS):
            s = torch.zeros(HEAD, HEAD, dtype=x.dtype)
            for t in range(x.shape[1]):
                s = s + beta[b, h, t] * torch.outer(v[b, h, t] - s @ k[b, h, t], k[b, h, t])
                y[b, h, t] = s @ q[b, h, t]
    return out(m, y)


def rls_reference(m, x: torch.Tensor) -> torch.Tensor:
    q, k, v = qkv(m, x)
    q, k = unit(q), unit(k)

    def ridge_solution(b: int, h: int, t: int) -> torch.Tensor:
        keys, vals = k[b, h, : t + 1], v[b, h, : t + 1]  # (t+1, D)
        gram = keys.T @ keys + m.config.ridge * torch.eye(HEAD, dtype=x.dtype)
        memory = torch.linalg.solve(gram, keys.T @ vals).T  # argmin_M sum ||v_i - M k_i||^2 + ridge ||M||^2
        return memory @ q[b, h, t]

    return out(m, per_query(ridge_solution, v))


# name -> (settings, reference, documented state_size at seq_len T)
H_D = HEADS * HEAD
CASES: dict[str, tuple[dict, Callable, int]] = {
    "softmax": ({"num_heads": HEADS}, softmax_reference, 2 * H_D * T),
    "sliding_window": ({"num_heads": HEADS, "window": 5}, softmax_reference, 2 * H_D * 5),
    "linear_attention": ({"num_heads": HEADS}, linear_reference, HEADS * HEAD * HEAD + HEADS * HEAD),
    # F = 1 + f + f(f+1)/2 = 15 at f = 4: kv_heads*head_dim*F + kv_heads*F, plus d*(K-1) for the conv buffer
    "based": ({"num_heads": HEADS, "feature_dim": 4}, based_reference, HEADS * HEAD * 15 + HEADS * 15 + D_MODEL * 2),
    "base_conv": ({}, base_conv_reference, D_MODEL * 2),
    "delta_rule": ({"num_heads": HEADS}, delta_reference, HEADS * HEAD * HEAD),
    "rls": ({"num_heads": HEADS}, rls_reference, HEADS * 2 * HEAD * HEAD),
}


def make(name: str, **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_mixer(name, D_MODEL, **{**CASES[name][0], **extra}).double().eval()


def inputs(seed: int = 1, t: int = T) -> torch.Tensor:
    return torch.randn(B, t, D_MODEL, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def decode(m, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    state, ys = m.init_state(x.shape[0]), []
    for t in range(x.shape[1]):
        y, state = m.step(x[:, t], state)
        ys.append(y)
    return torch.stack(ys, dim=1), state


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str, tol: float = TOL) -> None:
    diff = (got - want).abs()
    assert diff.max() <= tol, f"{what}: max diff {diff.max():.3g}, mean diff {diff.mean():.3g} (tol {tol})"


def test_every_registered_mixer_is_covered():
    assert set(CASES) <= set(_MIXERS)  # tests/test_zoo_mixers2.py covers the rest and checks the union
    assert all(mixer_class(name).name == name for name in _MIXERS)


@pytest.mark.parametrize("name", list(CASES))
@torch.no_grad()
def test_forward_equals_direct_definition(name):
    m, x = make(name), inputs()
    assert_close(m(x), CASES[name][1](m, x), f"{name} forward vs direct float64 definition")


@torch.no_grad()
def test_based_without_conv_and_relu_linear_attention_follow_their_definitions():
    based = make("based", conv_kernel=0)
    assert based.conv is None
    assert_close(based(inputs()), based_reference(based, inputs()), "based without conv")
    relu = make("linear_attention", feature_map="relu", eps=1e-3)
    q, k, v = qkv(relu, inputs())
    want = out(relu, kernel_sum(q, k, v, lambda a, b: a.clamp_min(0) @ b.clamp_min(0), 1e-3))
    assert_close(relu(inputs()), want, "linear attention with relu features")


@pytest.mark.parametrize("name", list(CASES))
@torch.no_grad()
def test_causal(name):
    m, x, t0 = make(name), inputs(), 7
    bumped = x.clone()
    bumped[:, t0] += torch.randn(B, D_MODEL, dtype=x.dtype, generator=torch.Generator().manual_seed(5))
    before, after = m(x), m(bumped)
    assert_close(after[:, :t0], before[:, :t0], f"{name}: outputs before the change", tol=1e-12)
    assert (after[:, t0:] - before[:, t0:]).abs().max() > 1e-6, f"{name}: the change did not reach position {t0}"


@pytest.mark.parametrize("name", list(CASES))
@torch.no_grad()
def test_decode_equals_parallel(name):
    m, x = make(name), inputs(t=T)
    stepped, _ = decode(m, x)
    assert_close(stepped, m(x), f"{name} step-by-step decode vs forward")


def held_floats(state) -> int:
    """Floats in every tensor of a (nested) decode state, summed."""
    if isinstance(state, torch.Tensor):
        return state.numel() if state.is_floating_point() else 0
    if isinstance(state, dict):
        return sum(held_floats(v) for v in state.values())
    return 0


@pytest.mark.parametrize("name", list(CASES))
@torch.no_grad()
def test_state_size_matches_formula_and_the_state_carried(name):
    m = make(name)
    assert m.state_size(T) == CASES[name][2]
    _, state = decode(m, inputs())
    assert held_floats(state) == B * m.state_size(T), f"{name}: tensors carried after {T} steps"


def test_state_size_growth_and_based_spec_formula():
    softmax, window = make("softmax"), make("sliding_window")
    with pytest.raises(ValueError, match="pass seq_len"):
        softmax.state_size()
    assert softmax.state_size(0) == 0 and softmax.state_size(3) == 2 * H_D * 3
    assert window.state_size(3) == 2 * H_D * 3 and window.state_size() == window.state_size(100) == 2 * H_D * 5
    for f, heads_, d in ((16, 1, 64), (8, 4, 64)):  # the spec: kv_heads*head_dim*(1+f+f(f+1)/2) + kv_heads*(...)
        based = build_mixer("based", d, feature_dim=f, num_heads=heads_, conv_kernel=0)
        width = 1 + f + f * (f + 1) // 2
        assert based.state_size() == heads_ * (d // heads_) * width + heads_ * width


BAD_SETTINGS = [
    ("softmax", {"num_heads": 0}, "num_heads=0"),
    ("softmax", {"num_heads": 3}, "num_heads=3"),  # does not divide d_model
    ("softmax", {"bias": "yes"}, "bias='yes'"),
    ("sliding_window", {"window": 0}, "window=0"),
    ("linear_attention", {"feature_map": "tanh"}, "feature_map='tanh'"),
    ("linear_attention", {"eps": 0.0}, "eps=0.0"),
    ("based", {"feature_dim": 0}, "feature_dim=0"),
    ("based", {"conv_kernel": -1}, "conv_kernel=-1"),
    ("base_conv", {"kernel_size": 2.5}, "kernel_size=2.5"),
    ("delta_rule", {"norm_eps": -1.0}, "norm_eps=-1.0"),
    ("rls", {"ridge": 0.0}, "ridge=0.0"),
    ("rls", {"ridge": float("nan")}, "ridge=nan"),
]


@pytest.mark.parametrize("name,settings,shown", BAD_SETTINGS)
def test_bad_settings_raise_naming_the_value(name, settings, shown):
    with pytest.raises(ValueError, match="accepted") as err:
        build_mixer(name, D_MODEL, **settings)
    assert shown in str(err.value) and name in str(err.value)


def test_registry_suggests_names_and_settings():
    with pytest.raises(ValueError, match="did you mean 'softmax'"):
        build_mixer("softmx", D_MODEL)
    with pytest.raises(ValueError, match="did you mean 'feature_dim'"):
        build_mixer("based", D_MODEL, feature_dims=4)
    with pytest.raises(ValueError, match="d_model=0"):
        build_mixer("rls", 0)
    assert type(build_mixer("Sliding-Window", D_MODEL)).__name__ == "SlidingWindowAttention"


# ---- MQAR ----

V, SEQ, PAIRS = 64, 32, 4


def query_positions(labels: torch.Tensor) -> list[list[int]]:
    return [row.nonzero()[:, 0].tolist() for row in labels != -100]


def test_mqar_layout_matches_zoology():
    x, y = mqar(50, vocab_size=V, seq_len=SEQ, num_kv_pairs=PAIRS, seed=4)
    assert x.shape == y.shape == (50, SEQ) and x.dtype == y.dtype == torch.long
    keys, values = x[:, 0 : 2 * PAIRS : 2], x[:, 1 : 2 * PAIRS : 2]
    assert ((keys >= 1) & (keys < V // 2)).all() and ((values >= V // 2) & (values < V)).all()
    assert ((x >= 0) & (x < V)).all()
    assert (y[:, : 2 * PAIRS] == -100).all()
    for row, positions in enumerate(query_positions(y)):
        pair = dict(zip(keys[row].tolist(), values[row].tolist()))
        assert len(pair) == PAIRS and len(set(pair.values())) == PAIRS  # distinct keys, distinct values
        assert len(positions) == PAIRS and all((p - 2 * PAIRS) % 2 == 0 for p in positions)
        queried = x[row, positions].tolist()
        assert sorted(queried) == sorted(pair)  # every key queried exactly once
        assert y[row, positions].tolist() == [pair[k] for k in queried]  # label = the key's value


def test_mqar_fillers_and_determinism():
    plain, labels = mqar(20, vocab_size=V, seq_len=SEQ, num_kv_pairs=PAIRS, random_non_queries=False, seed=2)
    filled, labels_filled = mqar(20, vocab_size=V, seq_len=SEQ, num_kv_pairs=PAIRS, seed=2)
    used = torch.zeros_like(plain, dtype=torch.bool)
    used[:, : 2 * PAIRS] = True
    used |= labels != -100
    assert (plain[~used] == 0).all() and (plain[used] > 0).all()
    assert torch.equal(labels, labels_filled) and torch.equal(plain[used], filled[used])
    assert (filled[~used] != 0).float().mean() > 0.9  # uniform over [0, V): zero 1 time in 64
    again, _ = mqar(20, vocab_size=V, seq_len=SEQ, num_kv_pairs=PAIRS, seed=2)
    other, _ = mqar(20, vocab_size=V, seq_len=SEQ, num_kv_pairs=PAIRS, seed=3)
    assert torch.equal(again, filled) and not torch.equal(other, filled)


def test_mqar_gaps_follow_the_power_law():
    n, seq = 4, 128  # 60 slots after the context
    share = {}
    for a in (0.01, 1.0):
        _, y = mqar(2000, vocab_size=256, seq_len=seq, num_kv_pairs=n, power_a=a, seed=7)
        slots = torch.tensor(query_positions(y)).flatten().sub(2 * n).div(2, rounding_mode="floor")
        assert slots.min() >= 0 and slots.max() < (seq - 2 * n) // 2
        share[a] = (slots < 15).double().mean().item()  # first quarter of the slots
    assert abs(share[1.0] - 0.25) < 0.03, share  # a = 1: uniform
    assert share[0.01] > 0.55, share  # a = 0.01: short gaps favoured (about 0.67)


@pytest.mark.parametrize(
    "settings,shown",
    [({"seq_len": 31}, "seq_len=31"), ({"num_kv_pairs": 9}, "num_kv_pairs=9"), ({"vocab_size": 32}, "vocab_size=32"),
     ({"power_a": 0.0}, "power_a=0.0"), ({"num_examples": 0}, "num_examples=0")],
)
def test_mqar_rejects_bad_settings(settings, shown):
    args = {"num_examples": 2, "vocab_size": V, "seq_len": SEQ, "num_kv_pairs": PAIRS, **settings}
    with pytest.raises(ValueError, match="accepted") as err:
        mqar(**args)
    assert shown in str(err.value)


def test_mqar_accuracy_averages_per_example():
    labels = torch.full((2, 6), -100)
    labels[0, [1, 3]] = torch.tensor([5, 6])  # row 0: both right
    labels[1, [0, 2, 4, 5]] = torch.tensor([1, 2, 3, 4])  # row 1: one of four right
    preds = torch.zeros(2, 6, dtype=torch.long)
    preds[0, [1, 3]] = torch.tensor([5, 6])
    preds[1, 0] = 1
    assert mqar_accuracy(preds, labels) == pytest.approx((1.0 + 0.25) / 2)
    logits = torch.nn.functional.one_hot(preds, 8).double()
    assert mqar_accuracy(logits, labels) == pytest.approx(0.625)
    with pytest.raises(ValueError, match="no labelled position"):
        mqar_accuracy(preds, torch.full((2, 6), -100))


# ---- the tiny LM ----

def hybrid_lm(**extra) -> TinyLM:
    torch.manual_seed(0)
    settings = {"based": {"feature_dim": 4, "num_heads": 2}, "sliding_window": {"window": 5, "num_heads": 2}}
    cfg = LMConfig(vocab_size=V, d_model=D_MODEL, n_layers=2, mixers=["based", "sliding_window"],
                   mixer_settings=settings, max_positions=SEQ, **extra)
    return TinyLM(cfg).double().eval()


@torch.no_grad()
def test_lm_shapes_and_state():
    lm = hybrid_lm()
    ids = torch.randint(0, V, (B, 20))
    assert lm(ids).shape == (B, 20, V)
    assert lm.head.weight is lm.embed.weight
    assert lm.state_size(20) == sum(b.mixer.state_size(20) for b in lm.blocks) == 302 + 2 * H_D * 5
    untied = hybrid_lm(tie_embeddings=False, mlp_ratio=0)
    assert untied.head.weight is not untied.embed.weight and untied.blocks[0].mlp is None
    with pytest.raises(ValueError, match="max_positions=32"):
        lm(torch.zeros(1, SEQ + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="T >= 1"):
        lm.generate(torch.zeros(B, 0, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="one per layer"):
        LMConfig(n_layers=3, mixers=["based", "softmax"])
    with pytest.raises(ValueError, match="did you mean 'based'"):
        TinyLM(LMConfig(vocab_size=V, d_model=D_MODEL, mixers="basd"))
    with pytest.raises(ValueError, match=rf"lm: token ids in \[0, {V}\]; accepted: ids in \[0, {V - 1}\]"):
        lm(torch.tensor([[0, V]]))  # torch's embedding would say only "index out of range in self"
    with pytest.raises(ValueError, match="accepted: a \(B, T\) long or int32 tensor"):
        lm(torch.zeros(1, 4))


@torch.no_grad()
def test_lm_decode_equals_forward():
    lm = hybrid_lm()
    ids = torch.randint(0, V, (B, 20), generator=torch.Generator().manual_seed(3))
    parallel, state, stepped = lm(ids), lm.init_state(B), []
    for t in range(ids.shape[1]):
        logits, state = lm.step(ids[:, t], state)
        stepped.append(logits)
    assert_close(torch.stack(stepped, dim=1), parallel, "LM step-by-step logits vs forward")
    generated, logits = lm.generate(ids[:, :8], max_new_tokens=6)
    assert generated.shape == (B, 14) and torch.equal(generated[:, :8], ids[:, :8])
    assert_close(logits, lm(generated[:, :-1]), "LM generate logits vs forward on the generated ids")
    assert torch.equal(generated[:, 8:], logits[:, 7:].argmax(-1))  # greedy
