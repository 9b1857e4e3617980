"""Registry, validation, RoPE re-rotation and error messages."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import attnkit
from attnkit.hf.rope import find_rotary, inv_freq_for, rotate_keys
from attnkit.registry import method_class
from tiny import tiny_gemma3, tiny_llama


def test_methods_listing_has_summaries_and_defaults():
    listed = {m["name"]: m for m in attnkit.methods()}
    assert {"full", "window", "streaming_llm", "h2o", "snapkv", "tokenselect"} <= set(listed)
    assert listed["streaming_llm"]["defaults"] == {"sinks": 4, "window": 1020}
    assert all(m["summary"] for m in listed.values())


def test_unknown_method_suggests_the_closest():
    with pytest.raises(ValueError, match="did you mean 'streaming_llm'"):
        attnkit.make_method("streamingllm")


@pytest.mark.parametrize(
    "name, settings, field",
    [
        ("window", {"window": 0}, "window"),
        ("window", {"window": 2.5}, "window"),
        ("streaming_llm", {"sinks": -1}, "sinks"),
        ("h2o", {"recent": 0}, "recent"),
        ("snapkv", {"budget": 8, "window": 32}, "budget"),
        ("snapkv", {"kernel": 4}, "kernel"),
        ("snapkv", {"pooling": "median"}, "pooling"),
        ("tokenselect", {"top_k": 0}, "top_k"),
    ],
)
def test_invalid_settings_name_field_value_and_range(name, settings, field):
    with pytest.raises(ValueError) as err:
        attnkit.make_method(name, **settings)
    msg = str(err.value)
    assert name in msg and f"{field}=" in msg and "accepted" in msg


def test_unknown_setting_suggests_the_closest():
    with pytest.raises(ValueError, match="did you mean 'sinks'"):
        attnkit.make_method("streaming_llm", sink=4)


def test_something_that_is_not_a_transformers_model_is_one_clear_error():
    with pytest.raises(TypeError, match="attnkit.apply: model is a Linear; accepted: a Hugging Face transformers"):
        attnkit.apply(torch.nn.Linear(2, 2), "streaming_llm")


def test_budget_beyond_model_context_is_refused():
    model = tiny_llama()
    with pytest.raises(ValueError, match="exceeds the model's context of 2048"):
        attnkit.apply(model, "window", window=4096)


def test_rope_method_on_model_without_rope_is_refused():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).eval()
    with pytest.raises(ValueError, match="needs a model with rotary position embeddings"):
        attnkit.apply(model, "streaming_llm", sinks=2, window=8)


def test_right_padded_batch_is_refused_with_a_clear_message():
    model = tiny_llama()
    ids = torch.randint(3, 256, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    with attnkit.apply(model, "window", window=16), pytest.raises(ValueError, match="left-padded batches only"):
        model(ids, attention_mask=mask)


def test_import_patches_nothing():
    code = (
        "import transformers.masking_utils as mu, transformers.modeling_utils as m;"
        "before = (dict(m.ALL_ATTENTION_FUNCTIONS._global_mapping), dict(mu.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping));"
        "import attnkit;"
        "after = (dict(m.ALL_ATTENTION_FUNCTIONS._global_mapping), dict(mu.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping));"
        "assert before == after and 'attnkit' not in after[0], 'import changed transformers'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("which", ["llama", "gemma3-full", "gemma3-sliding"])
def test_rotate_keys_equals_the_models_rope_at_the_shifted_position(which):
    model = tiny_llama() if which == "llama" else tiny_gemma3()
    layer_type = None if which == "llama" else which.split("-")[1] + "_attention"
    rotary = find_rotary(model)
    k = torch.randn(1, 2, 1, 16)
    x = torch.zeros(1, 1, 16)

    def rope_at(p: int) -> torch.Tensor:
        pos = torch.tensor([[p]])
        cos, sin = rotary(x, pos, layer_type) if layer_type else rotary(x, pos)
        return apply_rotary_pos_emb(k, k, cos, sin)[1]

    for p, shift in [(3, 5), (100, 1000), (1500, -700)]:
        got = rotate_keys(rope_at(p), shift, inv_freq_for(model, layer_type))
        assert torch.allclose(got, rope_at(p + shift), atol=1e-4), (p, shift, (got - rope_at(p + shift)).abs().max())


@pytest.mark.parametrize("name", ["window", "streaming_llm", "h2o", "snapkv", "tokenselect"])
@pytest.mark.parametrize("tokens", [16, 256, 4096])
def test_for_budget_holds_or_reads_that_many_tokens(name, tokens):
    method = attnkit.registry.method_class(name).for_budget(tokens)
    if name == "tokenselect":
        assert method.sinks + method.top_k + method.local == tokens
    else:
        assert method.kv_budget() == tokens


def test_perplexity_in_logit_slices_equals_the_models_own_loss(monkeypatch):
    """The per-position NLLs, computed a few rows of logits at a time, against the model's own cross-entropy."""
    from attnkit import inference

    torch.manual_seed(0)
    model = tiny_llama(dtype=torch.float32)
    ids = torch.randint(0, 256, (1, 96))
    monkeypatch.setattr(inference, "NLL_SLICE_BYTES", 4 * 256 * 7)  # 7 rows per slice
    with attnkit.apply(model, "full"):
        nll = attnkit.perplexity(model, None, ids, chunk=40)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    want = torch.nn.functional.cross_entropy(logits[:-1].float(), ids[0, 1:], reduction="none")
    assert nll.shape == (95,) and torch.allclose(nll, want, atol=1e-4)


