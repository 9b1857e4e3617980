"""attnkit.zoo, second batch of mixers (selective, deconstructed, meta_tokens, landmark, cca, superlinear).

The six mixers join test_zoo's case table: test_zoo's generic checks run on them here (parallel forward against a
direct float64 loop of the mixer's own definition, causality, decode from ``init_state`` against the forward,
``state_size`` against the formula and the floats carried), and its registry-coverage check sees every registered
mixer when this file is collected with it. Below that:
each mixer's settings and variants, landmark's retrieval decode against a direct computation of the retrieval
definition (it differs from the training path by design), and bad settings.
"""

from __future__ import annotations

import math

import pytest
import torch

import test_zoo as zoo
from test_zoo import B, HEAD, HEADS, T, assert_close, decode, heads, held_floats, inputs, kernel_sum, lin, make
from test_zoo import out, per_query, qkv
from attnkit.zoo import build_mixer
from attnkit.zoo.registry import _MIXERS

T2 = 24  # longer sequences where blocks, groups and anchors must outnumber what a query keeps
H_D = HEADS * HEAD


# ---- plain float64 building blocks ----

def gelu(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0)))


def silu(z: torch.Tensor) -> torch.Tensor:
    return z / (1.0 + torch.exp(-z))


def softmax(s: torch.Tensor) -> torch.Tensor:
    w = torch.exp(s - s.max())
    return w / w.sum()


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """One query (D,) over keys / values (n, D): softmax(keys q / sqrt D) values."""
    return softmax(keys @ q / math.sqrt(HEAD)) @ values


# ---- each mixer's definition, written directly ----

def selective_reference(m, x: torch.Tensor) -> torch.Tensor:
    q, k, v = qkv(m, x)
    beta, cfg = m.beta, m.config
    if m.value_token is not None:  # v_j * (1 + tanh(w_h . gelu(v_j)))
        v = v * (1.0 + torch.tanh((gelu(v) * m.value_token[None, :, None]).sum(-1, keepdim=True)))

    def one(b: int, h: int, t: int) -> torch.Tensor:
        slope = torch.exp(-torch.exp(beta)) if cfg.position == "func" else beta
        tau = 1.0 + slope * math.log(t + 1)  # n = t + 1
        if m.query_token is not None:
            tau = tau + torch.tanh(gelu(q[b, h, t]) @ m.query_token[h])
        return attend(q[b, h, t] * tau, k[b, h, : t + 1], v[b, h, : t + 1])

    return out(m, per_query(one, v))


def meta_reference(m, x: torch.Tensor) -> torch.Tensor:
    meta = m.meta
    if m.config.meta_attention:  # meta token i reads meta tokens <= i, through the meta layer's own projections
        mq, mk, mv = (heads(lin(p, meta[None]))[0] for p in (m.meta_proj.q, m.meta_proj.k, m.meta_proj.v))
        mixed = torch.stack([torch.stack([attend(mq[h, i], mk[h, : i + 1], mv[h, : i + 1]) for i in range(len(meta))])
                             for h in range(HEADS)])  # (H, M, D)
        z = meta + lin(m.meta_proj.o, mixed.transpose(0, 1).reshape(len(meta), -1))
        mean, var = z.mean(-1, keepdim=True), z.var(-1, unbiased=False, keepdim=True)
        meta = (z - mean) / torch.sqrt(var + m.meta_norm.eps) * m.meta_norm.weight + m.meta_norm.bias  # LayerNorm
    mk, mv = heads(lin(m.proj.k, meta[None]))[0], heads(lin(m.proj.v, meta[None]))[0]  # (H, M, D)
    q, k, v = qkv(m, x)
    return out(m, per_query(lambda b, h, t: attend(q[b, h, t], torch.cat([mk[h], k[b, h, : t + 1]]),
                                                   torch.cat([mv[h], v[b, h, : t + 1]])), v))


