"""Fixed-shape decode steps and their capture in CUDA graphs.

After the prefill every cache layer switches to static decode (:meth:`~attnkit.hf.cache.KVLayer.begin_static`):
buffers are sized once, each step writes at a device-held slot (append, ring or freed slot), attention reads a
fixed span under position validity, and nothing in a step depends on a host value that changes between steps.
On CUDA the whole step (all layers, the LM head included) is captured once in a CUDA graph and replayed; the
host counters the step advances (``n``, ``seen``) are snapshotted around the capture and advanced after each
replay. Sampling stays outside the graph. The same step runs eagerly when graphs are off, so tokens with and
without graphs are identical.
"""

from __future__ import annotations

import time

import torch

from attnkit.session import cache_argument

#: eager static steps before capture (Triton compiles and autotunes, cuBLAS picks its kernels), on a side stream
WARMUP_STEPS = 2
#: decodes shorter than this do not pay for a capture
MIN_GRAPH_STEPS = 8


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
    static buffer when replaying: read or copy it before the next step).
    """

    def __init__(self, model: torch.nn.Module, cache, steps: int, graphs: bool) -> None:
        self.model, self.cache = model, cache
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
        """``cuda_graph`` once captured, else ``static (<reason>)``."""
        if self.captured:
            return "cuda_graph" if len(self.captured) == 1 else f"cuda_graph ({len(self.captured)} phases)"
        return f"static ({self.reason or 'not captured yet'})"

    def _forward(self) -> torch.Tensor:
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
        self.warm[phase] = self.warm.get(phase, 0) + 1
        return logits

    def _replay(self, phase: tuple) -> torch.Tensor:
        graph, logits = self.captured[phase]
        graph.replay()
        self.replays += 1
        for layer in self.cache.layers:
            layer.advance_host()
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
