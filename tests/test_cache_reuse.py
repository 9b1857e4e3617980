"""A method's cache continues, saves and loads: every method in tests/cases.py (tight settings) gives the same
continuation from its in-memory cache and from the file; with room for everything the continuation equals a
fresh run over the whole text; MT-Bench's two-turn questions run as a chat on SmolLM2."""

from __future__ import annotations

import pytest
import torch

import attnkit
from cases import METHODS, TINY
from tiny import tiny_gemma3, tiny_llama

MODELS = {"llama": tiny_llama, "gemma3": tiny_gemma3}


class Ids:
    """A tokenizer stand-in for token-id prompts: no EOS, no text."""

    eos_token_id = None
    pad_token_id = 0

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return ""


def ids(n: int, seed: int) -> list[int]:
    return torch.randint(3, 250, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    return MODELS[request.param]()


@pytest.mark.parametrize("method", METHODS)
def test_continuation_from_the_file_equals_the_in_memory_one(model, method, tmp_path):
    tok, settings = Ids(), TINY[method][1]
    first, more = ids(40, 1), ids(9, 2)
    with torch.no_grad(), attnkit.apply(model, method, **settings):
        gen = attnkit.generate(model, tok, first, max_new_tokens=5, stop_at_eos=False)
        path = attnkit.save_cache(gen, tmp_path / "c.safetensors")
        want = attnkit.generate(model, tok, more, max_new_tokens=6, stop_at_eos=False, cache=gen.state)
    with torch.no_grad(), attnkit.apply(model, method, **settings):
        state = attnkit.load_cache(model, path)
        got = attnkit.generate(model, tok, more, max_new_tokens=6, stop_at_eos=False, cache=state)
        again = attnkit.generate(model, tok, [7, 8], max_new_tokens=3, stop_at_eos=False, cache=got.state)
    assert got.tokens == want.tokens, method
    assert again.prompt_tokens == 3  # the pending token and the two new ones


@pytest.mark.parametrize("method", METHODS)
def test_with_room_for_everything_a_continuation_equals_a_fresh_run(model, method):
    tok, settings = Ids(), TINY[method][0]
    first, more = ids(30, 3), ids(8, 4)
    with torch.no_grad(), attnkit.apply(model, method, **settings):
        gen = attnkit.generate(model, tok, first, max_new_tokens=4, stop_at_eos=False)
        cont = attnkit.generate(model, tok, more, max_new_tokens=5, stop_at_eos=False, cache=gen.state)
    with torch.no_grad():
        fresh = attnkit.generate(model, tok, first + gen.tokens + more, max_new_tokens=5, stop_at_eos=False)
    assert cont.tokens == fresh.tokens, method


def test_reuse_errors_name_the_problem(model, tmp_path):
    tok = Ids()
    with torch.no_grad(), attnkit.apply(model, "window", window=16):
        gen = attnkit.generate(model, tok, ids(20, 5), max_new_tokens=3, stop_at_eos=False)
        path = attnkit.save_cache(gen, tmp_path / "w.safetensors")
    with torch.no_grad(), attnkit.apply(model, "window", window=16):
        with pytest.raises(ValueError, match="another attnkit.apply block"):
            attnkit.generate(model, tok, [5], cache=gen.state)
    with torch.no_grad(), attnkit.apply(model, "window", window=24):
        with pytest.raises(ValueError, match=r"saved with window\(\{'window': 16\}\)"):
            attnkit.load_cache(model, path)
    with torch.no_grad(), attnkit.apply(model, "streaming_llm"):
        with pytest.raises(ValueError, match="saved with window"):
            attnkit.load_cache(model, path)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(path.read_bytes()[:100])
    with torch.no_grad(), attnkit.apply(model, "window", window=16):
        with pytest.raises(ValueError, match="not a readable attnkit cache file"):
            attnkit.load_cache(model, bad)
        with pytest.raises(ValueError, match="not found"):
            attnkit.load_cache(model, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="needs an active attnkit.apply"):
        attnkit.load_cache(model, path)


@pytest.fixture(scope="module")
def smollm():
    return attnkit.load_model("smollm2-135m")


@pytest.mark.parametrize("method,settings", [("full", {}), ("streaming_llm", {"sinks": 4, "window": 28}),
                                             ("snapkv", {"budget": 32, "window": 8})])
def test_mt_bench_two_turns_as_a_chat(smollm, method, settings, tmp_path):
    from attnkit.eval.tasks.mtbench import mtbench_questions

    model, tok = smollm
    q = mtbench_questions()[0]
    messages = [{"role": "user", "content": q["turns"][0]}]
    with torch.no_grad(), attnkit.apply(model, method, **settings):
        first = attnkit.generate(model, tok, q["turns"][0], chat=True, max_new_tokens=12, eos_check_every=1)
        path = attnkit.save_cache(first, tmp_path / "turn1.safetensors")
        second = attnkit.chat_turn(model, tok, first.state, messages, first.tokens, q["turns"][1], max_new_tokens=8)
    with torch.no_grad(), attnkit.apply(model, method, **settings):
        loaded = attnkit.load_cache(model, path)
        again = attnkit.chat_turn(model, tok, loaded, messages, first.tokens, q["turns"][1], max_new_tokens=8)
    assert second.tokens == again.tokens and second.text.strip()
    if method == "full":  # the continuation is the dense model over the whole conversation's tokens
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        head = tok(prompt, add_special_tokens=False).input_ids + first.tokens + first.state.pending
        text = attnkit.followup_text(tok, messages, tok.decode(first.tokens, skip_special_tokens=True), q["turns"][1])
        tail = tok(text, add_special_tokens=False).input_ids
        tail = tail[1:] if first.state.pending == [tok.eos_token_id] and tail[:1] == [tok.eos_token_id] else tail
        with torch.no_grad():
            fresh = attnkit.generate(model, tok, head + tail, max_new_tokens=8, eos_check_every=1)
        assert fresh.tokens == second.tokens
