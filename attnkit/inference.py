"""Chunked prefill + decode loop and long-text perplexity, through whatever method is active."""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicCache

from attnkit.cache_io import CacheState, continue_ids
from attnkit.graphs import COMPILE_MODES, StaticDecoder, static_unavailable
from attnkit.hf.attention import ACTIVE_RUNS
from attnkit.session import cache_argument, text_config


@dataclass
class Generation:
    """What :func:`generate` produced and what it cost."""

    text: str
    tokens: list[int]
    prompt_tokens: int
    prefill_s: float
    decode_s: float
    decode_steps: int  # decode forwards timed in decode_s (the first token comes from the prefill)
    kv_bytes: int
    stats: dict = field(default_factory=dict)
    #: what a later ``generate(..., cache=gen.state)`` continues from (single-prompt calls inside attnkit.apply)
    state: "CacheState | None" = field(default=None, repr=False)

    @property
    def s_per_token(self) -> float:
        """Seconds per decode forward (NaN when only the prefill ran)."""
        return self.decode_s / self.decode_steps if self.decode_steps else float("nan")


def new_cache(model: torch.nn.Module) -> Cache:
    """The active run's cache inside ``attnkit.apply``, else transformers' DynamicCache (the dense model)."""
    run = ACTIVE_RUNS.get(id(text_config(model)))
    return run.new_cache() if run is not None else DynamicCache(config=text_config(model))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def encode(tokenizer, prompt: str | list[int] | torch.Tensor, chat: bool, device) -> torch.Tensor:
    """(1, L) input ids; ``chat`` wraps a string prompt in the tokenizer's chat template as a user turn."""
    if isinstance(prompt, torch.Tensor):
        ids = prompt if prompt.ndim == 2 else prompt.unsqueeze(0)
    elif isinstance(prompt, list):
        ids = torch.tensor([prompt])
    elif chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    if ids.shape[-1] == 0:
        raise ValueError("the prompt is empty")
    return ids.to(device)


def forward_chunks(
    model,
    ids: torch.Tensor,
    cache: Cache,
    chunk: int,
    progress=None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Feed (B, L) ids through the model ``chunk`` tokens at a time; returns the last chunk's (B, q, V) logits.

    attention_mask (B, L) marks padding (left-padded batches); position_ids (B, L) count each row's real tokens.
    """
    arg = cache_argument(model)
    logits = None
    for start in range(0, ids.shape[1], chunk):
        end = min(start + chunk, ids.shape[1])
        extra = {}
        if attention_mask is not None:
            extra["attention_mask"] = attention_mask[:, :end]
        if position_ids is not None:
            extra["position_ids"] = position_ids[:, start:end]
        logits = model(input_ids=ids[:, start:end], use_cache=True, logits_to_keep=1, **{arg: cache}, **extra).logits
        if progress is not None:
            progress.update(end - start)
    return logits


def left_pad(rows: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(1, L_i) id rows -> (B, L) ids, left-padded with ``pad_id``, and the (B, L) attention mask (None if equal)."""
    longest = max(r.shape[-1] for r in rows)
    if all(r.shape[-1] == longest for r in rows):
        return torch.cat(rows, dim=0), None
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long, device=rows[0].device)
    mask = torch.zeros((len(rows), longest), dtype=torch.long, device=rows[0].device)
    for i, r in enumerate(rows):
        ids[i, longest - r.shape[-1] :] = r[0]
        mask[i, longest - r.shape[-1] :] = 1
    return ids, mask


