"""Multi-query associative recall (MQAR), generated as Zoology generates it, and its accuracy.

Paper: Arora, Eyuboglu et al., "Zoology: Measuring and Improving Recall in Efficient Language Models"
(arXiv 2312.04927); layout from HazyResearch/zoology ``zoology/data/associative_recall.py`` (``_mqar``) and
``zoology/data/multiquery_ar.py`` (``multiquery_ar``, num_passes 1).
Layout of one example of length T with N pairs (C = 2N context tokens):
- keys: N distinct tokens from [1, V//2), values: N distinct tokens from [V//2, V), both in random order;
  positions 0 .. C-1 hold k_1 v_1 ... k_N v_N;
- the remaining T - C positions form S = (T - C) // 2 two-token slots; every key gets its own slot g (N distinct
  slots, drawn without replacement with p(g) proportional to a * (g+1)^(a-1), g = 0 .. S-1, a = ``power_a``;
  a = 1 is uniform, small a favours early slots, i.e. short gaps after the context) and is repeated at position
  C + 2g;
- labels are -100 everywhere except at those query positions, where they hold the key's value (next-token
  prediction: the model reads the key and must emit its value); the position after a query is *not* the value;
- every other position (0 in Zoology's construction) becomes a uniform random token from [0, V) when
  ``random_non_queries`` (Zoology's default), so fillers may collide with keys or values, as in Zoology.
Checks as Zoology's asserts: T even, V > T, 4N <= T.
Differences: a seeded ``numpy.random.Generator`` instead of numpy's global seed (and torch's unseeded global
generator for the fillers), so the same seed gives other, reproducible examples; sampling without replacement uses
random keys (Gumbel top-k), which draws from the same distribution as numpy's sequential ``choice`` without
replacement. No train/test split or leakage check (call twice with different seeds).
"""

from __future__ import annotations

import numpy as np
import torch

from attnkit.zoo.base import check_float, check_int

_CHUNK = 1 << 22  # random keys drawn per chunk of rows, bounding memory for large vocabularies


def _draw_without_replacement(
    rng: np.random.Generator, rows: int, population: int, k: int, log_weights: np.ndarray | None = None
) -> np.ndarray:
    """(rows, k) indices into range(population), distinct per row, in draw order (Gumbel top-k).

    With ``log_weights`` the draws follow successive sampling proportional to exp(log_weights) without
    replacement; without them, a uniformly random ordered subset.
    """
    out = np.empty((rows, k), dtype=np.int64)
    step = max(1, _CHUNK // population)
    for start in range(0, rows, step):
        n = min(step, rows - start)
        scores = rng.gumbel(size=(n, population))
        if log_weights is not None:
            scores += log_weights
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)  # highest score = first draw
        out[start : start + n] = np.take_along_axis(top, order, axis=1)
    return out


def mqar(
    num_examples: int,
    vocab_size: int = 8192,
    seq_len: int = 64,
    num_kv_pairs: int = 4,
    power_a: float = 0.01,
    random_non_queries: bool = True,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MQAR examples laid out as in Zoology's ``multiquery_ar`` (see the module docstring).

    Returns
    -------
    inputs : (B, T) long token ids.
    labels : (B, T) long; the paired value at the N query positions, -100 elsewhere.
    """
    check_int("mqar", "num_examples", num_examples, 1)
    check_int("mqar", "seq_len", seq_len, 4)
    check_int("mqar", "num_kv_pairs", num_kv_pairs, 1, seq_len // 4)  # 4N <= T
    check_int("mqar", "vocab_size", vocab_size, seq_len + 1)  # Zoology asserts V > T
    check_float("mqar", "power_a", power_a, 0.0, open_lo=True)
    check_int("mqar", "seed", seed, 0)
    if seq_len % 2:
        raise ValueError(f"mqar: seq_len={seq_len} is invalid; accepted: an even integer >= 4 (Zoology's layout)")
    rng = np.random.default_rng(seed)
    b, n, half = num_examples, num_kv_pairs, vocab_size // 2
    context = 2 * n
    keys = _draw_without_replacement(rng, b, half - 1, n) + 1  # [1, V//2)
    values = _draw_without_replacement(rng, b, vocab_size - half, n) + half  # [V//2, V)
    slots = (seq_len - context) // 2
    log_p = np.log(power_a) + (power_a - 1.0) * np.log(np.arange(1, slots + 1))  # p(g) ∝ a g^(a-1), g = 1..S
    gaps = _draw_without_replacement(rng, b, slots, n, log_p)  # (B, N) slot of each key

    inputs = np.zeros((b, seq_len), dtype=np.int64)
    inputs[:, 0:context:2], inputs[:, 1:context:2] = keys, values
    labels = np.full((b, seq_len), -100, dtype=np.int64)
    query_pos = context + 2 * gaps
    np.put_along_axis(inputs, query_pos, keys, axis=1)
    np.put_along_axis(labels, query_pos, values, axis=1)
    if random_non_queries:
        filler = inputs == 0  # keys start at 1 and values at V//2: zeros are exactly the unused positions
        inputs[filler] = rng.integers(0, vocab_size, size=int(filler.sum()))
    return torch.from_numpy(inputs), torch.from_numpy(labels)


def mqar_accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Per-example share of labelled positions predicted right, averaged over examples.

    Parameters
    ----------
    predictions : (B, T, V) logits (argmax taken) or (B, T) predicted ids.
    labels : (B, T) with -100 off the query positions; every row needs at least one label.

    Zoology averages over all labelled positions of a batch; with the same N in every example (as ``mqar``
    makes) the two agree.
    """
    preds = predictions.argmax(-1) if predictions.dim() == 3 else predictions
    if preds.shape != labels.shape:
        raise ValueError(f"mqar_accuracy: predictions {tuple(preds.shape)} do not match labels {tuple(labels.shape)}")
    mask = labels != -100
    counts = mask.sum(-1)
    if (counts == 0).any():
        raise ValueError("mqar_accuracy: a row has no labelled position; accepted: at least one label per row")
    right = ((preds == labels) & mask).sum(-1)
    return (right.double() / counts).mean().item()
