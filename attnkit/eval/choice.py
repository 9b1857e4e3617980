"""Scoring classification and multiple-choice samples by logits, through whatever method is active.

Two scorings (``Sample.extra["scoring"]``, set by :mod:`attnkit.eval.tasks.choice`):

- ``"label_logit"`` (classification, as ZeroTuning and ACT score it): one forward of the prompt; at the answer
  position, compare the logits of each label word's *first* token. Samples given together share left-padded
  forwards of similar lengths (``_groups``: padded tokens against a per-forward cost). ZeroTuning's released
  evaluator generates one greedy token and string-matches it instead, and ACT takes each word's *last* token
  after a log-softmax over the label tokens; with single-token, first-token-
  distinct label words (ours) all three pick the same label, except that a greedy token outside the label set
  counts as wrong in ZeroTuning.
- ``"loglik"`` (multiple choice, as lm-evaluation-harness): the sum of the option tokens' log-probabilities
  given the prompt, from ``prompt + option`` rows (one row of the prompt alone when every option is one token,
  as lettered answers are: the same numbers), several samples' rows per left-padded forward; also
  ``acc_norm``'s score, that sum divided by the option's length in characters (without its leading space).
  Prompt and option are tokenized separately (lm-eval tokenizes them jointly and splits; with our options
  starting with a space, BPE gives the same tokens).

Call :func:`score_choices` inside ``attnkit.apply(model, method)``: the rows go through the run's cache
``prefill_chunk`` tokens at a time, exactly as :func:`attnkit.generate` feeds a prompt, so a method acts on these
forwards (ZeroTuning / ACT reweigh attention; KV policies see the prompt first, then the option tokens). Outside
``apply`` the model runs densely with a DynamicCache.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from attnkit.eval.sample import Sample, build_prompt
from attnkit.hf.attention import ACTIVE_RUNS
from attnkit.inference import left_pad, new_cache
from attnkit.session import cache_argument, text_config

SCORINGS = ("label_logit", "loglik")


def _last_logits(model, rows: list[list[int]], keep: int, pad_id: int, chunk: int | None) -> torch.Tensor:
    """(B, keep, V) float32 logits at the last ``keep`` positions of left-padded ``rows``, fed ``chunk`` tokens
    per forward through a fresh cache of the active run (padding masked, positions counted per row)."""
    device = next(model.parameters()).device
    ids, mask = left_pad([torch.tensor([r], device=device) for r in rows], pad_id)  # (B, L), (B, L) or None
    positions = None if mask is None else (mask.cumsum(1) - 1).clamp_min(0)
    length = ids.shape[1]
    chunk = length if chunk is None else chunk
    run = ACTIVE_RUNS.get(id(text_config(model)))
    if run is not None:  # what generate tells the run before building its cache
        run.capacity_hint, run.chunk_hint = length, min(chunk, length)
    try:
        cache = new_cache(model)
    finally:
        if run is not None:
            run.capacity_hint = run.chunk_hint = 0
    arg = cache_argument(model)
    # attnkit's cache wants each forward's last column real in every row, so the first chunk reaches past the
    # longest left padding (it may then be longer than ``chunk``)
    first = min(length, max(chunk, length - min(map(len, rows)) + 1))
    bounds = [0] + list(range(first, length, chunk)) + [length]
    pieces = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        need = end - max(start, length - keep)  # wanted positions in this chunk: a suffix of it
        extra = {}
        if mask is not None:
            extra = {"attention_mask": mask[:, :end], "position_ids": positions[:, start:end]}
        out = model(input_ids=ids[:, start:end], use_cache=True, logits_to_keep=max(need, 1), **{arg: cache},
                    **extra).logits
        if need > 0:
            pieces.append(out[:, -need:].float())
    return torch.cat(pieces, dim=1)


def _keep(options: list[list[int]], rows: list[list[int]]) -> int:
    """Positions a sample's rows need at their end: the option tokens' predictions (one for a prompt-alone row)."""
    return 1 if len(rows) == 1 else max(map(len, options)) + 1


# A forward's fixed cost in padded tokens: SmolLM2 float32 on an H100 ran 64 SST-2 rows (81 tokens padded) in 88 ms
# and 64 BoolQ rows (430) in 274 ms, ~36 ms of launches plus ~100 tokens a ms. The CPU is compute-bound: little.
FORWARD_TOKENS = {"cuda": 4096, "cpu": 32}


def _groups(lengths: list[int], rows: list[int], overhead: float, fits) -> list[tuple[int, int]]:
    """Contiguous groups [start, end) of jobs sorted by ascending ``lengths`` (a job's longest row; ``rows`` rows
    each) minimising the sum over forwards of ``overhead + rows x longest`` (padded tokens), each group passing
    ``fits(start, end)`` or holding one job; an O(n x group) dynamic programme over the sorted order."""
    n = len(lengths)
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for end in range(1, n + 1):
        total = 0
        for start in range(end - 1, -1, -1):
            if start < end - 1 and not fits(start, end):
                break
            total += rows[start]
            cost = best[start] + overhead + total * lengths[end - 1]
            if cost < best[end]:
                best[end], cut[end] = cost, start
    out, end = [], n
    while end:
        out.append((cut[end], end))
        end = cut[end]
    return out[::-1]


def _row_batches(jobs: list[tuple], vocab: int, max_rows: int = 64, max_logits: int = 2**27, overhead: float = 1e9):
    """Whole samples' rows (``jobs`` sorted by their longest row) grouped into forwards of at most ``max_rows`` rows
    and ``max_logits`` float32 logits (rows x kept positions x vocabulary: 512 MiB; Gemma-3's 262K vocabulary makes
    that the binding limit), the groups chosen to minimise padded tokens plus ``overhead`` per forward; a sample
    with more rows than that still gets a forward of its own."""
    rows = [len(job[2]) for job in jobs]
    keeps = [_keep(job[1], job[2]) for job in jobs]
    lengths = [max(map(len, job[2])) for job in jobs]

    def fits(start: int, end: int) -> bool:
        n_rows = sum(rows[start:end])
        return n_rows <= max_rows and n_rows * max(keeps[start:end]) * vocab <= max_logits

    for start, end in _groups(lengths, rows, overhead, fits):
        yield jobs[start:end]


def _option_logprobs(logp: torch.Tensor, batch: list[tuple]) -> list[list[float]]:
    """Each option's summed log-probability, per sample of ``batch`` (sample index, option token lists, rows):
    logp (rows, keep, V) log-softmaxed at the rows' last ``keep`` positions. A row ending with its option o has
    o's token j predicted at position keep - 1 - len(o) + j; a prompt-alone row scores every one-token option at
    its last position. Gathered in one indexing op and read back once."""
    keep = logp.shape[1]
    entries = []  # (row, position, token, option) per option token
    at = n_opt = 0
    for _, options, rows in batch:
        for k, o in enumerate(options):
            if len(rows) == 1:
                entries.append((at, keep - 1, o[0], n_opt))
            else:
                entries += [(at + k, keep - 1 - len(o) + j, t, n_opt) for j, t in enumerate(o)]
            n_opt += 1
        at += len(rows)
    idx = torch.tensor(entries, device=logp.device).T  # (4, entries)
    vals = logp[idx[0], idx[1], idx[2]].double()
    sums = torch.zeros(n_opt, dtype=torch.float64, device=logp.device).index_add_(0, idx[3], vals).tolist()
    out, k = [], 0
    for _, options, _ in batch:
        out.append(sums[k : k + len(options)])
        k += len(options)
    return out


def _argmax(scores: list[float]) -> int:
    return max(range(len(scores)), key=lambda j: scores[j])  # the first of equal maxima, on every device


def _check(sample: Sample) -> None:
    extra = sample.extra
    options, label = extra.get("options"), extra.get("label")
    if extra.get("scoring") not in SCORINGS or not options or not isinstance(label, int) \
            or not 0 <= label < len(options):
        raise ValueError(f"{sample.task} sample {sample.index}: not a choice sample (extra needs 'options', "
                         f"'label' in range and 'scoring' in {SCORINGS}); got {str(extra)[:200]}")


def score_choices(model, tokenizer, samples: list[Sample], chat: bool = False,
                  prefill_chunk: int | None = None) -> list[dict]:
    """Score choice samples; one dict per sample, in order.

    Keys: ``pred`` (chosen option index), ``correct`` (0/1), ``scores`` (label_logit: the label words' first-token
    logits; loglik: summed option log-probabilities), ``correct_norm`` / ``scores_norm`` (loglik: acc_norm's
    length-normalised scores and their correctness; None for label_logit) and ``prompt_tokens``.
    ``chat`` wraps the prompt in the tokenizer's chat template (off by default: base-model prompts).
    """
    return score_choice_variants(model, tokenizer, samples, 1, chat, prefill_chunk)[0]


@torch.inference_mode()
def score_choice_variants(model, tokenizer, samples: list[Sample], variants: int, chat: bool = False,
                          prefill_chunk: int | None = None) -> list[list[dict]]:
    """:func:`score_choices` of the same samples under ``variants`` settings of the active method at once: every
    forward holds ``variants`` copies of its rows, copy v in the v-th block of the batch, where the method applies
    its v-th setting (ZeroTuning's ``set_gains`` with a (V, L, H) table, ACT's ``set_head_variants``). Returns one
    result list per variant. A head search scores several candidates per forward this way: a small model's short
    forwards are launch-bound on a GPU."""
    if prefill_chunk is not None and prefill_chunk < 1:
        raise ValueError(f"prefill_chunk={prefill_chunk} is invalid; accepted: an integer >= 1 or None")
    if not isinstance(variants, int) or variants < 1:
        raise ValueError(f"variants={variants!r} is invalid; accepted: an integer >= 1")
    pad_id = getattr(tokenizer, "pad_token_id", None)
    pad_id = 0 if pad_id is None else pad_id
    for s in samples:
        _check(s)
    prompts = [build_prompt(tokenizer, s, chat) for s in samples]
    results: list[list[dict | None]] = [[None] * len(samples) for _ in range(variants)]
    firsts = [i for i, s in enumerate(samples) if s.extra["scoring"] == "label_logit"]
    cuda = next(model.parameters()).is_cuda
    overhead = FORWARD_TOKENS["cuda" if cuda else "cpu"] / variants  # a forward serves every variant
    firsts.sort(key=lambda i: len(prompts[i]))  # similar lengths share a forward: little padding
    lengths = [len(prompts[i]) for i in firsts]
    for start, end in _groups(lengths, [1] * len(firsts), overhead, lambda a, b: b - a <= 64):
        group = firsts[start:end]
        rows = [prompts[i] for i in group]
        logits = _last_logits(model, rows * variants, 1, pad_id, prefill_chunk)[:, -1]  # (variants x rows, vocab)
        for row, i in enumerate(group):
            words = [tokenizer(o, add_special_tokens=False).input_ids[0] for o in samples[i].extra["options"]]
            for v in range(variants):
                scores = logits[v * len(rows) + row, words].tolist()
                pred = _argmax(scores)
                results[v][i] = {"pred": pred, "correct": int(pred == samples[i].extra["label"]), "scores": scores,
                                 "correct_norm": None, "scores_norm": None, "prompt_tokens": len(prompts[i])}
    jobs = []  # (sample index, option token lists, rows): every option row, or the prompt alone (one-token options)
    for i, s in enumerate(samples):
        if s.extra["scoring"] != "loglik":
            continue
        options = [tokenizer(o, add_special_tokens=False).input_ids for o in s.extra["options"]]
        if any(not o for o in options):
            raise ValueError(f"{s.task} sample {s.index}: an option tokenizes to nothing: {s.extra['options']}")
        # one-token options (lettered answers): every prompt+option row would give the same logits at the
        # prompt's last position (causal attention), so one row of the prompt alone serves them all
        single = all(len(o) == 1 for o in options)
        jobs.append((i, options, [prompts[i]] if single else [prompts[i] + o for o in options]))
    jobs.sort(key=lambda job: max(map(len, job[2])))  # similar lengths share a forward: little padding
    # On a GPU a small model's forward is launch-bound: several samples share one. On the CPU compute is the
    # bound and the padding of a shared forward made it slower (1.1-1.4x on HellaSwag / PIQA, SmolLM2): one
    # sample per forward there.
    max_rows = 64 if cuda else 1
    for batch in _row_batches(jobs, model.get_output_embeddings().weight.shape[0], max_rows, overhead=overhead):
        keep = max(_keep(options, rows) for _, options, rows in batch)
        rows = [r for *_, job_rows in batch for r in job_rows]
        logits = _last_logits(model, rows * variants, keep, pad_id, prefill_chunk)  # (variants x rows, keep, vocab)
        for v in range(variants):
            logp = F.log_softmax(logits[v * len(rows) : (v + 1) * len(rows)], -1)  # (rows, keep, vocab)
            for (i, _, _), scores in zip(batch, _option_logprobs(logp, batch)):
                s = samples[i]
                chars = [max(1, len(o) - o.startswith(" ")) for o in s.extra["options"]]
                norm = [x / c for x, c in zip(scores, chars)]
                pred, pred_norm, gold = _argmax(scores), _argmax(norm), s.extra["label"]
                results[v][i] = {"pred": pred, "correct": int(pred == gold), "scores": scores,
                                 "correct_norm": int(pred_norm == gold), "scores_norm": norm,
                                 "prompt_tokens": len(prompts[i])}
    return results  # type: ignore[return-value]
