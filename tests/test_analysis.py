"""attnkit.analysis: every metric against an independent computation from eager ``output_attentions`` /
hidden states on tiny random models, constructed cases with known answers, JSON, the CLI, the page in headless
Chromium (skipped without Debian's chromium), and the real SmolLM2's first-token sink."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import types
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import attnkit
from attnkit import cli
from attnkit.analysis import (HeadScores, attention_maps, compute, flag_massive, head_scores, residual_analysis,
                              sink_metric, streaming_heads, use_method, write)
from attnkit.analysis.heads import repeated_input
from attnkit.analysis.streaming import streaming_region
from tiny import tiny_gemma3, tiny_llama

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                  "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]
PLOTS = ["sink-heatmap", "sink-bars", "massive", "cosine", "heads", "streaming"]
SMALL = dict(samples=4, tokens=16, heads_length=24, repeats=3, progress=False, residual_samples=2,
             residual_tokens=40, streaming_tokens=80, map_tokens=12)


class ByteTokenizer:
    """Bytes as token ids (vocab 256), no BOS: the part of the HF tokenizer interface the analyses use."""

    bos_token_id = None
    eos_token_id = None
    all_special_ids: list[int] = []

    def __call__(self, text, return_tensors=None, add_special_tokens=True):
        ids = list(text.encode("utf-8"))
        return types.SimpleNamespace(input_ids=torch.tensor([ids]) if return_tensors == "pt" else ids)

    def decode(self, ids, skip_special_tokens=True):
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")

    def get_added_vocab(self):
        return {}

    def __len__(self):
        return 256


def eager_attentions(model, ids) -> list[torch.Tensor]:
    """Per layer (B, H, T, T) probabilities from transformers' own eager attention (the independent path)."""
    saved = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return [a.float() for a in model(ids, output_attentions=True).attentions]
    finally:
        model.set_attn_implementation(saved)


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def tiny(request):
    return tiny_llama() if request.param == "llama" else tiny_gemma3()  # gemma3: sliding window 8 < T


# -- sink metric ------------------------------------------------------------------------------------------------
def test_sink_metric_matches_output_attentions(tiny):
    ids = torch.randint(3, 256, (3, 16), generator=torch.Generator().manual_seed(1))
    got = sink_metric(tiny, ids=ids, k=(0, 1, 5), eps=0.1)
    attn = torch.stack(eager_attentions(tiny, ids), 1)  # (S, L, H, T, T)
    t = ids.shape[1]
    direct = torch.stack([attn[..., i:, i].sum(-1) / (t - i) for i in range(t)], -1)  # (S, L, H, T)
    torch.testing.assert_close(got.alpha, direct[..., [0, 1, 5]], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.alpha_mean, direct.mean(0), atol=1e-5, rtol=1e-4)
    for j, k in enumerate((0, 1, 5)):
        assert got.sink_pct[k] == pytest.approx(100 * (direct[..., k] > 0.1).float().mean().item())
    maps = attention_maps(tiny, None, ids[0], layers=[0, 1], heads=[1, 3])
    torch.testing.assert_close(maps.probs, attn[0][[0, 1]][:, [1, 3]], atol=1e-5, rtol=1e-4)


