"""InfiniRetri: sentence packing, the score against output_attentions, what is kept, SmolLM2 keeping a needle,
and the eval runner driving it per sample."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import attnkit
from attnkit.eval import runner
from attnkit.eval.sample import Sample, build_prompt
from attnkit.eval.tasks import get_task
from attnkit.methods.driver import drive_sample, sample_split
from attnkit.methods.driver.infiniretri import InfiniRetri, last_global_layer, phrase_scores, question_attention
from attnkit.methods.driver.reading import Template, layout, pack, sentence_spans, split_document
from tiny import tiny_gemma3, tiny_llama

HAYSTACK = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. " * 25).strip()
NEEDLE = "The secret code of the violet harbour is 4817293."
QUESTION = "What is the secret code of the violet harbour?"


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A fast byte-level tokenizer (one token per byte, ids 0..255, offsets) for the tiny random models."""
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def smollm():
    return attnkit.load_model("smollm2-135m")


# -- sentences and chunks -------------------------------------------------------------------------------------------
def test_sentence_spans_cover_the_text_and_end_at_punctuation():
    text = 'He said "stop." Then he left!\n\nA new part? Yes. 3.5 stays whole.  Trailing  '
    spans = sentence_spans(text)
    assert "".join(text[a:b] for a, b in spans) == text and all(b == c for (_, b), (c, _) in zip(spans, spans[1:]))
    assert [text[a:b].strip() for a, b in spans] == ['He said "stop."', "Then he left!", "A new part?", "Yes.",
                                                     "3.5 stays whole.", "Trailing"]


def test_packing_keeps_whole_sentences_within_the_chunk_and_cuts_a_long_one(smollm):
    _, tok = smollm
    long = "and then " * 120  # one ~240-token sentence, longer than the chunk
    document = f"{HAYSTACK} {NEEDLE} It went on {long.strip()} until the end. {HAYSTACK}"
    chunk = 64
    spans, counts = split_document(tok, document, chunk)
    assert "".join(document[a:b] for a, b in spans) == document
    assert sum(counts) == len(tok(document, add_special_tokens=False).input_ids)
    assert max(counts) <= chunk
    sentence_ends = {b for _, b in sentence_spans(document)}
    cut = [(a, b) for a, b in spans if b not in sentence_ends]  # pieces of the long sentence, all but its last
    assert cut and all("and then" in document[a:b] for a, b in cut)
    chunks = pack(counts, chunk)
    assert [i for c in chunks for i in c] == list(range(len(spans)))  # in order, each sentence once
    assert all(sum(counts[i] for i in c) <= chunk for c in chunks)
    assert all(sum(counts[i] for i in c) + counts[d[0]] > chunk for c, d in zip(chunks, chunks[1:]))  # greedy
    needle = [i for i, (a, b) in enumerate(spans) if NEEDLE in document[a:b]]
    assert len(needle) == 1  # the needle sentence is one piece, inside one chunk


def test_layout_locates_context_question_and_sentences(smollm):
    _, tok = smollm
    template = Template.parse("Read this.\n\n{context}\n\nQuestion: {question}")
    pieces = ["First one.", " Second one is here.", " Third."]
    for chat in (True, False):
        lay = layout(tok, template, pieces, QUESTION, " Answer:", chat)
        c0, c1 = lay.context
        assert tok.decode(lay.ids[c0:c1]) == "".join(pieces)
        assert tok.decode(lay.ids[lay.rows_start:]).lstrip().startswith(QUESTION)  # " What": its space too
        for p, text in enumerate(pieces):
            assert tok.decode([t for t, q in zip(lay.ids[c0:c1], lay.piece_of) if q == p]) == text


def test_full_document_layout_is_the_task_prompt(smollm):
    _, tok = smollm
    for name in ("niah_grid", "niah_single_2", "niah_multikey_2"):
        sample = get_task(name).samples(tok, 1024, 2, seed=3)[1]
        document, question, template = sample_split(sample)
        spans, _ = split_document(tok, document, 1024)
        lay = layout(tok, Template.parse(template), [document[a:b] for a, b in spans], question,
                     sample.answer_prefix, chat=True)
        assert lay.ids == build_prompt(tok, sample, chat=True), name


