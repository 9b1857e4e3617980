"""Fixed-shape decode steps and their capture in CUDA graphs.

After the prefill every cache layer switches to static decode (:meth:`~attnkit.hf.cache.KVLayer.begin_static`):
buffers are sized once, each step writes at a device-held slot (append, ring or freed slot), attention reads a
fixed span under position validity, and nothing in a step depends on a host value that changes between steps.
On CUDA the whole step (all layers, the LM head included) is captured once in a CUDA graph and replayed; the
host counters a step advances (``n``, ``seen``) are advanced by the decoder after each step, never inside it.
Sampling stays outside the graph. The same step runs eagerly when graphs are off, so tokens with and without
graphs are identical.

With ``compile`` the step is traced by ``torch.compile`` (Inductor) before its capture: the model's own small
kernels (RMSNorm, RoPE, residual adds, SiLU * up), launched one by one in eager mode (~1,200 launches per step
for a 32-layer Llama, 1.9 ms on an H200), become a few fused kernels per layer, and the graph replays those.
attnkit's cache writes and attention stay opaque custom ops (:mod:`attnkit.hf.step_ops`) that run exactly the
uncompiled code. Fused kernels round differently, so compiled tokens match the uncompiled ones within
tolerance, not bit for bit (graphs on and off stay identical at a given ``compile``).
"""

from __future__ import annotations

import time
import types
import warnings
from typing import Callable

import torch

from attnkit.hf import step_ops
from attnkit.session import cache_argument

#: eager static steps before capture (Triton compiles and autotunes, cuBLAS picks its kernels), on a side stream
WARMUP_STEPS = 2
#: decodes shorter than this do not pay for a capture
MIN_GRAPH_STEPS = 8
#: compiled steps: one trace per decode is expected; a surprise recompile beyond this fails loudly (fullgraph)
RECOMPILE_LIMIT = 16
#: torch.compile modes a step may use; the "reduce-overhead" family captures CUDA graphs of its own, which the
#: decoder's graph would nest
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


def compile_step(method, backend="inductor", mode: str | None = None):
    """``torch.compile`` of a bound decode-step method: static shapes, one graph for the whole step (the model's
    ops around attnkit's opaque write and attention ops), else an error (no silent graph breaks).

    The function is first copied with its own code object: Dynamo keeps compiled frames per code object, so each
    decoder traces its own step, its entries are freed with it, and many generate calls never pile up guards on one
    code object (whose recompile limit would otherwise turn later steps silently eager).
    """
    fn = method.__func__
    own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    step = types.MethodType(own, method.__self__)
    return torch.compile(step, dynamic=False, fullgraph=True, backend=backend, mode=mode)


def static_unavailable(run, cache) -> str | None:
    """Why this run's cache cannot take fixed-shape decode steps, in a few words (None: it can)."""
    if run is None or not hasattr(cache, "layers") or not hasattr(cache.layers[0], "begin_static"):
        return "no attnkit method is active (dense model with a DynamicCache)"
    if run.recorder is not None:
        return "a recorder is attached (it needs the per-step masks of the dynamic path)"
    for layer in cache.layers:
        reason = layer.static_unsupported()
        if reason is not None:
            return f"layer {layer.layer_idx} ({type(layer).__name__}): {reason}"
    return None