def dominant_first_key(strength: float) -> tuple[torch.nn.Module, float]:
    """A one-layer Llama whose every query is c and whose only nonzero key is strength * c at position 0, with
    RoPE frequencies ~0 on c's dimensions: score(i, 0) = S for every query, all other scores 0."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, rope_theta=1e30, attn_implementation="sdpa")
    model = AutoModelForCausalLM.from_config(config).eval()
    d = config.hidden_size // config.num_attention_heads
    c = torch.zeros(d)
    c[[3, 3 + d // 2]] = 1.0  # one low-frequency rotate-half pair: RoPE angle ~1e-26 per position
    attn = model.model.layers[0].self_attn
    attn.q_proj.register_forward_hook(lambda m, a, out: c.repeat(2).expand_as(out).clone())

    def keys(m, a, out):
        k = torch.zeros_like(out)
        k[:, 0] = strength * c.repeat(2)
        return k

    attn.k_proj.register_forward_hook(keys)
    return model, strength * float(c @ c) * d**-0.5


def test_dominant_first_key_gives_alpha0_near_one():
    model, score = dominant_first_key(12.0)
    t = 24
    ids = torch.randint(0, 64, (2, t), generator=torch.Generator().manual_seed(0))
    got = sink_metric(model, ids=ids, k=(0, 1))
    # analytically: A[i, 0] = e^S / (e^S + i) (key 0 scores S, the i other visible keys 0)
    expected = sum(math.exp(score) / (math.exp(score) + i) for i in range(t)) / t
    assert got.alpha[..., 0] == pytest.approx(torch.full_like(got.alpha[..., 0], expected), abs=1e-5)
    assert expected > 0.9 and got.sink_pct[0] == 100.0 and got.sink_pct[1] == 0.0
    # under StreamingLLM (1 sink, window 3) a query sees key 0, itself and the 3 keys before it: 4 others at most
    with use_method("streaming_llm", {"sinks": 1, "window": 3}):
        windowed = sink_metric(model, ids=ids, k=(0,))
    expected_w = sum(math.exp(score) / (math.exp(score) + min(i, 4)) for i in range(t)) / t
    assert windowed.alpha[..., 0] == pytest.approx(torch.full_like(windowed.alpha[..., 0], expected_w), abs=1e-5)


def test_random_control_has_fewer_sinks_than_constructed_sink():
    ids = torch.randint(3, 256, (4, 32), generator=torch.Generator().manual_seed(2))
    assert sink_metric(tiny_llama(), ids=ids).sink_pct[0] < 50.0  # random weights: attention ~uniform


# -- echo / induction -------------------------------------------------------------------------------------------
def brute_force_scores(model, length: int, repeats: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = repeated_input(model, length, repeats, seed=0)
    attn = eager_attentions(model, ids)
    echo = torch.zeros(len(attn), attn[0].shape[1])
    ind = torch.zeros_like(echo)
    queries = range(1 + length, ids.shape[1])
    for layer, a in enumerate(attn):
        for p in queries:
            r = (p - 1) // length
            for m in range(1, r + 1):
                echo[layer] += a[0, :, p, p - m * length]
                ind[layer] += a[0, :, p, p - m * length + 1]
    return echo / len(queries), ind / len(queries)


def test_head_scores_match_brute_force(tiny):
    got = head_scores(tiny, length=12, repeats=3)
    echo, ind = brute_force_scores(tiny, 12, 3)
    torch.testing.assert_close(got.echo, echo, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(got.induction, ind, atol=1e-6, rtol=1e-4)
    sliding = [t == "sliding_attention" for t in got.layer_types]
    if any(sliding):  # window 8 < length 12: a sliding layer cannot see an earlier repeat
        assert got.echo[sliding].abs().max() == 0 and got.induction[sliding].abs().max() == 0


def test_length_is_capped_to_the_context():
    model = tiny_llama()
    model.config.max_position_embeddings = 61
    got = head_scores(model, length=2500, repeats=4)
    assert got.length == 15 and got.meta["tokens"] == 61
    with pytest.raises(ValueError, match="repeats=1"):
        head_scores(model, repeats=1)


def scores_fixture() -> HeadScores:
    echo = torch.tensor([[0.9, 0.0, 0.1, 0.2], [0.0, 0.3, 0.0, 0.05], [0.5, 0.4, 0.0, 0.0]])
    ind = torch.tensor([[0.8, 0.7, 0.0, 0.0], [0.1, 0.2, 0.6, 0.0], [0.0, 0.05, 0.3, 0.35]])
    return HeadScores(echo, ind, ["sliding_attention", "full_attention", "full_attention"], 2, 10, 4)


def test_per_kv_head_is_the_max_over_the_group_and_selection_skips_sliding_layers():
    s = scores_fixture()
    echo, ind = s.per_kv_head()
    assert torch.equal(echo, torch.tensor([[0.9, 0.2], [0.3, 0.05], [0.5, 0.0]]))
    assert torch.equal(ind, torch.tensor([[0.8, 0.0], [0.2, 0.6], [0.05, 0.35]]))
    # 4 global pairs: round(4 * 0.5) = 2 by induction ((1,1) 0.6, (2,1) 0.35), round(4 * 0.25) = 1 by echo ((2,0))
    assert s.retrieval_heads(induction_frac=0.5, echo_frac=0.25) == [(1, 1), (2, 0), (2, 1)]
    assert s.retrieval_heads() == [(1, 1)]  # round(4 * 0.14) = 1 by induction, round(4 * 0.01) = 0 by echo
    with pytest.raises(ValueError, match="induction_frac=1.5"):
        s.retrieval_heads(induction_frac=1.5)


def test_head_scores_json_round_trip(tmp_path):
    s = scores_fixture()
    path = s.to_json(tmp_path / "heads.json", model="tiny", sha256="abc")
    back = HeadScores.from_json(path)
    assert torch.equal(back.echo, s.echo) and torch.equal(back.induction, s.induction)
    assert (back.layer_types, back.num_key_value_heads, back.length, back.repeats) == (s.layer_types, 2, 10, 4)
    assert back.meta == {"model": "tiny", "sha256": "abc"}
    assert back.retrieval_heads(0.5, 0.25) == s.retrieval_heads(0.5, 0.25)
    (tmp_path / "bad.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not an attnkit head-scores profile"):
        HeadScores.from_json(tmp_path / "bad.json")


# -- massive activations, cosine, streaming ---------------------------------------------------------------------
def test_flag_massive_on_a_synthetic_hidden_state():
    h = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(0)) * 0.1
    h[0, 0, 5], h[1, 3, 5], h[0, 2, 7] = 500.0, -300.0, 90.0  # 90: 1000x the median but not > 100
    mask, median = flag_massive(h)
    assert median == pytest.approx(float(h.abs().median()))
    assert mask.nonzero().tolist() == [[0, 0, 5], [1, 3, 5]]
    h[:, :, 10:] = 1.0  # median |a| becomes 1: 500 is no longer 1000x the median
    assert not flag_massive(h)[0].any()


def test_massive_activation_sources_and_residual_decomposition(tiny):
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    feature = 5

    def inject(m, a, out):  # an MLP that writes one huge feature on token 0, as Sun et al. find
        out = out.clone()
        out[:, 0, feature] += 5000.0
        return out

    layer = tiny.model.layers[1]  # Gemma normalises the MLP branch: inject after its post-MLP norm
    hook = getattr(layer, "post_feedforward_layernorm", layer.mlp).register_forward_hook(inject)
    try:
        massive, cos = residual_analysis(tiny, None, ids=ids)
        with torch.no_grad():
            hidden = tiny(ids, output_hidden_states=True).hidden_states  # the last one is after the final norm
    finally:
        hook.remove()
    assert all(s["residual_error"] < 1e-5 for s in massive.layers)  # h_l - h_{l-1} == attention + MLP
    assert massive.massive_layers[0] == 1 and 0 not in massive.massive_layers
    first = massive.layers[1]
    assert first["features"] == {feature: 2} and first["tokens"] == {0: 2} and first["sources"]["mlp"] == 2
    if 2 in massive.massive_layers:  # Gemma's post-MLP norm rescales the branch; Llama's residual carries it on
        assert massive.layers[2]["sources"]["carried"] >= 1
    assert massive.repeated_features() == [feature]
    direct = torch.stack([torch.nn.functional.cosine_similarity(h[:, :1], h, dim=-1).mean(0) for h in hidden[:-1]])
    torch.testing.assert_close(cos.cos[:-1], direct, atol=1e-5, rtol=1e-4)


def test_streaming_mass_matches_output_attentions(tiny):
    ids = torch.randint(3, 256, (2, 40), generator=torch.Generator().manual_seed(4))
    got = streaming_heads(tiny, ids=ids, sinks=2, recent=8)
    region = streaming_region(40, 2, 8)
    attn = eager_attentions(tiny, ids)
    direct = torch.stack([(a * region).sum(-1)[:, :, 10:].mean((0, 2)) for a in attn])
    torch.testing.assert_close(got.mass, direct, atol=1e-5, rtol=1e-4)
    assert all(not got.sliding[layer] for layer, _ in got.candidates(mass_min=0.0))


# -- the page and the CLI ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("analysis")
    data = compute(tiny_llama(), ByteTokenizer(), "tiny-llama", **SMALL)
    json_path, html_path = write(data, folder)
    assert json.loads(json_path.read_text())["format"] == "attnkit-analysis"
    return html_path


def test_a_layer_the_model_lacks_fails_before_any_stage(monkeypatch):
    import attnkit.analysis.run as run

    monkeypatch.setattr(run, "sink_metric", lambda *a, **k: pytest.fail("a stage ran"))
    with pytest.raises(ValueError, match=r"layers=\[0, 9\] is invalid; accepted: indices in \[0, 2\]"):
        compute(tiny_llama(), ByteTokenizer(), "tiny-llama", **{**SMALL, "layers": [0, 9]})


def test_page_has_every_plot(page):
    html = page.read_text(encoding="utf-8")
    names = re.findall(r'<figure class="plot" data-plot="([^"]+)">', html)
    assert names == PLOTS + ["maps-0"]
    assert not re.search(r'\b(?:src|href)\s*=\s*"(?:https?:)?//', html), "no external resources"
    # ids are prefixed per figure, so figures never collide (matplotlib may reuse an image id inside one SVG)
    prefixes = [set(re.findall(r'\bid="(p\d+)-', body)) for body in html.split('<figure class="plot"')[1:]]
    assert [len(p) for p in prefixes] == [1] * len(names) and len(set.union(*prefixes)) == len(names)


@pytest.fixture
def loads(monkeypatch):
    monkeypatch.setattr(cli, "load", lambda name, device, dtype: (tiny_llama(), ByteTokenizer()))


def test_cli_writes_both_files_and_compares_a_method(tmp_path, loads, capsys):
    small = ["--samples", "4", "--tokens", "16", "--heads-length", "24", "--repeats", "3", "--residual-tokens", "40",
             "--streaming-tokens", "80", "--no-progress", "--layers", "0,2"]
    assert cli.main(["analyze", "tiny", "-o", str(tmp_path), *small, "--method", "streaming_llm", "--set", "sinks=2",
                     "--set", "window=6"]) == 0
    out = capsys.readouterr().out
    assert out.count("Sink_0^0.3 (first token)") == 2 and "wrote" in out
    assert (tmp_path / "analysis.html").is_file()
    both = json.loads((tmp_path / "analysis.json").read_text())
    assert both["format"] == "attnkit-analysis-compare"
    full, method = both["runs"]
    assert (full["method"], method["method"]) == ("full", "streaming_llm")
    assert method["settings"] == {"sinks": 2, "window": 6}
    assert full["maps"]["layers"] == [0, 2] and full["heads"]["length"] == 24
    assert len(full["sinks"]["per_layer_pct"]) == 3  # tiny Llama: 3 layers
    # with a 2 + 6 window no query past position 8 sees the whole prefix: the streaming mass is 1 by construction
    assert min(min(row) for row in method["streaming"]["mass"]) > 0.999 > min(min(r) for r in full["streaming"]["mass"])
    assert cli.main(["analyze", "tiny", "-o", str(tmp_path / "x"), "--set", "window=6"]) == 2
    assert cli.main(["analyze", "tiny", "-o", str(tmp_path / "x"), "--method", "streaming_lm"]) == 2
    err = capsys.readouterr().err
    assert err.count("attnkit: error:") == 2 and "Traceback" not in err and "streaming_llm" in err


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y chromium); "
                                             "the headless render check needs /usr/bin/chromium")
def test_page_renders_in_headless_chromium(page, tmp_path):
    dom = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom",
                          "--window-size=1400,1000", page.resolve().as_uri()], capture_output=True, text=True,
                         timeout=180)
    assert dom.returncode == 0, dom.stderr[-2000:]
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', re.search(r"<body[^>]*>", dom.stdout).group(0)))
    n = len(PLOTS) + 1
    assert attrs.get("data-rendered") == f"{n}/{n}" and attrs.get("data-errors") == "", attrs
    assert 'data-ok="0"' not in dom.stdout


# -- the real model ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_has_a_first_token_sink():
    model, tok = attnkit.load_model("smollm2-135m")
    got = sink_metric(model, tok, samples=6, tokens=64)
    assert not got.first_is_bos  # SmolLM2's tokenizer adds no BOS: index 0 is an essay token
    assert got.sink_pct[0] > 50.0 and got.sink_pct[0] > 5 * got.sink_pct[1], got.sink_pct
