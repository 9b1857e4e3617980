"""InfiniRetri: read a long document in sentence-aligned chunks, keep what the last layer's attention points at.

Ye, Wang & Wang, "Infinite Retrieval: Attention Enhanced LLMs in Long-Context Processing", arXiv 2502.12962; the
algorithm follows the official code (PyPI ``infini-retri`` 0.0.3, ``Pipline.generate2`` with its defaults:
``compute_score_method`` 3, ``use_question_weight`` True, no KV reuse).

Idea: the document is cut into chunks of whole sentences; each chunk is read together with the sentences kept so
far, the question's attention to the context in the last layer scores every context token (smoothed over phrases),
and the sentences holding the top-k tokens are kept, as text, for the next chunk. The answer is generated from the
kept sentences alone, so every forward stays within the model's trained context however long the document is.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

from attnkit.hf.attention import ACTIVE_RUNS
from attnkit.methods.base import Method, check_int
from attnkit.methods.driver.reading import DEFAULT_TEMPLATE, Template, layout, pack, split_document
from attnkit.reference import attention_probs

if TYPE_CHECKING:
    from attnkit.inference import Generation
    from attnkit.session import Run

SLACK = 16  # tokens of headroom for re-tokenising the kept sentences inside a prompt


def phrase_scores(rows: torch.Tensor, context: tuple[int, int], phrase: int,
                  weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token scores of the context from the question rows' attention (the official ``compute_phrase_scores``).

    Parameters
    ----------
    rows : (R, L) float32, last-layer attention probabilities summed over heads, of the question rows: the prompt's
        last R tokens (the question and everything after it)
    context : token range ``[c0, c1)`` of the context (columns), before the question rows
    phrase : width of the ones kernel convolved along the keys ("same" padding: token i sums tokens
        i - phrase // 2 .. i + (phrase - 1) // 2, as scipy's ``convolve2d(..., mode="same")``)
    weights : (R,) question-row weights; None: each row's attention to the question rows themselves (its row sum
        over the last R columns), as the official code computes on the first chunk

    Returns
    -------
    scores : (c1 - c0,) float32, sum over rows of weights**2 * the smoothed attention (the official code multiplies
        by the weights twice)
    weights : (R,) the weights used
    """
    r, n = rows.shape
    if weights is None:
        weights = rows[:, n - r:].sum(-1)
    m = rows[:, context[0]:context[1]].unsqueeze(1)  # (R, 1, C)
    kernel = torch.ones((1, 1, phrase), dtype=m.dtype, device=m.device)
    smooth = F.conv1d(F.pad(m, (phrase // 2, (phrase - 1) // 2)), kernel).squeeze(1)  # (R, C)
    return (weights.square().unsqueeze(-1) * smooth).sum(0), weights


def last_global_layer(run: "Run") -> int:
    """Index of the last decoder layer that is not one of the model's own sliding-window layers."""
    return max(i for i, t in enumerate(run.layer_types) if t != "sliding_attention")


@torch.inference_mode()
def question_attention(run: "Run", model, ids: list[int], rows_start: int, prefill_chunk: int) -> torch.Tensor:
    """(R, L) float32: the last global layer's attention probabilities, summed over heads, of tokens
    ``rows_start..L-1`` of one dense forward over ``ids`` (chunked prefill through ``run``).

    Only that layer's rows are computed (from the recorder's rotated queries and stored keys, under the mask the
    layer applied), not attentions of every layer.
    """
    from attnkit.inference import forward_chunks

    device = next(model.parameters()).device
    x = torch.tensor([ids], device=device)
    target, total = last_global_layer(run), len(ids)
    rows = torch.zeros((total - rows_start, total), dtype=torch.float32, device=device)

    def record(call: dict) -> None:
        if call["layer"] != target:
            return
        q, k = call["query"], call["key"]  # (1, H, q, D), (1, Hkv, n, D)
        n = k.shape[2]
        first = n - q.shape[2]  # absolute position of the call's first query: the full cache holds every token
        lo = max(rows_start, first)
        if lo >= n:
            return
        mask = call["mask"]
        sub_mask = None if mask is None else mask[:, :, lo - first:]
        probs, _ = attention_probs(q[:, :, lo - first:], k, sub_mask, call["scaling"])
        rows[lo - rows_start: n - rows_start, :n] = probs[0].sum(0)

    saved = run.recorder
    run.recorder = record
    run.capacity_hint, run.chunk_hint = total, min(prefill_chunk, total)
    try:
        cache = run.new_cache()
    finally:
        run.capacity_hint = run.chunk_hint = 0
    try:
        forward_chunks(model, x, cache, prefill_chunk)
    finally:
        run.recorder = saved
    return rows


@dataclass
class InfiniRetri(Method):
    """InfiniRetri (arXiv 2502.12962): chunked reading that keeps the sentences the question attends to.

    Settings
    --------
    chunk : tokens of new document text per forward (the paper's window, the package's ``window_length``)
    topk : context tokens whose sentences are kept after each chunk
    phrase : width of the ones kernel that smooths token scores over phrases (``phrase_token_num``)
    weigh_question : weigh each question row by the square of its attention to the question on the first chunk
        (the official ``use_question_weight``); False weighs all rows 1

    As a cache and attention method it is ``full``; :meth:`drive` (or :func:`attnkit.infiniretri`) runs the reading
    loop. One document at a time: a list is read document by document (no padded batch).

    Differences from the official code: the prompt is tokenised as one string (the official code concatenates
    per-sentence tokenisations) and the tokens between the context and the question are not scored; sentences
    end at ``.!?`` before whitespace or at a blank line (no merge of short pieces after a period); a sentence
    longer than ``chunk`` is cut into pieces of ``chunk`` tokens; when the kept sentences would push a forward
    past the model's context, the lowest-scoring ones are dropped (the official code does not bound them);
    answers are greedy (the package samples at temperature 0.5).
    """

    chunk: int = 1024
    topk: int = 300
    phrase: int = 8
    weigh_question: bool = True

    name = "infiniretri"
    summary = "generation driver: reads a document in sentence chunks, keeps sentences the question attends to"
    paper = "https://arxiv.org/abs/2502.12962"
    driver: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_int(self.name, "chunk", self.chunk, 16)
        check_int(self.name, "topk", self.topk, 1)
        check_int(self.name, "phrase", self.phrase, 1)
        if not isinstance(self.weigh_question, bool):
            raise ValueError(f"{self.name}: weigh_question={self.weigh_question!r} is invalid; accepted: True, False")

    def drive(self, model, tokenizer, document: str | list[str], question: str | list[str], *,
              template: str = DEFAULT_TEMPLATE, answer_prefix: str = "", max_new_tokens: int = 128,
              chat: bool = True, prefill_chunk: int = 512) -> "Generation | list[Generation]":
        """Answer ``question`` about ``document`` (or each question about its document, for lists).

        ``template`` holds a ``{context}`` slot followed by a ``{question}`` slot (default: the package's prompt);
        with ``chat`` it becomes the user turn of the tokenizer's chat template, and ``answer_prefix`` follows the
        assistant turn. Returns one :class:`~attnkit.inference.Generation` per document, whose ``stats["reader"]``
        says what was read and kept; ``prefill_s`` covers the reading forwards and the answer's prefill.
        """
        batched = isinstance(document, (list, tuple))
        docs = list(document) if batched else [document]
        questions = list(question) if isinstance(question, (list, tuple)) else [question] * len(docs)
        if len(questions) != len(docs):
            raise ValueError(f"{len(docs)} documents but {len(questions)} questions; accepted: one question per "
                             "document, or one for all")
        parsed = Template.parse(template)
        with _dense_run(model, self) as run:
            gens = [self._read(run, model, tokenizer, d, q, parsed, answer_prefix, max_new_tokens, chat,
                               prefill_chunk) for d, q in zip(docs, questions)]
        return gens if batched else gens[0]

    def _read(self, run, model, tokenizer, document, question, template, answer_prefix, max_new_tokens, chat,
              prefill_chunk) -> "Generation":
        from attnkit.inference import Generation, generate

        t0 = time.perf_counter()
        spans, counts = split_document(tokenizer, document, self.chunk)
        texts = [document[a:b] for a, b in spans]
        max_pos = getattr(run.config, "max_position_embeddings", None)
        bare = len(layout(tokenizer, template, [], question, answer_prefix, chat).ids)
        limit = None if max_pos is None else max_pos - bare - max(self.chunk, max_new_tokens) - SLACK
        if limit is not None and limit < 0:
            raise ValueError(f"{self.name}: chunk={self.chunk} (or max_new_tokens={max_new_tokens}) plus the prompt's "
                             f"{bare} tokens exceed the model's context of {max_pos}; accepted: chunk <= "
                             f"{max_pos - bare - SLACK}")
        kept: list[int] = []
        weights = None
        stats = {"chunks": 0, "document_tokens": sum(counts), "forward_tokens": 0, "max_forward_tokens": 0,
                 "capped": 0}
        for chunk in pack(counts, self.chunk):
            pieces = kept + chunk
            lay = layout(tokenizer, template, [texts[i] for i in pieces], question, answer_prefix, chat)
            rows = question_attention(run, model, lay.ids, lay.rows_start, prefill_chunk)
            # the first chunk's weights serve every chunk (the official QUESTION_WEIGHT); should the question's
            # rows tokenise differently later, that chunk is weighed by its own rows
            if weights is None or weights.shape[0] != rows.shape[0]:
                weights = None if self.weigh_question else rows.new_ones(rows.shape[0])
            scores, weights = phrase_scores(rows, lay.context, self.phrase, weights)
            kept = self._keep(scores, lay.piece_of, pieces, counts, limit, stats)
            stats["chunks"] += 1
            stats["forward_tokens"] += len(lay.ids)
            stats["max_forward_tokens"] = max(stats["max_forward_tokens"], len(lay.ids))
        final = layout(tokenizer, template, [texts[i] for i in kept], question, answer_prefix, chat)
        read_s = time.perf_counter() - t0
        gen = generate(model, tokenizer, final.ids, max_new_tokens=max_new_tokens, prefill_chunk=prefill_chunk)
        stats.update(kept_sentences=len(kept), kept_tokens=sum(counts[i] for i in kept),
                     kept_spans=[list(spans[i]) for i in kept])  # character ranges of the document
        return Generation(text=gen.text, tokens=gen.tokens, prompt_tokens=gen.prompt_tokens,
                          prefill_s=read_s + gen.prefill_s, decode_s=gen.decode_s, decode_steps=gen.decode_steps,
                          kv_bytes=gen.kv_bytes, stats={**gen.stats, "reader": stats})

    def _keep(self, scores: torch.Tensor, piece_of: list[int], pieces: list[int], counts: list[int],
              limit: int | None, stats: dict) -> list[int]:
        """Document sentence indices (in order) holding the top-k context tokens; the kept set replaces the old
        one (old kept sentences compete with the chunk's, as in the official code)."""
        k = min(self.topk, scores.numel())
        if k == 0:
            return []
        top_scores, top = scores.topk(k)
        best: dict[int, float] = {}  # sentence -> its best selected token's score
        for s, t in zip(top_scores.tolist(), top.tolist()):
            sentence = pieces[piece_of[t]]
            best[sentence] = max(best.get(sentence, s), s)
        keep = sorted(best)
        if limit is not None and sum(counts[i] for i in keep) > limit:
            stats["capped"] += 1
            keep, total = [], 0
            for i in sorted(best, key=best.get, reverse=True):
                if total + counts[i] <= limit:
                    keep.append(i)
                    total += counts[i]
            keep.sort()
        return keep


@contextlib.contextmanager
def _dense_run(model, method: InfiniRetri):
    """The active run on ``model`` if its method reads densely, else a fresh ``attnkit.apply(model, method)``."""
    from attnkit.session import apply, text_config

    run = ACTIVE_RUNS.get(id(text_config(model)))
    if run is None:
        with apply(model, method) as fresh:
            yield fresh
        return
    if not (isinstance(run.method, InfiniRetri) or run.method.name == "full"):
        raise ValueError(f"{method.name} reads with dense attention, but {run.method.name} is active on this model; "
                         f"call it outside attnkit.apply, or inside attnkit.apply(model, '{method.name}')")
    yield run
