"""Chunked prefill + decode loop and long-text perplexity, through whatever method is active."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers.cache_utils import Cache, DynamicCache

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


def forward_chunks(model, ids: torch.Tensor, cache: Cache, chunk: int, progress=None) -> torch.Tensor:
    """Feed (B, L) ids through the model ``chunk`` tokens at a time; returns the last chunk's (B, q, V) logits."""
    arg = cache_argument(model)
    logits = None
    for start in range(0, ids.shape[1], chunk):
        piece = ids[:, start : start + chunk]
        logits = model(input_ids=piece, use_cache=True, **{arg: cache}).logits
        if progress is not None:
            progress.update(piece.shape[1])
    return logits


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


@torch.inference_mode()
def generate(
    model: torch.nn.Module,
    tokenizer,
    prompt: str | list[int] | torch.Tensor,
    max_new_tokens: int = 64,
    prefill_chunk: int = 512,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    chat: bool = False,
    stop_at_eos: bool = True,
    answer_prefix: str = "",
) -> Generation:
    """Generate with chunked prefill and a decode loop free of per-step host syncs.

    Inside ``attnkit.apply`` the active method runs; outside it the model runs densely with a DynamicCache.
    The prompt is fed ``prefill_chunk`` tokens at a time, so no L x L score matrix is formed and eviction methods
    hold at most budget + chunk tokens. Decoding keeps tokens on the device and checks for EOS every 16 steps.
    ``answer_prefix`` is appended after the chat template's assistant turn (RULER-style).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} is invalid; accepted: an integer >= 1")
    if prefill_chunk < 1:
        raise ValueError(f"prefill_chunk={prefill_chunk} is invalid; accepted: an integer >= 1")
    if do_sample and not (temperature > 0 and 0 < top_p <= 1):
        raise ValueError(f"temperature={temperature}, top_p={top_p} invalid; accepted: temperature > 0, 0 < top_p <= 1")
    device = next(model.parameters()).device
    ids = encode(tokenizer, prompt, chat, device)
    if answer_prefix:
        extra = tokenizer(answer_prefix, return_tensors="pt", add_special_tokens=False).input_ids.to(device)
        ids = torch.cat([ids, extra], dim=1)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    cache = new_cache(model)
    arg = cache_argument(model)
    eos = tokenizer.eos_token_id

    _sync(device)
    t0 = time.perf_counter()
    logits = forward_chunks(model, ids, cache, prefill_chunk)
    token = _sample(logits[:, -1], do_sample, temperature, top_p, generator)
    _sync(device)
    t1 = time.perf_counter()
    out = torch.empty((ids.shape[0], max_new_tokens), dtype=torch.long, device=device)
    out[:, 0] = token
    steps = 1
    for step in range(1, max_new_tokens):
        if stop_at_eos and eos is not None and step % 16 == 0 and bool((out[:, :step] == eos).any(-1).all()):
            break
        logits = model(input_ids=token.unsqueeze(-1), use_cache=True, **{arg: cache}).logits
        token = _sample(logits[:, -1], do_sample, temperature, top_p, generator)
        out[:, step] = token
        steps += 1
    _sync(device)
    t2 = time.perf_counter()

    tokens = out[0, :steps].tolist()
    if stop_at_eos and eos is not None and eos in tokens:
        tokens = tokens[: tokens.index(eos)]
    run = ACTIVE_RUNS.get(id(text_config(model)))
    kv = cache.held_bytes() if hasattr(cache, "held_bytes") else _dense_bytes(cache)
    return Generation(
        text=tokenizer.decode(tokens, skip_special_tokens=True),
        tokens=tokens,
        prompt_tokens=ids.shape[1],
        prefill_s=t1 - t0,
        decode_s=t2 - t1,
        decode_steps=steps - 1,
        kv_bytes=kv,
        stats=run.stats() if run is not None else {"method": "none"},
    )


def _dense_bytes(cache: Cache) -> int:
    return sum(
        layer.keys.nbytes + layer.values.nbytes for layer in cache.layers if getattr(layer, "keys", None) is not None
    )


@torch.inference_mode()
def perplexity(
    model: torch.nn.Module,
    tokenizer,
    text: str | torch.Tensor,
    chunk: int = 256,
    max_tokens: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Per-position negative log-likelihoods (float32, shape (L - 1,)) of a long text through the active method.

    Position i holds -log p(token[i + 1] | tokens[: i + 1]). The text goes through the method's cache ``chunk``
    tokens at a time, so eviction methods run exactly as they do when generating.
    """
    if chunk < 1:
        raise ValueError(f"chunk={chunk} is invalid; accepted: an integer >= 1")
    device = next(model.parameters()).device
    ids = text if isinstance(text, torch.Tensor) else tokenizer(text, return_tensors="pt").input_ids
    ids = ids.view(1, -1)[:, :max_tokens].to(device)
    if ids.shape[1] < 2:
        raise ValueError("the text must hold at least 2 tokens")
    cache = new_cache(model)
    arg = cache_argument(model)
    nll = torch.empty(ids.shape[1] - 1, dtype=torch.float32, device=device)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=ids.shape[1], unit="tok", desc="ppl")
    for start in range(0, ids.shape[1], chunk):
        piece = ids[:, start : start + chunk]
        logits = model(input_ids=piece, use_cache=True, **{arg: cache}).logits[0].float()  # (q, V)
        targets = ids[0, start + 1 : start + 1 + piece.shape[1]]
        k = targets.shape[0]
        nll[start : start + k] = F.cross_entropy(logits[:k], targets, reduction="none")
        if bar is not None:
            bar.update(piece.shape[1])
    if bar is not None:
        bar.close()
    return nll.cpu()