# -- scores ---------------------------------------------------------------------------------------------------------
def brute_force_scores(model, ids: list[int], rows_start: int, context: tuple[int, int], phrase: int):
    """The official computation with numpy, from output_attentions of an eager forward."""
    model.set_attn_implementation("eager")
    with torch.no_grad():
        att = model(torch.tensor([ids]), output_attentions=True).attentions[-1][0].sum(0).double().numpy()  # (L, L)
    rows = att[rows_start:]
    w = rows[:, rows_start:].sum(1, keepdims=True)  # question -> question
    q2c = np.stack([np.convolve(r, np.ones(phrase), mode="same") for r in rows[:, context[0]:context[1]]])
    return (w * w * q2c).sum(0), rows


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3])
@pytest.mark.parametrize("prefill_chunk", [16, 128])
def test_scores_equal_a_brute_force_from_output_attentions(make, prefill_chunk):
    model = make(seed=1)
    ids = torch.randint(0, 256, (70,), generator=torch.Generator().manual_seed(0)).tolist()
    rows_start, context = 58, (6, 52)
    want, want_rows = brute_force_scores(model, ids, rows_start, context, 8)
    with attnkit.apply(model, "infiniretri") as run:
        assert last_global_layer(run) == len(run.layer_types) - 1
        rows = question_attention(run, model, ids, rows_start, prefill_chunk)
    got, weights = phrase_scores(rows, context, 8)
    np.testing.assert_allclose(rows.double().numpy(), want_rows, atol=1e-5)
    np.testing.assert_allclose(got.double().numpy(), want, rtol=1e-4, atol=1e-5)
    assert weights.shape == (70 - rows_start,)


def test_phrase_kernel_windows_and_the_square_of_the_weights():
    rows = torch.zeros((2, 20))
    rows[0, 10] = 1.0
    rows[1, 3] = 1.0
    scores, w = phrase_scores(rows, (0, 16), 8, weights=torch.tensor([2.0, 1.0]))
    assert torch.equal(scores.nonzero().flatten(), torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]))
    assert scores[6] == 1.0 and scores[8] == 4.0 and scores[14] == 4.0 and scores[7] == 4.0 + 1.0  # i-4 .. i+3


def test_kept_sentences_hold_the_topk_tokens_and_replace_the_old_ones():
    method = InfiniRetri(topk=3)
    scores = torch.tensor([0.1, 0.9, 0.2, 0.8, 0.05, 0.7, 0.3])
    piece_of = [0, 0, 1, 1, 2, 3, 3]  # context token -> piece
    pieces = [4, 9, 11, 20]  # piece -> document sentence (4: kept from before, 9..20: this chunk)
    counts = [10] * 21
    stats = {"capped": 0}
    kept = method._keep(scores, piece_of, pieces, counts, None, stats)
    top = scores.topk(3).indices.tolist()  # tokens 1, 3, 5
    assert kept == sorted({pieces[piece_of[t]] for t in top}) == [4, 9, 20]
    assert 11 not in kept  # an old cached sentence without a top token would be dropped just the same
    capped = method._keep(scores, piece_of, pieces, counts, 25, stats)  # room for two: the best-scoring ones
    assert capped == [4, 9] and stats["capped"] == 1


