"""attnkit.zoo's training step: label positions gathered by index equal the boolean mask, and on CUDA the step
replayed from a CUDA graph trains exactly like the eager step (warm-up, capture, an epoch's short last batch)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from attnkit.zoo.lm import LMConfig, TinyLM
from attnkit.zoo.mqar import mqar
from attnkit.zoo.step import AHEAD, TrainStep, label_positions


def test_label_positions_gather_the_boolean_masks_logits():
    torch.manual_seed(0)
    model = TinyLM(LMConfig(vocab_size=64, d_model=32, mixers=["base_conv", "softmax"], n_layers=2))
    x, y = mqar(8, 64, 32, 4, 0.01, seed=3)
    pos = label_positions(y)
    assert pos.shape == (8, 4) and bool((y.gather(1, pos) != -100).all())
    at = y != -100
    torch.testing.assert_close(model(x, at=pos), model(x, at=at), rtol=0, atol=0)


def test_label_positions_refuse_rows_with_unequal_label_counts():
    y = torch.full((2, 8), -100)
    y[0, 3], y[1, 2], y[1, 5] = 1, 2, 3
    assert label_positions(y) is None


def test_a_graph_step_off_cuda_is_one_clear_error():
    model = TinyLM(LMConfig(vocab_size=64, d_model=16, mixers="softmax", n_layers=1))
    x, y = mqar(4, 64, 16, 2, 0.01, seed=1)
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="CUDA-graph step needs a CUDA device"):
        TrainStep(model, opt, x, y, 2, graph=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("mixers", [["base_conv", "based"], ["base_conv", "sliding_window"], "softmax"])
def test_the_graph_step_trains_like_the_eager_step(mixers):
    torch.manual_seed(0)
    eager_model = TinyLM(LMConfig(vocab_size=512, d_model=64, mixers=mixers, n_layers=2)).cuda()
    graph_model = copy.deepcopy(eager_model)
    x, y = (t.cuda() for t in mqar(200, 512, 64, 8, 0.01, seed=5))

    def setup(model: TinyLM, graph: bool) -> TrainStep:
        opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(3e-3, device="cuda"), fused=True, capturable=True)
        return TrainStep(model, opt, x, y, 32, graph=graph)

    steps = {False: setup(eager_model, False), True: setup(graph_model, True)}
    gen = torch.Generator().manual_seed(0)
    losses = {False: [], True: []}
    for _ in range(2):  # two epochs of 7 steps, the 7th of 8 rows: warm-up, capture, replays, eager short batches
        order = torch.randperm(200, generator=gen).cuda()
        for i, start in enumerate(range(0, 200, 32)):
            for graph, step in steps.items():
                step.set_lr(3e-3 * (1 - i / 10))
                losses[graph].append(step(order[start : start + 32]).item())
    assert steps[True]._graph is not None and steps[False]._graph is None
    assert 0 < len(steps[True]._throttle._pending) <= AHEAD  # the replays went through the throttle
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(graph_model.named_parameters(), eager_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_a_mixture_run_with_one_graph_per_segment_trains_like_the_eager_run():
    """Zoology's data mixture on CUDA: one captured step per segment shape, all on one capturable AdamW."""
    from attnkit.zoo.train import TrainConfig, train

    cfg = TrainConfig(mixers=["base_conv", "softmax"], vocab_size=512, d_model=64, batch_size=32, lr=3e-3, epochs=2,
                      train_mix="64x8:200,128x16:120", test_mix="64x8:64,128x16:64,256x32:64")
    eager = train(cfg, None, None, device="cuda", progress=False, graph=False)
    graph = train(cfg, None, None, device="cuda", progress=False, graph=True)
    torch.testing.assert_close(torch.tensor(json.loads(graph["history_json"])),
                               torch.tensor(json.loads(eager["history_json"])), rtol=0, atol=2e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_runs_side_by_side_on_their_own_streams_train_like_runs_one_by_one(tmp_path):
    """``zoo sweep --concurrent``: runs in several threads, each on its own stream, their graph captures taking
    turns, train like the sequential sweep."""
    from attnkit.zoo.sweep import grid, run_sweep

    configs = grid(["base_conv+softmax", "base_conv+based"], [64], [(64, 8)], [3e-3, 1e-2], vocab_size=512,
                   train_examples=640, test_examples=128, batch_size=32, epochs=2)
    one = run_sweep(configs, tmp_path / "a.db", tmp_path / "a", device="cuda", progress=False)
    side = run_sweep(configs, tmp_path / "b.db", tmp_path / "b", device="cuda", progress=False, concurrent=4)
    assert [r["run_key"] for r in side] == [c.key() for c in configs]
    for a, b in zip(one, side):
        torch.testing.assert_close(torch.tensor(json.loads(b["history_json"])),
                                   torch.tensor(json.loads(a["history_json"])), rtol=0, atol=2e-3)
    assert_same_weights(configs, tmp_path / "a", tmp_path / "b")


def assert_same_weights(configs, one: Path, side: Path) -> None:
    """Each run's final weights (its last checkpoint) equal between two sweeps: a run whose steps went into another
    run's graph, or that replayed another's, trained on other batches (accuracies of such tiny runs are often near
    chance, so they alone would not tell)."""
    from safetensors.torch import load_file

    for c in configs:
        name = f"{c.key()[:20]}.safetensors"
        a, b = load_file(str(one / name)), load_file(str(side / name))
        for k in (k for k in a if k.startswith("model.")):
            torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4, msg=lambda m, k=k: f"{c.key()[:8]} {k}: {m}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_eight_mixture_runs_four_at_a_time_train_like_runs_one_by_one(tmp_path):
    """Runs that start while others replay, each capturing one graph per segment on its own stream (before
    own_stream, pool streams handed out round-robin put one run's kernels into another's capture)."""
    from attnkit.zoo.sweep import grid, run_sweep

    configs = grid(["base_conv+softmax", "base_conv+sliding_window"], [32, 64], [(64, 8)], [1e-3, 3e-3],
                   vocab_size=512, train_mix="64x4:320,128x8:320", test_mix="64x4:64,128x8:64", batch_size=32,
                   epochs=2, early_stop=1.0)
    one = run_sweep(configs, tmp_path / "a.db", tmp_path / "a", device="cuda", progress=False)
    side = run_sweep(configs, tmp_path / "b.db", tmp_path / "b", device="cuda", progress=False, concurrent=4)
    assert [r["run_key"] for r in side] == [c.key() for c in configs] and all(r["finished"] for r in side)
    for a, b in zip(one, side):  # a few flipped predictions at most (kernels may differ by stream)
        torch.testing.assert_close(torch.tensor(json.loads(b["history_json"])),
                                   torch.tensor(json.loads(a["history_json"])), rtol=0, atol=1e-2)
    assert_same_weights(configs, tmp_path / "a", tmp_path / "b")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_a_replay_waits_while_another_thread_captures(monkeypatch):
    """Runs side by side: one thread replays its graph while another captures (a finished run's successor). The
    replay must wait for the capture (torch refuses it during one); both steps then train as their eager twins."""
    import threading

    torch.manual_seed(0)
    x, y = (t.cuda() for t in mqar(64, 512, 64, 8, 0.01, seed=5))

    def make(graph: bool, seed: int) -> tuple[TinyLM, TrainStep]:
        torch.manual_seed(seed)
        model = TinyLM(LMConfig(vocab_size=512, d_model=64, mixers="softmax", n_layers=2)).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=torch.tensor(3e-3, device="cuda"), fused=True, capturable=True)
        return model, TrainStep(model, opt, x, y, 32, graph=graph)

    idx = torch.arange(32, device="cuda")
    (_, a), (_, b) = make(True, 1), make(True, 2)
    for _ in range(4):  # a: warm-up and capture; it replays from now on
        a(idx)
    for _ in range(3):  # b: warm-up only; its next call captures
        b(idx)
    capturing, replayed = threading.Event(), []
    real_step = b._step

    def slow_step(i, set_to_none=True):  # b's capture: let a replay in the middle of it
        capturing.set()
        threading.Event().wait(0.3)
        return real_step(i, set_to_none)

    monkeypatch.setattr(b, "_step", slow_step)

    def replay_a():
        capturing.wait(5)
        replayed.append(a(idx))

    t = threading.Thread(target=replay_a)
    t.start()
    b(idx)
    t.join()
    torch.cuda.synchronize()
    assert b._graph is not None and len(replayed) == 1 and torch.isfinite(replayed[0])


