"""RazorAttention's echo and induction scores per attention head, and its retrieval-head selection.

Paper: RazorAttention (arXiv 2407.15891, ICLR 2025); no author code, the Huawei golden-stick port was read.
Input: a start token + ``length`` random non-special tokens repeated ``repeats`` times, one dense prefill. For a
query in repeat r >= 1 at position p, the same token sits at p - m*length (m = 1..r) in earlier repeats:

- echo score of a query head = mean over those queries of the attention summed over p - m*length;
- induction score = the same for the tokens that followed the earlier occurrences, p - m*length + 1.

A KV head scores the max over its group of query heads; retrieval heads are the top 14% of all (layer, KV head)
pairs by induction united with the top 1% by echo (counts rounded as golden-stick does).

How this differs from the paper / golden-stick:
- scores are means over the scored queries (golden-stick divides the masked sum by seq_len**2: the same ranking);
- random tokens are drawn from the whole non-special vocabulary (golden-stick: ids 10000-12500, so tokens repeat
  inside one repeat); ``length`` is capped so the whole input fits the model's context;
- the model's own sliding-window layers (Gemma-3) are scored under their window (they cannot see an earlier
  repeat farther than the window) and never selected: ``retrieval_heads`` ranks global layers only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from attnkit.analysis.capture import is_sliding, progress_bar, record_prefill, softcap_of
from attnkit.session import layer_types, text_config

FORMAT = "attnkit-head-scores"
#: bytes of float32 scores one block of query rows may take (all heads of a layer at once)
_BLOCK_BYTES = 64 * 2**20


@dataclass
class HeadScores:
    """Echo and induction scores of every (layer, query head).

    Attributes
    ----------
    echo, induction : (L, H) float32 tensors
    layer_types : per layer, ``"full_attention"``, ``"sliding_attention"`` or None (all global)
    num_key_value_heads : Hkv; query head h reads KV head h // (H / Hkv)
    length, repeats : the random sequence's length and how often it was repeated
    meta : free-form fields the caller gives (model name, file hash, seed, start token...), kept in the JSON
    """

    echo: torch.Tensor
    induction: torch.Tensor
    layer_types: list[str | None]
    num_key_value_heads: int
    length: int
    repeats: int
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.echo.shape != self.induction.shape or self.echo.ndim != 2:
            raise ValueError(f"echo {tuple(self.echo.shape)} and induction {tuple(self.induction.shape)} must be "
                             "the same (L, H) shape")
        n_layers, n_heads = self.echo.shape
        if len(self.layer_types) != n_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {n_layers} layers")
        if self.num_key_value_heads < 1 or n_heads % self.num_key_value_heads:
            raise ValueError(f"num_key_value_heads={self.num_key_value_heads} does not divide {n_heads} heads")

    @property
    def global_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t != "sliding_attention"]

    def per_kv_head(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(echo, induction), each (L, Hkv): the max over each KV head's group of query heads."""
        n_layers, n_heads = self.echo.shape
        g = n_heads // self.num_key_value_heads
        group = lambda s: s.view(n_layers, self.num_key_value_heads, g).amax(-1)  # noqa: E731
        return group(self.echo), group(self.induction)

    def retrieval_heads(self, induction_frac: float = 0.14, echo_frac: float = 0.01) -> list[tuple[int, int]]:
        """(layer, kv_head) pairs of global layers: top ``induction_frac`` of all pairs by induction score united
        with the top ``echo_frac`` by echo score, sorted by (layer, kv_head). Counts are round(frac * pairs)."""
        for name, frac in (("induction_frac", induction_frac), ("echo_frac", echo_frac)):
            if not isinstance(frac, (int, float)) or isinstance(frac, bool) or not 0 <= frac <= 1:
                raise ValueError(f"{name}={frac!r} is invalid; accepted: a number in [0, 1]")
        echo, ind = self.per_kv_head()
        pairs = [(l, h) for l in self.global_layers for h in range(self.num_key_value_heads)]

        def top(scores: torch.Tensor, frac: float) -> set[tuple[int, int]]:
            n = round(len(pairs) * frac)
            ranked = sorted(pairs, key=lambda p: (-float(scores[p]), p))  # ties: lower layer, lower head first
            return set(ranked[:n])

        return sorted(top(ind, induction_frac) | top(echo, echo_frac))

    # -- JSON -------------------------------------------------------------------------------------------------
    def to_dict(self, **meta) -> dict:
        return {"format": FORMAT, "version": 1, "echo": self.echo.tolist(), "induction": self.induction.tolist(),
                "layer_types": list(self.layer_types), "num_key_value_heads": self.num_key_value_heads,
                "length": self.length, "repeats": self.repeats, "meta": {**self.meta, **meta}}

    def to_json(self, path: str | Path, **meta) -> Path:
        """Write plain JSON; ``meta`` (e.g. model="smollm2-135m", sha256=...) is merged into :attr:`meta`."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(**meta), indent=1) + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_dict(cls, data: dict) -> "HeadScores":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not an attnkit head-scores profile (format {data.get('format')!r}, expected {FORMAT!r})"
                             if isinstance(data, dict) else "not an attnkit head-scores profile (not a JSON object)")
        try:
            return cls(echo=torch.tensor(data["echo"], dtype=torch.float32),
                       induction=torch.tensor(data["induction"], dtype=torch.float32),
                       layer_types=list(data["layer_types"]), num_key_value_heads=int(data["num_key_value_heads"]),
                       length=int(data["length"]), repeats=int(data["repeats"]), meta=dict(data.get("meta", {})))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"head-scores profile is missing or has a bad field: {exc}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> "HeadScores":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_dict(data)


# -- input ------------------------------------------------------------------------------------------------------
def start_token(model: torch.nn.Module, tokenizer=None) -> int:
    """BOS of the model's config (SmolLM2: <|im_start|>, Gemma: <bos>), else the tokenizer's usual first token."""
    bos = getattr(text_config(model), "bos_token_id", None)
    if bos is None and tokenizer is not None:
        bos = tokenizer.bos_token_id
        if bos is None:
            ids = tokenizer("a").input_ids
            bos = ids[0] if len(ids) > 1 else None
    if bos is None:
        raise ValueError("the model has no bos_token_id and no tokenizer start token was found; pass start_id=")
    return int(bos[0] if isinstance(bos, (list, tuple)) else bos)


def special_ids(model: torch.nn.Module, tokenizer=None) -> set[int]:
    """Token ids never drawn as random tokens: the config's bos/eos/pad and, with a tokenizer, every special or
    added token (SmolLM2's ids 0-16, Gemma's control tokens)."""
    cfg = text_config(model)
    out: set[int] = set()
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        v = getattr(cfg, name, None)
        out.update(v if isinstance(v, (list, tuple)) else [] if v is None else [v])
    if tokenizer is not None:
        out.update(tokenizer.all_special_ids)
        out.update(tokenizer.get_added_vocab().values())
    return {int(i) for i in out}


def capped_length(model: torch.nn.Module, length: int, repeats: int) -> int:
    """``length`` capped so that start token + length * repeats fits the model's context."""
    ctx = getattr(text_config(model), "max_position_embeddings", None)
    return length if ctx is None else min(length, (ctx - 1) // repeats)


def repeated_input(model, length: int, repeats: int, seed: int = 0, tokenizer=None,
                   start_id: int | None = None) -> torch.Tensor:
    """(1, 1 + length * repeats) ids: start token, then the same ``length`` random non-special ids ``repeats``
    times (seeded, drawn with replacement)."""
    vocab = text_config(model).vocab_size
    if tokenizer is not None:
        vocab = min(vocab, len(tokenizer))
    banned = torch.tensor(sorted(i for i in special_ids(model, tokenizer) if i < vocab), dtype=torch.long)
    allowed = torch.ones(vocab, dtype=torch.bool)
    allowed[banned] = False
    pool = allowed.nonzero().squeeze(1)
    gen = torch.Generator().manual_seed(seed)
    seq = pool[torch.randint(len(pool), (length,), generator=gen)]
    start = start_token(model, tokenizer) if start_id is None else int(start_id)
    return torch.cat([torch.tensor([start]), seq.repeat(repeats)]).unsqueeze(0)


# -- scores -----------------------------------------------------------------------------------------------------
def score_columns(rows: torch.Tensor, length: int, repeats: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Key columns scored for the queries at absolute positions ``rows`` (q,).

    The start token sits at 0 and repeat r at 1 + r*length .. (r+1)*length. Returns echo columns (q, R-1)
    (p - m*length, the same token in earlier repeats), induction columns (the token that followed it, p - m*length
    + 1, never past the query since length >= 2) and a (q, R-1) bool of the valid ones (m <= r).
    """
    offsets = torch.arange(1, repeats, device=rows.device) * length  # (R-1,)
    echo = rows[:, None] - offsets[None, :]
    valid = echo >= 1  # position 0 is the start token, not an earlier repeat
    return echo.clamp_min(0), echo.clamp_min(0) + 1, valid


def layer_scores(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float,
                 softcap: float | None, length: int, repeats: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Echo and induction scores (H,), (H,) of one layer from its rotated q (1, H, N, D) and k (1, Hkv, N, D).

    Exact float32 softmax probabilities, but only where they are needed: per block of query rows the scores over
    the keys they can see, their log-sum-exp, then exp(score - lse) at the 2 (R-1) scored columns only (the full
    probability rows, as :func:`attnkit.reference.dense_attention` builds them, cost 3 more passes over N^2 H
    floats). GQA stays grouped (one bmm per KV head group, keys never repeated). Tested against the dense
    reference.
    """
    q, k = query[0].float(), key[0].float()  # (H, N, D), (Hkv, N, D)
    n_heads, n, d = q.shape
    n_kv = k.shape[0]
    group = n_heads // n_kv
    qg = q.view(n_kv, group, n, d)
    first = 1 + length
    block = max(1, _BLOCK_BYTES // (4 * n_heads * n))  # rows per block: bounded float32 score memory
    echo = torch.zeros(n_heads, dtype=torch.float64)
    ind = torch.zeros(n_heads, dtype=torch.float64)
    for a in range(first, n, block):
        b = min(n, a + block)
        rows = torch.arange(a, b, device=q.device)
        s = torch.bmm(qg[:, :, a:b].reshape(n_kv, group * (b - a), d), k[:, :b].transpose(1, 2))
        s = s.view(n_heads, b - a, b).mul_(scaling)  # (H, r, b)
        if softcap is not None:
            s = s.div_(softcap).tanh_().mul_(softcap)
        if mask is None:
            visible = (torch.arange(b, device=q.device)[None, :] <= rows[:, None])[None]  # (1, r, b)
        else:
            visible = mask[0, :, a:b, :b]  # (1 | Hkv, r, b)
            if visible.shape[0] not in (1, n_heads):
                visible = visible.repeat_interleave(group, dim=0)
        s.masked_fill_(~visible, float("-inf"))
        lse = torch.logsumexp(s, dim=-1, keepdim=True)  # (H, r, 1)
        e_cols, i_cols, valid = score_columns(rows, length, repeats)
        for cols, acc in ((e_cols, echo), (i_cols, ind)):
            picked = torch.gather(s, 2, cols.unsqueeze(0).expand(n_heads, -1, -1))  # (H, r, R-1)
            acc += (torch.exp(picked - lse) * valid).sum((1, 2)).double().cpu()
    n_queries = n - first
    return (echo / n_queries).float(), (ind / n_queries).float()


@torch.inference_mode()
def head_scores(model: torch.nn.Module, length: int = 2500, repeats: int = 4, seed: int = 0, progress: bool = False,
                *, tokenizer=None, start_id: int | None = None, ids: torch.Tensor | None = None) -> HeadScores:
    """RazorAttention echo and induction scores of every (layer, query head), float32.

    Parameters
    ----------
    model : a causal LM with RoPE (run through ``attnkit.apply(model, "full")`` and its recorder: the scores use
        the rotated q and k the model attended with)
    length : random tokens per repeat, capped to (context - 1) // repeats (SmolLM2 8K: 2047)
    repeats : how often the random sequence is repeated (>= 2)
    seed : seed of the random tokens
    progress : show a progress bar over layers
    tokenizer : optional; excludes its special and added tokens from the random draw and names a start token
    start_id : the first token (default: the config's BOS, see :func:`start_token`)
    ids : (1, 1 + length * repeats) input to use instead of drawing one (tests)

    Returns
    -------
    HeadScores with echo and induction (L, H); meta holds seed, start token and the input length.
    """
    for name, value, lo in (("length", length, 2), ("repeats", repeats, 2)):
        if not isinstance(value, int) or isinstance(value, bool) or value < lo:
            raise ValueError(f"head_scores: {name}={value!r} is invalid; accepted: an integer >= {lo}")
    if ids is None:
        length = capped_length(model, length, repeats)
        if length < 2:
            raise ValueError(f"head_scores: repeats={repeats} leaves no room in the model's context; use fewer")
        ids = repeated_input(model, length, repeats, seed, tokenizer, start_id)
    elif ids.shape != (1, 1 + length * repeats):
        raise ValueError(f"head_scores: ids {tuple(ids.shape)} must be (1, {1 + length * repeats})")
    cfg = text_config(model)
    n_layers, n_heads = cfg.num_hidden_layers, cfg.num_attention_heads
    echo = torch.zeros(n_layers, n_heads)
    induction = torch.zeros(n_layers, n_heads)
    softcap = softcap_of(model)
    n = ids.shape[1]
    bar = progress_bar(n_layers, f"head scores ({n} tokens)", progress)

    def on_layer(layer: int, query, key, mask, scaling: float) -> None:
        echo[layer], induction[layer] = layer_scores(query, key, mask, scaling, softcap, length, repeats)
        if bar is not None:
            bar.update(1)

    try:
        record_prefill(model, ids, on_layer)
    finally:
        if bar is not None:
            bar.close()
    meta = {"seed": seed, "start_id": int(ids[0, 0]), "tokens": n, "sliding_layers":
            [i for i, s in enumerate(is_sliding(model)) if s]}
    return HeadScores(echo, induction, layer_types(cfg), cfg.num_key_value_heads, length, repeats, meta)


def top_heads(scores: torch.Tensor, n: int) -> list[tuple[int, int, float]]:
    """The ``n`` best (layer, head, score) of an (L, H) score tensor, best first."""
    flat = scores.flatten()
    vals, idx = flat.topk(min(n, flat.numel()))
    return [(int(k) // scores.shape[1], int(k) % scores.shape[1], float(v)) for v, k in zip(vals, idx)]