def _sample(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float, generator) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids, on the device (no host sync)."""
    if not do_sample:
        return logits.argmax(-1)
    probs = F.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


Prompt = str | list[int] | torch.Tensor


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    tokenizer,
    prompt: Prompt | list[Prompt],
    max_new_tokens: int = 64,
    prefill_chunk: int = 512,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    chat: bool = False,
    stop_at_eos: bool = True,
    answer_prefix: str = "",
    cuda_graphs: bool = True,
    static_decode: bool | None = None,
    cache: "CacheState | None" = None,
    eos_check_every: int = 16,
    compile: bool | str = False,
) -> Generation | list[Generation]:
    """Generate with chunked prefill and a decode loop free of per-step host syncs.

    Inside ``attnkit.apply`` the active method runs; outside it the model runs densely with a DynamicCache.
    The prompt is fed ``prefill_chunk`` tokens at a time, so no L x L score matrix is formed and eviction methods
    hold at most budget + chunk tokens. Decoding keeps tokens on the device and checks for EOS every 16 steps.
    ``answer_prefix`` is appended after the chat template's assistant turn (RULER-style).

    A list of prompts (strings, or token-id lists) is one batch: rows are left-padded, every method counts
    sinks, windows, budgets and positions from each row's first real token, and one :class:`Generation` per
    row is returned (timings are the batch's). A single prompt returns a single Generation.

    Decoding inside ``attnkit.apply`` on CUDA takes fixed-shape steps (:mod:`attnkit.graphs`) replayed from one
    CUDA graph per call; ``cuda_graphs=False`` (or ``ATTNKIT_CUDA_GRAPHS=0``) runs the same steps eagerly, for
    debugging, with the same tokens. ``static_decode`` forces the fixed-shape steps on (also on CPU) or off (the
    dynamic path, which is also what runs where a method cannot take them; ``stats["decode"]`` says which ran
    and why).

    ``compile=True`` also runs each fixed-shape step through ``torch.compile`` (one trace per step kind, a few
    seconds on small models and tens of seconds on 8B ones, paid once per call): the model's own small ops are
    fused before the graph is captured, which matters at batch 1 where they cost about as much as a sparse
    method's attention. Logits then match the uncompiled steps within rounding, not bit for bit; if the step
    cannot be traced as one graph the call decodes uncompiled and ``stats["decode"]`` says why. A string picks the
    torch.compile mode (``"max-autotune-no-cudagraphs"``: Inductor also times its own GEMV kernels against
    cuBLAS for every weight shape, minutes of compile for a chance at faster weight reads).

    ``cache`` continues an earlier call: pass ``gen.state`` (same ``attnkit.apply`` block) or what
    :func:`attnkit.load_cache` returned; ``prompt`` is then the text or ids to append (no chat template: see
    :func:`attnkit.followup_text` for the next turn of a chat), single prompt only. EOS is checked every
    ``eos_check_every`` steps; a state whose generation ran past its EOS cannot be continued (use 1 for chats).
    """
    if not isinstance(compile, bool) and compile not in COMPILE_MODES:
        raise ValueError(f"compile={compile!r} is invalid; accepted: True, False or a mode in {COMPILE_MODES}")
    if not isinstance(eos_check_every, int) or eos_check_every < 1:
        raise ValueError(f"eos_check_every={eos_check_every!r} is invalid; accepted: an integer >= 1")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} is invalid; accepted: an integer >= 1")
    if prefill_chunk < 1:
        raise ValueError(f"prefill_chunk={prefill_chunk} is invalid; accepted: an integer >= 1")
    if do_sample and not (temperature > 0 and 0 < top_p <= 1):
        raise ValueError(f"temperature={temperature}, top_p={top_p} invalid; accepted: temperature > 0, 0 < top_p <= 1")
    device = next(model.parameters()).device
    batched = isinstance(prompt, (list, tuple)) and len(prompt) > 0 and not isinstance(prompt[0], int)
    if isinstance(prompt, (list, tuple)) and len(prompt) == 0:
        raise ValueError("the prompt list is empty")
    rows = []
    for p in prompt if batched else [prompt]:
        r = encode(tokenizer, p, chat, device)
        if answer_prefix:
            extra = tokenizer(answer_prefix, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
            r = torch.cat([r, extra.expand(r.shape[0], -1)], dim=1)
        rows.extend(r.split(1))
    batched = batched or len(rows) > 1
    run = ACTIVE_RUNS.get(id(text_config(model)))
    if cache is not None:
        rows = [continue_ids(cache, run, rows, device)]
    pad_id = getattr(tokenizer, "pad_token_id", None)
    ids, attention_mask = left_pad(rows, pad_id if pad_id is not None else 0)
    position_ids = None
    if attention_mask is not None:
        position_ids = (attention_mask.cumsum(1) - 1).clamp_min(0)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    if cache is not None:
        state, cache = cache, cache.cache
    else:
        state = None
        if run is not None:
            run.capacity_hint = ids.shape[1] + max_new_tokens
            run.chunk_hint = min(prefill_chunk, ids.shape[1])
        try:
            cache = new_cache(model)
        finally:
            if run is not None:
                run.capacity_hint = run.chunk_hint = 0
    arg = cache_argument(model)
    eos = tokenizer.eos_token_id

    _sync(device)
    t0 = time.perf_counter()
    logits = forward_chunks(model, ids, cache, prefill_chunk, attention_mask=attention_mask, position_ids=position_ids)
    token = _sample(logits[:, -1], do_sample, temperature, top_p, generator)
    _sync(device)
    t1 = time.perf_counter()
    b = ids.shape[0]
    out = torch.empty((b, max_new_tokens), dtype=torch.long, device=device)
    out[:, 0] = token
    next_pos = position_ids[:, -1:] + 1 if position_ids is not None else None  # (B, 1)
    decoder, mode = _static_decoder(model, cache, run, device, max_new_tokens - 1, cuda_graphs, static_decode,
                                    compile)
    if decoder is not None and next_pos is None:
        next_pos = torch.full((b, 1), cache.get_seq_length(), dtype=torch.long, device=device)
    steps = 1
    try:
        for step in range(1, max_new_tokens):
            if stop_at_eos and eos is not None and step % eos_check_every == 0 \
                    and bool((out[:, :step] == eos).any(-1).all()):
                break
            if decoder is not None:
                logits = decoder.step(token, next_pos)
            else:
                extra = {} if next_pos is None else {"position_ids": next_pos}
                logits = model(input_ids=token.unsqueeze(-1), use_cache=True, **{arg: cache}, **extra).logits[:, -1]
            token = _sample(logits, do_sample, temperature, top_p, generator)
            out[:, step] = token
            if next_pos is not None:
                next_pos = next_pos + 1
            steps += 1
        _sync(device)
        t2 = time.perf_counter()
    finally:
        if decoder is not None:
            mode = decoder.mode
            decoder.close()
    timing = {}
    if decoder is not None and decoder.replays:
        timing = {"capture_s": decoder.capture_s, "graph_steps": decoder.replays,
                  "steady_s_per_token": (t2 - decoder.ready_at) / decoder.after_ready}

    kv = cache.held_bytes() if hasattr(cache, "held_bytes") else _dense_bytes(cache)
    stats = run.stats() if run is not None else {"method": "none"}
    stats["decode"] = mode
    stats.update(timing)
    gens = []
    for i, row in enumerate(out[:, :steps].tolist()):
        new_state = None
        if run is not None and not batched:  # every token but the last sampled one went through the cache
            past = len(row) - 1 - row.index(eos) if eos is not None and eos in row else 0
            new_state = CacheState(cache, [row[-1]], past if stop_at_eos else 0,
                                   (state.turns if state is not None else 0) + 1)
        if stop_at_eos and eos is not None and eos in row:
            row = row[: row.index(eos)]
        gens.append(Generation(
            text=tokenizer.decode(row, skip_special_tokens=True),
            tokens=row,
            prompt_tokens=rows[i].shape[1],
            prefill_s=t1 - t0,
            decode_s=t2 - t1,
            decode_steps=steps - 1,
            kv_bytes=kv,
            stats=stats,
            state=new_state,
        ))
    return gens if batched else gens[0]


def _static_decoder(model, cache, run, device, steps: int, cuda_graphs: bool, static_decode: bool | None,
                    compile: bool | str = False):
    """The fixed-shape decoder for this generation (or None) and a one-line description of the decode mode."""
    if static_decode is None:
        static_decode = device.type == "cuda"
    if not static_decode or steps < 1:
        return None, "dynamic"
    reason = static_unavailable(run, cache)
    if reason is not None:
        if run is not None:  # the user asked for an attnkit method: say why it decodes eagerly
            warnings.warn(f"attnkit: {run.method.name} decodes eagerly: {reason}", stacklevel=3)
        return None, f"dynamic ({reason})"
    graphs = cuda_graphs and os.environ.get("ATTNKIT_CUDA_GRAPHS", "1") != "0"
    decoder = StaticDecoder(model, cache, steps, graphs, compile=bool(compile),
                            compile_mode=compile if isinstance(compile, str) else None)
    return decoder, decoder.mode


def _dense_bytes(cache: Cache) -> int:
    return sum(
        layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if getattr(layer, "keys", None) is not None
    )


#: Float32 logits one cross-entropy slice of ``perplexity`` converts: a whole 16K chunk of Gemma-3's 262K-word
#: logits is 17 GB in float32, and cross_entropy's log-softmax doubles it.
NLL_SLICE_BYTES = 1 << 28


@torch.inference_mode()
def perplexity(
    model: torch.nn.Module,
    tokenizer,
    text: str | torch.Tensor,
    chunk: int = 256,
    max_tokens: int | None = None,
    progress: bool = False,
    decode_tail: int = 0,
) -> torch.Tensor:
    """Per-position negative log-likelihoods (float32, shape (L - 1,)) of a long text through the active method.

    Position i holds -log p(token[i + 1] | tokens[: i + 1]). The text goes through the method's cache ``chunk``
    tokens at a time, so eviction methods run exactly as they do when generating; the last ``decode_tail``
    tokens go one per forward, as decode steps (teacher-forced), which is where decode-time methods (Recycled
    Attention, SpAtten, TidalDecode, ...) act.
    """
    if chunk < 1:
        raise ValueError(f"chunk={chunk} is invalid; accepted: an integer >= 1")
    if decode_tail < 0:
        raise ValueError(f"decode_tail={decode_tail} is invalid; accepted: an integer >= 0")
    device = next(model.parameters()).device
    ids = text if isinstance(text, torch.Tensor) else tokenizer(text, return_tensors="pt").input_ids
    ids = ids.view(1, -1)[:, :max_tokens].to(device)
    if ids.shape[1] < 2:
        raise ValueError("the text must hold at least 2 tokens")
    if decode_tail >= ids.shape[1]:
        raise ValueError(f"decode_tail={decode_tail} is invalid for a {ids.shape[1]}-token text; accepted: "
                         f"0 <= decode_tail < {ids.shape[1]}")
    cache = new_cache(model)
    arg = cache_argument(model)
    nll = torch.empty(ids.shape[1] - 1, dtype=torch.float32, device=device)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=ids.shape[1], unit="tok", desc="ppl")
    head = ids.shape[1] - decode_tail
    starts = list(range(0, head, chunk)) + list(range(head, ids.shape[1]))
    for i, start in enumerate(starts):
        piece = ids[:, start : starts[i + 1] if i + 1 < len(starts) else ids.shape[1]]
        logits = model(input_ids=piece, use_cache=True, **{arg: cache}).logits[0]  # (q, V), the model's dtype
        targets = ids[0, start + 1 : start + 1 + piece.shape[1]]
        k = targets.shape[0]
        rows = max(1, NLL_SLICE_BYTES // (4 * logits.shape[-1]))
        for s in range(0, k, rows):
            e = min(k, s + rows)
            nll[start + s : start + e] = F.cross_entropy(logits[s:e].float(), targets[s:e], reduction="none")
        del logits
        if bar is not None:
            bar.update(piece.shape[1])
    if bar is not None:
        bar.close()
    return nll.cpu()