def landmark_reference(m, x: torch.Tensor, retrieve: int = 0) -> torch.Tensor:
    """The grouped softmax; ``retrieve`` > 0 keeps only that many past blocks, the best by landmark score."""
    q, k, v = qkv(m, x)
    size = m.config.block_size
    ends = x[:, size - 1 :: size][:, : x.shape[1] // size]  # blocks' last inputs
    kl = heads(lin(m.proj.k, ends + m.landmark))  # (B, H, G, D)

    def one(b: int, h: int, t: int) -> torch.Tensor:
        c = t // size
        logits = kl[b, h, :c] @ q[b, h, t] / math.sqrt(HEAD)
        blocks = list(range(c))
        if 0 < retrieve < c:
            blocks = sorted(torch.topk(logits, retrieve).indices.tolist())
        cur = range(c * size, t + 1)
        top = softmax(torch.cat([logits[blocks], k[b, h, cur] @ q[b, h, t] / math.sqrt(HEAD)]))
        y = top[len(blocks):] @ v[b, h, cur]
        for weight, g in zip(top[: len(blocks)], blocks):
            y = y + weight * attend(q[b, h, t], k[b, h, g * size : (g + 1) * size], v[b, h, g * size : (g + 1) * size])
        return y

    return out(m, per_query(one, v))


def cca_reference(m, x: torch.Tensor) -> torch.Tensor:
    q, k, v = qkv(m, x)
    g, s = m.config.group_size, m.config.local_window

    def core(b: int, h: int, i: int) -> tuple[torch.Tensor, torch.Tensor]:  # group i (0-indexed)
        members = range(i * g, (i + 1) * g)
        w = softmax(k[b, h, members] @ q[b, h, (i + 1) * g - 1] / math.sqrt(HEAD))  # the group's last query
        return w @ k[b, h, members], w @ v[b, h, members]

    def one(b: int, h: int, t: int) -> torch.Tensor:
        j = max(0, (t + 1 - s) // g)  # cores 1..j (1-indexed), exact tokens j*g+1 .. t+1
        keys, values = [k[b, h, j * g : t + 1]], [v[b, h, j * g : t + 1]]
        for i in range(j):
            ck, cv = core(b, h, i)
            keys.append(ck[None])
            values.append(cv[None])
        return attend(q[b, h, t], torch.cat(keys), torch.cat(values))  # softmax is order-free

    return out(m, per_query(one, v))


def superlinear_reference(m, x: torch.Tensor) -> torch.Tensor:
    q, k, v = qkv(m, x)
    qs = heads(lin(m.search, x))
    cfg = m.config
    width = (cfg.sw_index + 1) ** 2 - 1

    def one(b: int, h: int, t: int) -> torch.Tensor:
        window = list(range(max(0, t - width + 1), t + 1))
        anchors, s = [], cfg.sw_index + 1
        while t - s * s + 1 >= 0:
            anchors.append(t - s * s + 1)
            s += 1
        if not anchors:
            return attend(q[b, h, t], k[b, h, window], v[b, h, window])
        scores = torch.stack([qs[b, h, t] @ k[b, h, a] for a in anchors])
        best = torch.topk(scores, min(cfg.top_k, len(anchors))).indices.tolist()
        length = math.ceil(cfg.backward_factor * (t + 1) ** cfg.span_power)
        gate = softmax(scores[best])
        y = torch.zeros_like(v[b, h, 0])
        for weight, i in zip(gate, best):
            keys = list(range(max(0, anchors[i] - length), anchors[i] + 1)) + window
            y = y + weight * attend(q[b, h, t], k[b, h, keys], v[b, h, keys])
        return y

    return out(m, per_query(one, v))


def deconstructed_reference(m, x: torch.Tensor, qk_input: torch.Tensor | None = None) -> torch.Tensor:
    variant, t_len = m.config.variant, x.shape[1]
    if variant == "no_mixing":
        return lin(m.down, silu(lin(m.gate, x)) * lin(m.up, x))
    q, k, v = qkv(m, x)
    if variant == "non_softmax":
        taylor = lambda a, c: 1 + (a @ c) / math.sqrt(HEAD) + (a @ c) ** 2 / (2 * HEAD)  # 2nd-order Taylor of exp
        return out(m, kernel_sum(q, k, v, taylor, m.config.eps))
    if variant == "non_approximate":
        s = (silu(q) * k).sum(-1) / math.sqrt(HEAD)  # one score per key position, from its own token
        return out(m, per_query(lambda b, h, t: softmax(s[b, h, : t + 1]) @ v[b, h, : t + 1], v))
    if qk_input is None:
        table = m.fixed if variant == "fixed_mixing" else m.positions.weight
        qk_input = table[:t_len].expand(x.shape[0], -1, -1)
    sq, sk = heads(lin(m.proj.q, qk_input)), heads(lin(m.proj.k, qk_input))
    return out(m, per_query(lambda b, h, t: attend(sq[b, h, t], sk[b, h, : t + 1], v[b, h, : t + 1]), v))


# name -> (settings, reference, documented state_size at seq_len T); joins test_zoo's table
NEW = {
    "selective": ({"num_heads": HEADS, "beta_init": -0.5}, selective_reference, 2 * H_D * T),
    "deconstructed": ({"num_heads": HEADS, "max_len": 32}, deconstructed_reference, H_D * T),
    "meta_tokens": ({"num_heads": HEADS, "num_meta": 3}, meta_reference, 2 * H_D * (3 + T)),
    "landmark": ({"num_heads": HEADS, "block_size": 4, "top_k": 0}, landmark_reference, H_D * (2 * T + T // 4)),
    # T = 12, g = 3, s = 4: 4 cores + the window 6 .. 11 (j = 2) for the next query
    "cca": ({"num_heads": HEADS, "group_size": 3, "local_window": 4}, cca_reference, 2 * H_D * (4 + 6)),
    "superlinear": ({"num_heads": HEADS, "top_k": 1, "sw_index": 1}, superlinear_reference, 2 * H_D * T),
}
zoo.CASES.update(NEW)


def test_every_registered_mixer_has_a_case():
    assert set(NEW) <= set(_MIXERS) and set(zoo.CASES) == set(_MIXERS)


SHARED_CHECKS = [zoo.test_forward_equals_direct_definition, zoo.test_causal, zoo.test_decode_equals_parallel,
                 zoo.test_state_size_matches_formula_and_the_state_carried]


@pytest.mark.parametrize("check", SHARED_CHECKS, ids=lambda f: f.__name__[5:])
@pytest.mark.parametrize("name", list(NEW))
def test_shared_checks(name, check):
    check(name)


def randomize(m, *names: str) -> None:
    """Give parameters that start at zero (or near it) random values, so the test sees them."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n in names:
            p = getattr(m, n)
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))


@torch.no_grad()
def check_forward_and_decode(m, reference, x: torch.Tensor, what: str) -> None:
    """Forward vs the definition, decode vs forward, the floats carried, and causality (a change at t0)."""
    y = m(x)
    assert_close(y, reference(m, x), f"{what}: forward vs direct definition")
    stepped, state = decode(m, x)
    assert_close(stepped, y, f"{what}: decode vs forward")
    assert held_floats(state) == B * m.state_size(x.shape[1]), f"{what}: floats carried"
    bumped, t0 = x.clone(), x.shape[1] // 2
    bumped[:, t0] += 1.0
    change = (m(bumped) - y).abs()
    assert change[:, :t0].max() <= 1e-12 < change[:, t0:].max(), f"{what}: causality"


# ---- selective ----

@pytest.mark.parametrize("settings", [
    {"beta_init": None},  # the code's default: func with beta 2.0
    {"position": "no_func", "beta_init": 0.3},
    {"form": "paper", "beta_init": -0.5},
    {"form": "paper", "position": "no_func", "value_temperature": True},
], ids=["code", "no_func", "paper", "paper_values"])
def test_selective_forms(settings):
    m = make("selective", **settings)
    randomize(m, *[n for n in ("query_token", "value_token") if getattr(m, n) is not None])
    check_forward_and_decode(m, selective_reference, inputs(t=T2), f"selective {settings}")


@torch.no_grad()
def test_selective_defaults_follow_the_code_and_the_paper_form_starts_at_the_code_form():
    assert make("selective", beta_init=None).beta.item() == 2.0  # model_finetune_att.py
    assert make("selective", beta_init=None, position="no_func").beta.item() == pytest.approx(1e-5)  # ..._no_func
    code, paper = make("selective"), make("selective", form="paper")
    paper.load_state_dict({**code.state_dict(), "query_token": paper.query_token}, strict=True)
    assert_close(paper(inputs()), code(inputs()), "paper form with u = 0 vs code form")


# ---- deconstructed ----

VARIANTS = ["no_mixing", "fixed_mixing", "non_softmax", "non_approximate", "decoupled_qk"]
VARIANT_STATE = {  # documented state_size at T2
    "no_mixing": 0,
    "fixed_mixing": H_D * T2,
    "non_softmax": HEADS * HEAD * 45 + HEADS * 45,  # F = 1 + D + D(D+1)/2 = 45 at D = 8
    "non_approximate": H_D + 2 * HEADS,
    "decoupled_qk": 2 * H_D * T2,
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_deconstructed_variants(variant):
    m = make("deconstructed", variant=variant)
    assert m.state_size(T2) == VARIANT_STATE[variant]
    check_forward_and_decode(m, deconstructed_reference, inputs(t=T2), f"deconstructed {variant}")


@torch.no_grad()
def test_deconstructed_decoupled_qk_from_given_static_embeddings():
    m = make("deconstructed", variant="decoupled_qk")
    x, e = inputs(t=T2), inputs(seed=9, t=T2)  # e stands for the LM's token embeddings
    y = m(x, qk_input=e)
    assert_close(y, deconstructed_reference(m, x, qk_input=e), "decoupled_qk with qk_input vs definition")
    state, ys = m.init_state(B), []
    for t in range(T2):
        y_t, state = m.step(x[:, t], state, qk_input=e[:, t])
        ys.append(y_t)
    assert_close(torch.stack(ys, dim=1), y, "decoupled_qk with qk_input: decode vs forward")
    assert (m(x) - y).abs().max() > 1e-6  # the positions path is another map


def test_deconstructed_mlp_width_matches_attention_and_max_len_is_enforced():
    mlp = build_mixer("deconstructed", 48, variant="no_mixing")
    attention = build_mixer("deconstructed", 48, variant="non_approximate", bias=False)
    weights = lambda mod: sum(p.numel() for n, p in mod.named_parameters() if n.endswith("weight"))
    assert mlp.gate.out_features == 64 and weights(mlp) == weights(attention) == 4 * 48 * 48
    with pytest.raises(ValueError, match="max_len=32"):
        make("deconstructed")(inputs(t=33))


# ---- meta tokens ----

@pytest.mark.parametrize("meta_attention", [True, False])
def test_meta_tokens_with_and_without_meta_attention(meta_attention):
    m = make("meta_tokens", meta_attention=meta_attention)
    check_forward_and_decode(m, meta_reference, inputs(t=T2), f"meta_tokens meta_attention={meta_attention}")


# ---- landmark ----

@torch.no_grad()
def test_landmark_grouped_softmax_over_many_blocks():
    m = make("landmark", block_size=5)  # 4 complete blocks and a partial one at T2 = 24
    randomize(m, "landmark")
    x = inputs(t=T2)
    assert_close(m(x), landmark_reference(m, x), "landmark forward (training path) vs grouped softmax")
    assert_close(decode(m, x)[0], m(x), "landmark decode with top_k = 0 (every block) vs forward")


@pytest.mark.parametrize("top_k", [1, 2])
@torch.no_grad()
def test_landmark_retrieval_decode_follows_the_retrieval_definition(top_k):
    """Decoding retrieves top_k blocks per query and head (the paper's inference); its reference is the direct
    retrieval computation, not the training forward, which keeps every block."""
    m = make("landmark", top_k=top_k)  # blocks of 4: 6 at T2 = 24, so most queries drop blocks
    randomize(m, "landmark")
    x = inputs(t=T2)
    stepped, state = decode(m, x)
    assert_close(stepped, landmark_reference(m, x, retrieve=top_k), f"landmark retrieval decode, top_k={top_k}")
    assert (stepped - m(x)).abs().max() > 1e-6  # retrieval really drops blocks
    assert held_floats(state) == B * m.state_size(T2) == B * H_D * (2 * T2 + T2 // 4)


# ---- CCA ----

@pytest.mark.parametrize("group_size,local_window", [(4, 1), (3, 7), (5, 30), (1, 2)])
def test_cca_groups_and_windows(group_size, local_window):
    m = make("cca", group_size=group_size, local_window=local_window)
    check_forward_and_decode(m, cca_reference, inputs(t=T2), f"cca g={group_size} s={local_window}")


@torch.no_grad()
def test_cca_state_follows_the_formula_at_every_length():
    m, x = make("cca", group_size=3, local_window=4), inputs(t=T2)
    state = m.init_state(B)
    for n in range(1, T2 + 1):
        _, state = m.step(x[:, n - 1], state)
        j = max(0, (n - 4) // 3)
        assert held_floats(state) == B * m.state_size(n) == B * 2 * H_D * (n // 3 + n - 3 * j), n


# ---- superlinear ----

@pytest.mark.parametrize("settings", [
    {"top_k": 1, "sw_index": 0},
    {"top_k": 2, "sw_index": 1},
    {"top_k": 3, "sw_index": 2, "backward_factor": 0.5},
], ids=["k1_sw0", "k2_sw1", "k3_sw2_short_spans"])
def test_superlinear_spans(settings):
    m = make("superlinear", **settings)
    check_forward_and_decode(m, superlinear_reference, inputs(t=T2), f"superlinear {settings}")


@torch.no_grad()
def test_superlinear_with_every_anchor_kept_reaches_every_key():
    m = make("superlinear", top_k=T2, sw_index=0)  # all anchors: their spans must cover the whole past
    x = inputs(t=T2)
    y = m(x)
    for t0 in (0, 5, 13):
        bumped = x.clone()
        bumped[:, t0] += 1.0
        assert (m(bumped)[:, -1] - y[:, -1]).abs().max() > 1e-9, f"key {t0} unreachable from the last query"


# ---- bad settings ----

BAD = [
    ("selective", {"form": "both"}, "form='both'"),
    ("selective", {"position": "exp"}, "position='exp'"),
    ("selective", {"beta_init": float("nan")}, "beta_init=nan"),
    ("selective", {"value_temperature": 1}, "value_temperature=1"),
    ("deconstructed", {"variant": "mlp"}, "variant='mlp'"),
    ("deconstructed", {"max_len": 0}, "max_len=0"),
    ("deconstructed", {"embed_std": 0.0}, "embed_std=0.0"),
    ("deconstructed", {"mlp_hidden": -1}, "mlp_hidden=-1"),
    ("meta_tokens", {"num_meta": 0}, "num_meta=0"),
    ("meta_tokens", {"meta_attention": "yes"}, "meta_attention='yes'"),
    ("landmark", {"block_size": 0}, "block_size=0"),
    ("landmark", {"top_k": -1}, "top_k=-1"),
    ("cca", {"group_size": 0}, "group_size=0"),
    ("cca", {"local_window": 0}, "local_window=0"),
    ("superlinear", {"top_k": 0}, "top_k=0"),
    ("superlinear", {"sw_index": -1}, "sw_index=-1"),
    ("superlinear", {"span_power": 1.5}, "span_power=1.5"),
    ("superlinear", {"num_heads": 3}, "num_heads=3"),
]


@pytest.mark.parametrize("name,settings,shown", BAD)
def test_bad_settings_raise_naming_the_value_and_range(name, settings, shown):
    zoo.test_bad_settings_raise_naming_the_value(name, settings, shown)