class PoolStream:
    """torch's stream pool without a GPU: each new stream is the next of 32 handles, round-robin."""

    handed = 0

    def __init__(self, device=None) -> None:
        self.cuda_stream = 1000 + PoolStream.handed % 32
        PoolStream.handed += 1
        self.synced = False

    def synchronize(self) -> None:
        self.synced = True


def test_own_streams_never_share_a_pool_stream_with_a_held_one(monkeypatch):
    """32 requests after a run took a pool stream, a plain request returns that stream again; own_stream skips it
    while the run holds it, and a 33rd run side by side is one clear error."""
    import contextlib

    from attnkit.zoo import step

    monkeypatch.setattr(torch.cuda, "Stream", PoolStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    with step.own_stream() as held:
        for _ in range(31):
            PoolStream()  # other requests go round the pool
        with step.own_stream() as other:
            assert other.cuda_stream == 1000 + (held.cuda_stream - 1000 + 1) % 32  # the held one skipped
    assert held.synced and other.synced and not step._HELD  # finished and given back
    with contextlib.ExitStack() as runs:
        streams = {runs.enter_context(step.own_stream()).cuda_stream for _ in range(32)}
        assert len(streams) == 32
        with pytest.raises(RuntimeError, match="every one of torch's 32 pool streams is held .* at most 32 runs"):
            runs.enter_context(step.own_stream())
    assert not step._HELD


class FakeEvent:
    """A CUDA event's bookkeeping without a GPU: which launch it marks, whether the host waited on it."""

    made = 0

    def __init__(self) -> None:
        FakeEvent.made += 1
        self.launch, self.waited = None, False

    def record(self) -> None:
        self.launch, self.waited = Launches.count, False

    def synchronize(self) -> None:
        self.waited = True
        Launches.waited_for.append(self.launch)


class Launches:
    count = 0
    waited_for: list[int] = []


def test_the_throttle_keeps_the_host_at_most_ahead_launches_in_front_and_reuses_its_events():
    from attnkit.zoo.step import Throttle

    FakeEvent.made, Launches.count, Launches.waited_for = 0, 0, []
    throttle = Throttle(ahead=3, event=FakeEvent)
    for launch in range(10):
        throttle.wait()
        Launches.count = launch  # the launch itself
        throttle.mark()
        assert len(throttle._pending) == min(launch + 1, 3)
    assert Launches.waited_for == list(range(7))  # before launch i, launch i - 3 had run
    assert FakeEvent.made == 3  # one per slot: waited-on events are recorded again
