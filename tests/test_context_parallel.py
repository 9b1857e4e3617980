"""Context-parallel prefill on CPU: gloo process groups of 2 (and 4) spawned here, held to one process.

One spawn per world size runs every case and rank 0 writes the largest error over ranks per case; the tests
below read them. Attention alone (ring and Ulysses, zigzag and contiguous, GQA, causal / window / block lists)
against the float32 dense reference; cp_prefill's logits against the same model in one process (``full``,
attnkit's ``window`` and ``dhsa`` with fixed chunks through attnkit.apply); torch's context_parallel shards a
sequence as our zigzag layout (what ``torch_ring`` relies on; its ring itself needs CUDA); bad inputs raise
one ValueError.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from attnkit.parallel import BlockLists, SeqLayout, WindowMask, check_heads, ring_attention, ulysses_attention
from attnkit.reference import dense_attention

N, D = 64, 16
TOL = 1e-5
HEADS = [(4, 4), (4, 2), (4, 1)]  # (query heads, KV heads)


def _visibilities(n: int):
    g = torch.Generator().manual_seed(3)
    chosen = torch.rand(2, n // 8, n, generator=g) < 0.4  # random key choices per query block of 8
    return {"causal": None, "window": WindowMask(5), "lists": BlockLists(chosen, 8, n - 4)}


def _attention_cases(world: int, rank: int) -> dict[str, float]:
    """Max error of ring / Ulysses attention against dense attention, per case, on this rank (four ranks: the
    grouped-head cases, causal and block lists only, to keep the run short on two cores)."""
    errs = {}
    pos = torch.arange(N)
    for h, hkv in HEADS if world == 2 else HEADS[1:]:
        g = torch.Generator().manual_seed(h * 10 + hkv)
        q, k, v = (torch.randn(2, x, N, D, generator=g) for x in (h, hkv, hkv))
        for vname, vis in _visibilities(N).items():
            if world > 2 and vname == "window":
                continue
            mask = (pos.view(-1, 1) >= pos.view(1, -1))[None, None] if vis is None else vis.mask(pos, pos)
            ref = dense_attention(q, k, v, mask, D**-0.5)[0]
            for kind in ("zigzag", "contiguous"):
                lay = SeqLayout(N, world, rank, kind)
                local = [lay.shard(x, 2) for x in (q, k, v)]
                for name, fn in (("ring", ring_attention), ("ulysses", ulysses_attention)):
                    out = fn(*local, lay, None, D**-0.5, vis)
                    errs[f"{name}/{kind}/{h}x{hkv}/{vname}"] = float((out - lay.shard(ref, 2)).abs().max())
    return errs


def _torch_layout_error(world: int, rank: int) -> float:
    """1.0 unless torch's context_parallel shards a sequence as our zigzag layout (what strategy='torch_ring'
    relies on: RoPE positions and masks from SeqLayout, ring from torch). Sharding runs on CPU too."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor.experimental import context_parallel

    mesh = DeviceMesh.from_group(dist.group.WORLD, device_type="cpu")
    pos = torch.arange(N).view(1, -1)
    with context_parallel(mesh, buffers=[pos], buffer_seq_dims=[1], no_restore_buffers={pos}):
        same = torch.equal(pos[0], SeqLayout(N, world, rank, "zigzag").positions())
    return 0.0 if same else 1.0