class StaticDecoder:
    """Runs single-token decode steps of a prefilled attnkit cache with fixed shapes, replayed from a CUDA graph
    when ``graphs`` is set (CUDA only).

    ``step(token, pos)`` takes (B,) token ids and (B, 1) positions on the device and returns (B, V) logits (a
    static buffer when replaying: read or copy it before the next step). ``compile``: True for Inductor, or a
    torch.compile backend (tests use Dynamo's ``eager``); ``compile_mode``: one of :data:`COMPILE_MODES`.
    """

    def __init__(
        self, model: torch.nn.Module, cache, steps: int, graphs: bool, compile: bool | str | Callable = False,
        compile_mode: str | None = None,
    ) -> None:
        self.model, self.cache = model, cache
        self.compiled = None
        if compile:
            step_ops.register(cache)  # attnkit's writes and attention stay opaque to the compiler
            self.compiled = compile_step(self._eager_forward, "inductor" if compile is True else compile, compile_mode)
        self.compile_note = "compiled" if compile else "not compiled"
        self.arg = cache_argument(model)
        first = cache.layers[0]
        b = first.keys.shape[0]
        device = first.keys.device
        self.ids = torch.zeros((b, 1), dtype=torch.long, device=device)
        self.pos = torch.zeros((b, 1), dtype=torch.long, device=device)
        self.graphs = graphs and device.type == "cuda" and steps >= MIN_GRAPH_STEPS
        self.captured: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # phase -> (graph, logits)
        self.warm: dict[tuple, int] = {}  # phase -> eager steps run so far
        self.replays = 0
        self.after_ready = 0  # steps (replayed or not) since the first capture
        self.ready_at = 0.0  # perf_counter() when the first graph was captured (steady-state timing starts there)
        self.capture_s = 0.0
        self.reason: str | None = None if self.graphs else "graphs off"
        reason = static_unavailable(getattr(cache, "run", None), cache)
        if reason is not None:
            raise RuntimeError(f"fixed-shape decode is not available here: {reason}")
        for layer in cache.layers:
            layer.begin_static(steps)

    @property
    def mode(self) -> str:
        """``cuda_graph`` once captured, else ``static (<reason>)``; ``, compiled`` (or why not) when asked to."""
        if self.captured:
            mode = "cuda_graph" if len(self.captured) == 1 else f"cuda_graph ({len(self.captured)} phases)"
        else:
            mode = f"static ({self.reason or 'not captured yet'})"
        return mode if self.compile_note == "not compiled" else f"{mode}, {self.compile_note}"

    def _forward(self) -> torch.Tensor:
        if self.compiled is not None:
            # The traced forward pre-hook's Python side effects are replayed only after the graph ran: clear the
            # prefill's padding mask now, as the uncompiled hook does before the layers (a step has no padding).
            self.cache.run.note_attention_mask(None)
            try:
                with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                    return self.compiled()
            except Exception as exc:  # an op the compiler cannot trace: this decode runs uncompiled, and says why
                self.compiled = None
                first = " ".join(line.strip() for line in str(exc).strip().splitlines()[:2])[:200]
                self.compile_note = f"compile failed: {type(exc).__name__}: {first}"
                warnings.warn(f"attnkit: decoding uncompiled ({self.compile_note})", stacklevel=3)
        return self._eager_forward()

    def _eager_forward(self) -> torch.Tensor:
        out = self.model(input_ids=self.ids, position_ids=self.pos, use_cache=True, logits_to_keep=1,
                         **{self.arg: self.cache})
        return out.logits[:, -1]

    def step(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(token.view(-1, 1))
        self.pos.copy_(pos)
        phase = tuple(layer.static_phase() for layer in self.cache.layers)
        if self.captured:
            self.after_ready += 1
        if phase in self.captured:
            return self._replay(phase)
        # warm-up: the first phase runs two eager steps before its capture (Triton compiles, cuBLAS picks its
        # kernels), a later phase one
        need = WARMUP_STEPS if not self.captured else 1
        if self.graphs and self.warm.get(phase, 0) >= need:
            self._capture(phase)
            if phase in self.captured:
                self.after_ready = max(self.after_ready, 1)
                return self._replay(phase)
        if self.graphs:  # warm-up on a side stream, as capture wants
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                logits = self._forward()
            torch.cuda.current_stream().wait_stream(side)
        else:
            logits = self._forward()
        self._advance_host()
        self.warm[phase] = self.warm.get(phase, 0) + 1
        return logits

    def _advance_host(self) -> None:
        for layer in self.cache.layers:
            layer.advance_host()

    def _replay(self, phase: tuple) -> torch.Tensor:
        graph, logits = self.captured[phase]
        graph.replay()
        self.replays += 1
        self._advance_host()
        return logits

    def _capture(self, phase: tuple) -> None:
        layers = self.cache.layers
        state = [layer.host_state() for layer in layers]
        graph = torch.cuda.CUDAGraph()
        start = time.perf_counter()
        try:
            with torch.cuda.graph(graph):
                logits = self._forward()
        except Exception as exc:  # a model op that cannot be captured: keep decoding eagerly, say why
            self.graphs = False
            first = (str(exc).strip().splitlines() or [""])[0][:160]
            self.reason = f"capture failed: {type(exc).__name__}: {first}"
            return
        finally:
            for layer, s in zip(layers, state):
                layer.set_host_state(s)
            run_current = getattr(getattr(self.cache, "run", None), "current", None)
            if run_current is not None:
                run_current.clear()
        self.captured[phase] = (graph, logits)
        torch.cuda.synchronize()
        now = time.perf_counter()
        if not self.ready_at:
            self.ready_at = now
        self.capture_s += now - start

    def close(self) -> None:
        """Back to the dynamic layout, so that the cache can take further (prefill or decode) forwards."""
        for layer in self.cache.layers:
            layer.end_static()
        self.captured.clear()
        step_ops.unregister(self.cache)