# -- the driver -----------------------------------------------------------------------------------------------------
def test_smollm2_keeps_the_needle_sentence_and_answers_from_it(smollm):
    model, tok = smollm
    half = HAYSTACK.split(". ")
    document = ". ".join(half[:60]) + f". {NEEDLE} " + ". ".join(half[60:])
    gen = attnkit.infiniretri(model, tok, document, QUESTION, chunk=160, topk=48, max_new_tokens=8,
                              answer_prefix=" The secret code is")
    reader = gen.stats["reader"]
    assert reader["chunks"] >= 4 and reader["max_forward_tokens"] < reader["document_tokens"]
    kept = [document[a:b] for a, b in reader["kept_spans"]]
    assert any(NEEDLE in k for k in kept), kept
    assert reader["kept_tokens"] < reader["document_tokens"] / 3
    assert "4817293" in gen.text, gen.text
    many = attnkit.infiniretri(model, tok, [document[:300], document[:200]], QUESTION, chunk=64, max_new_tokens=1)
    assert isinstance(many, list) and len(many) == 2


def test_driver_settings_and_inputs_are_validated(smollm):
    model, tok = smollm
    with pytest.raises(ValueError, match="topk=0 is invalid"):
        attnkit.make_method("infiniretri", topk=0)
    with pytest.raises(ValueError, match="did you mean 'chunk'"):
        attnkit.infiniretri(model, tok, HAYSTACK, QUESTION, chunks=64)
    with pytest.raises(ValueError, match="'{question}' slot"):
        attnkit.infiniretri(model, tok, HAYSTACK, QUESTION, template="{context} only")
    with pytest.raises(ValueError, match="exceed the model's context of 8192"):
        attnkit.infiniretri(model, tok, HAYSTACK, QUESTION, chunk=8192)
    with attnkit.apply(model, "snapkv", budget=64), pytest.raises(ValueError, match="reads with dense attention"):
        attnkit.infiniretri(model, tok, HAYSTACK, QUESTION)


# -- the eval runner ------------------------------------------------------------------------------------------------
@pytest.fixture
def tiny_bytes():
    runner.register_model("tiny-bytes", lambda device, dtype: (tiny_llama(seed=2), byte_tokenizer()), "tiny-bytes/1")
    yield "tiny-bytes"
    runner._MODELS.pop("tiny-bytes", None)
    runner._LOADED.clear()


def test_runner_drives_a_driver_method_per_sample(tiny_bytes, tmp_path):
    config = runner.SweepConfig(models=[tiny_bytes], methods=["infiniretri"], budgets=[], tasks=["niah_grid"],
                                lengths=[1536], samples=2, chat=False, batch=2,
                                overrides={"infiniretri": {"chunk": 256, "topk": 32}})
    result = runner.run_sweep(config, str(tmp_path / "r.db"), progress=False)
    assert result.written == 2
    import sqlite3

    rows = sqlite3.connect(tmp_path / "r.db").execute("select extra_json, prompt_tokens from results").fetchall()
    for extra_json, prompt_tokens in rows:
        extra = json.loads(extra_json)
        assert extra["batch"] == 1 and extra["reader"]["chunks"] >= 4  # one sample per call, read in chunks
        assert prompt_tokens < extra["prompt_tokens"]  # it answered from the kept sentences, not the haystack


def test_runner_refuses_tasks_without_a_document_split(tiny_bytes):
    config = runner.SweepConfig(models=[tiny_bytes], methods=["infiniretri"], budgets=[], tasks=["niah_grid"],
                                lengths=[512], samples=1, chat=False)
    cell = runner.build_grid(config, {tiny_bytes: "tiny-bytes/1"})[0]
    model, tok = runner.get_model(tiny_bytes, "cpu", None)
    plain = Sample("vt", 0, 512, "no split here", "", ("x",), 4, "string_match_all")
    with pytest.raises(ValueError, match="task 'vt' has no document/question split"):
        runner.evaluate_batch(model, tok, cell, get_task("niah_grid"), [plain])
    with pytest.raises(ValueError, match="infiniretri is a generation driver; task 'ppl'"):
        runner.validate(runner.SweepConfig(models=["m"], methods=["full", "infiniretri"], budgets=[],
                                           tasks=["ppl"], lengths=[512]))
    with pytest.raises(ValueError, match="no document/question split"):
        drive_sample(InfiniRetri(), model, tok, plain, chat=False, prefill_chunk=512)
