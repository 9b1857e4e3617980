"""Inputs of the analyses: T-token windows of the bundled Paul Graham essays at fixed seeded offsets."""

from __future__ import annotations

import torch

from attnkit.data import essays_text

#: characters of the essays tokenised once (about 90K tokens): room for hundreds of distinct windows
_CHARS = 400_000


def prepends_bos(tokenizer) -> bool:
    """True when the tokenizer starts every text with its BOS token (Gemma); SmolLM2's adds none."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos is not None and tokenizer("a").input_ids[:1] == [bos]


def essay_windows(tokenizer, samples: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """(samples, tokens) ids: windows of the essays starting at seeded random offsets.

    As the sink paper feeds ``tokenizer(text)[:T]``, a tokenizer that prepends BOS gets it at index 0 followed by
    T - 1 essay tokens; otherwise all T tokens are essay text (index 0 is then an ordinary word piece, mid-text).
    """
    for name, value, lo in (("samples", samples, 1), ("tokens", tokens, 2)):
        if not isinstance(value, int) or isinstance(value, bool) or value < lo:
            raise ValueError(f"{name}={value!r} is invalid; accepted: an integer >= {lo}")
    text = essays_text()
    ids = torch.tensor(tokenizer(text[: max(_CHARS, 8 * tokens)], add_special_tokens=False).input_ids)
    bos = prepends_bos(tokenizer)
    body = tokens - 1 if bos else tokens
    if len(ids) <= body:
        raise ValueError(f"tokens={tokens} exceeds the essays' {len(ids)} tokenised tokens")
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.randint(0, len(ids) - body, (samples,), generator=gen)
    rows = torch.stack([ids[o : o + body] for o in offsets.tolist()])
    if bos:
        rows = torch.cat([torch.full((samples, 1), tokenizer.bos_token_id), rows], dim=1)
    return rows


def token_strings(tokenizer, ids: torch.Tensor) -> list[str]:
    """Readable pieces of a 1D id tensor (for plot labels and JSON)."""
    if tokenizer is None:
        return [str(int(i)) for i in ids]
    return [tokenizer.decode([int(i)]) for i in ids]