def _error_messages(world: int, rank: int, model=None) -> dict[str, str]:
    """The ValueError text of each bad input (raised before any communication, on every rank alike)."""
    from attnkit.parallel import cp_prefill

    msgs = {}
    calls = {
        "length": lambda: SeqLayout(N - 2, world, rank, "zigzag"),
        "heads": lambda: ulysses_attention(*(torch.zeros(1, x, N // world, D) for x in (3, 1, 1)),
                                           SeqLayout(N, world, rank, "contiguous")),
    }
    if model is not None:
        ids = torch.zeros(1, N, dtype=torch.long)
        calls["strategy"] = lambda: cp_prefill(model, ids, strategy="zigzag_ring")
        calls["torch_ring_cpu"] = lambda: cp_prefill(model, ids, strategy="torch_ring")
        calls["dhsa_mass"] = lambda: cp_prefill(model, ids, method="dhsa", budget=16, recent=4, sinks=4,
                                                   boundaries="mass")
        calls["prefill_length"] = lambda: cp_prefill(model, torch.zeros(1, N - 2, dtype=torch.long))
    for name, call in calls.items():
        try:
            call()
            msgs[name] = "no error"
        except ValueError as exc:
            msgs[name] = str(exc)
    return msgs


def _model_cases(world: int, rank: int) -> tuple[dict[str, float], dict[str, str]]:
    """Max error of cp_prefill's logits against the same model in one process."""
    import attnkit
    from attnkit.methods.read.dhsa import DHSA
    from attnkit.parallel import cp_prefill
    from tiny import tiny_llama

    model = tiny_llama()
    ids = torch.randint(0, 256, (2, N), generator=torch.Generator().manual_seed(1))
    dhsa = DHSA(budget=24, block=8, chunk=8, recent=8, sinks=4, dense_tail=4, boundaries="fixed", kernel="gather")
    with torch.no_grad():
        ref = {"full": model(ids).logits}
        with attnkit.apply(model, "window", window=10):
            ref["window"] = model(ids).logits
        with attnkit.apply(model, dhsa):
            ref["dhsa"] = model(ids).logits
    settings = {"full": {}, "window": {"window": 10}, "dhsa": {}}
    # the selections must matter: window and DHSA read fewer keys than full attention
    errs = {f"{m}_vs_full": float((ref[m] - ref["full"]).abs().max()) for m in ("window", "dhsa")}
    for method in ("full", "window", "dhsa"):
        m = dhsa if method == "dhsa" else method
        for strategy, layout in (("ring", "zigzag"), ("ring", "contiguous"), ("ulysses", "contiguous"),
                                 ("ulysses", "zigzag")):
            out = cp_prefill(model, ids, strategy, method=m, layout=layout, logits="full", **settings[method])
            errs[f"{method}/{strategy}/{layout}"] = float((out - ref[method]).abs().max())
    last = cp_prefill(model, ids, "ring", logits="last")
    errs["last/ring"] = float((last - ref["full"][:, -1]).abs().max())
    local = cp_prefill(model, ids, "ulysses", logits="local")
    lay = SeqLayout(N, world, rank, "contiguous")
    errs["local/ulysses"] = float((local - lay.shard(ref["full"], 1)).abs().max())
    errs["restored"] = 0.0 if model.config._attn_implementation == "sdpa" else 1.0
    return errs, _error_messages(world, rank, model)


def _worker(rank: int, world: int, store: str, out: str, with_model: bool) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        errs = _attention_cases(world, rank)
        errs["torch_layout"] = _torch_layout_error(world, rank)
        msgs = _error_messages(world, rank)
        if with_model:
            more, msgs = _model_cases(world, rank)
            errs.update(more)
        names = sorted(errs)  # the largest of every error over the ranks ("_vs_full" ones are equal on all)
        worst = torch.tensor([errs[k] for k in names], dtype=torch.float64)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        if rank == 0:
            with open(out, "w") as f:
                json.dump({"errors": dict(zip(names, worst.tolist())), "messages": msgs}, f)
    finally:
        dist.destroy_process_group()


def _spawn(world: int, tmp_path_factory, with_model: bool) -> dict:
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    import multiprocessing

    import torch.multiprocessing as mp

    folder = Path(tmp_path_factory.mktemp(f"cp{world}"))  # a file store: no TCP port to pick or race for
    out = str(folder / "results.json")
    # a fork server imports torch, attnkit and transformers' Llama once for every process of both spawns (~4 s
    # each on two cores otherwise); it is a fresh process, so no OpenMP state of this one is forked. (Python
    # 3.11's fork server ignores sys.path, so this test module itself is imported by each child: it is light.)
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    if method == "forkserver":
        multiprocessing.get_context(method).set_forkserver_preload(
            ["attnkit", "attnkit.parallel", "attnkit.methods.read.dhsa", "transformers.models.llama.modeling_llama"])
    mp.start_processes(_worker, args=(world, str(folder / "store"), out, with_model), nprocs=world, join=True,
                       start_method=method)
    with open(out) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> dict:
    return _spawn(2, tmp_path_factory, with_model=True)


@pytest.fixture(scope="module")
def four(tmp_path_factory) -> dict:
    return _spawn(4, tmp_path_factory, with_model=False)


def _check(errors: dict, prefix: str = "", tol: float = TOL) -> None:
    cases = {k: v for k, v in errors.items() if k.startswith(prefix)}
    assert cases, f"no case starts with {prefix!r}"
    bad = {k: v for k, v in cases.items() if not v <= tol}
    assert not bad, f"max |cp - reference| above {tol}: {bad}"


@pytest.mark.parametrize("strategy", ["ring", "ulysses"])
def test_attention_equals_dense_on_two_ranks(two, strategy):
    _check(two["errors"], strategy + "/")


@pytest.mark.parametrize("strategy", ["ring", "ulysses"])
def test_attention_equals_dense_on_four_ranks(four, strategy):
    """Four ranks: the ring's K/V travel several hops, Ulysses replicates 1 or 2 KV heads over 4 ranks."""
    _check(four["errors"], strategy + "/")


def test_torch_context_parallel_shards_as_zigzag(two, four):
    assert two["errors"]["torch_layout"] == 0.0 and four["errors"]["torch_layout"] == 0.0


@pytest.mark.parametrize("method", ["full", "window", "dhsa"])
def test_cp_prefill_logits_equal_one_process(two, method):
    _check(two["errors"], method + "/")
    assert len([k for k in two["errors"] if k.startswith(method + "/")]) == 4


def test_cp_prefill_outputs_and_restore(two):
    for key in ("last/ring", "local/ulysses", "restored"):
        assert two["errors"][key] <= TOL, (key, two["errors"][key])
    for method in ("window", "dhsa"):  # the sparse references really differ from full attention
        assert two["errors"][f"{method}_vs_full"] > 1e-3


@pytest.mark.parametrize(
    "case, needles",
    [
        ("length", ["62", "accepted", "divisible by 4"]),
        ("heads", ["3 query heads", "accepted", "divisible by the world size 2"]),
        ("strategy", ["'zigzag_ring'", "accepted", "'ring'", "'ulysses'", "'torch_ring'"]),
        ("torch_ring_cpu", ["'cpu'", "accepted", "CUDA"]),
        ("dhsa_mass", ["'mass'", "accepted", "'fixed'"]),
        ("prefill_length", ["62", "accepted"]),
    ],
)
def test_bad_inputs_raise_one_clear_error(two, case, needles):
    msg = two["messages"][case]
    assert all(s in msg for s in needles), msg


def test_validation_without_processes():
    with pytest.raises(ValueError, match="sequence length 30 is not a multiple of 2 x world size = 4"):
        SeqLayout(30, 2, 0, "zigzag")
    with pytest.raises(ValueError, match="accepted: 'zigzag', 'contiguous'"):
        SeqLayout(32, 2, 0, "striped")
    with pytest.raises(ValueError, match="8 KV heads over 3 ranks"):
        check_heads(6, 8, 3)
    check_heads(32, 8, 2)
    check_heads(32, 2, 4)  # KV heads replicated
    lay = [SeqLayout(16, 2, r, "zigzag") for r in range(2)]
    assert lay[0].positions().tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    x = torch.arange(16).view(1, 16)
    gathered = torch.cat([part.shard(x, 1) for part in lay], dim=1)
    assert torch.equal(lay[0].unshard(gathered, 1), x)
    assert lay[1].owner(15) == (0, 7)


@pytest.mark.parametrize("extra, needle", [
    (["--strategy", "ring,nope"], "strategy='nope' is invalid; accepted: 'ring', 'ulysses', 'torch_ring'"),
    (["--method", "snapkv"], "method 'snapkv' has no context-parallel prefill; accepted: 'full', 'window', 'dhsa'"),
    (["--length", "66"], "sequence length 66 is not a multiple of 2 x world size = 4"),
    (["--nproc", "-1"], "--nproc: -1 is out of range; accepted: >= 0"),
])  # fmt: skip
def test_the_torchrun_entry_refuses_bad_input_before_starting_processes(monkeypatch, capsys, extra, needle):
    from attnkit.parallel import run

    monkeypatch.setattr(run, "relaunch", lambda *a, **k: pytest.fail("processes were started"))
    with pytest.raises(SystemExit) as exc:
        run.main(["--nproc", "2", "--model", "tiny-llama", "--device", "cpu", "--length", "64", *extra])
    assert exc.value.code == 2 and needle in capsys.readouterr().err