@pytest.mark.parametrize("name", ["full", "recycled_attention", "spatten"])
def test_perplexity_decode_tail_feeds_the_last_tokens_as_decode_steps(name):
    torch.manual_seed(0)
    model = tiny_llama(dtype=torch.float32)
    ids = torch.randint(0, 256, (1, 96))
    method = method_class(name).for_budget(32)
    with attnkit.apply(model, method):
        chunked = attnkit.perplexity(model, None, ids, chunk=32)
        tail = attnkit.perplexity(model, None, ids, chunk=32, decode_tail=24)
    assert tail.shape == chunked.shape == (95,)
    assert torch.allclose(tail[:72], chunked[:72], atol=1e-5)  # the chunked head is unchanged
    if name == "full":  # dense: one token per forward gives the same likelihoods
        assert torch.allclose(tail, chunked, atol=1e-4)
    else:  # the method's decode steps (a 32-token selection) ran on the tail
        assert not torch.allclose(tail[72:], chunked[72:], atol=1e-4)
    with pytest.raises(ValueError, match="decode_tail=96 is invalid for a 96-token text"):
        attnkit.perplexity(model, None, ids, decode_tail=96)


def test_attention_timer_counts_each_layer_call_by_kind():
    """run.time_attention(): one timed call per layer and forward, prefill chunks and decode steps apart; the time
    sits inside the forwards' wall time, and a method's slower attention shows in it."""
    import time

    from attnkit.session import cache_argument

    model = tiny_llama(dtype=torch.float32)
    layers = model.config.num_hidden_layers
    ids = torch.randint(0, 256, (1, 64))
    arg = cache_argument(model)

    def measured(name, **settings):
        with torch.no_grad(), attnkit.apply(model, name, **settings) as run:
            cache = run.new_cache()
            timer = run.time_attention()
            t0 = time.perf_counter()
            for s in (0, 32):  # two prefill chunks
                model(input_ids=ids[:, s : s + 32], position_ids=torch.arange(s, s + 32)[None], **{arg: cache})
            for p in range(64, 67):  # three decode steps
                model(input_ids=ids[:, :1], position_ids=torch.tensor([[p]]), **{arg: cache})
            wall = time.perf_counter() - t0
        return timer, wall

    timer, wall = measured("full")
    assert timer.calls == {"prefill": 2 * layers, "decode": 3 * layers}
    spent = timer.seconds()
    assert 0 < spent["prefill"] and 0 < spent["decode"] and spent["prefill"] + spent["decode"] < wall

    full = attnkit.registry.method_class("full")

    class SlowFull(full):
        def attend(self, *args):
            time.sleep(0.01)
            return super().attend(*args)

    timer, _ = measured(SlowFull())
    assert timer.seconds()["prefill"] >= 2 * layers * 0.01
