"""Attention AT / iAT: adversarial training on the attention scores of a BiLSTM + additive-attention classifier.

Paper: S. Kitada and H. Iyatomi, "Attention Meets Perturbations: Robust and Interpretable Attention with
Adversarial Training", IEEE Access 9 (2021), arXiv 2009.12064; official code shunk031/attention-meets-perturbation.

Idea: perturb the pre-softmax attention scores ``s`` in the direction that increases the loss most,
``r = xi * g / ||g||`` with ``g = dL/ds`` (per sentence), and train on ``L(s) + lambda * L(s + r)``. Attention iAT
restricts ``r`` to combinations of the normalised differences between this sentence's scores and the other
sentences' scores in the mini-batch, which pushes the model towards attention that tells sentences apart.

Shapes: tokens (B, T) int64, 0 = padding; lengths (B,); embedded (B, T, E); hidden (B, T, 2H) (BiLSTM, zero at
padding); scores (B, T) = w2 . tanh(W1 h + b1) with W1: 2H -> H (the official ``bc_tanh`` layer: hidden // 2,
no bias on w2); attention = masked softmax over T; context (B, 2H) = sum_t attention_t h_t; one logit (B,) and a
class-balanced binary cross-entropy (positives weighted n_neg / n_pos, then the batch mean, as their
``weighted_loss``). Perturbations are (B, T) and are added to ``scores`` before the softmax; padded positions get a
zero gradient, so AT leaves them at zero.

What follows the official code (file names in that repository):

- model: ``amep/models/bc/at_advt.py`` (embedding -> BiLSTM -> attention -> weighted sum -> Linear(2H, 1), BCE with
  the balanced ``pos_weight`` of ``amep/data/dataset_readers/bc/sst.py``, ``amep/nn/util.py:weighted_loss``),
  ``amep/modules/attention_layer/bc/vanilla.py`` (the additive tanh scorer);
- the perturbations: ``amep/modules/attention_layer/bc/advt.py``: the gradient is taken w.r.t. a zero tensor added
  to the pre-softmax scores, normalised per sentence over tokens (``F.normalize``, L2, eps 1e-12) and scaled by
  ``xi``; the adversarial loss is weighted by ``lam_adv`` = 1;
- hyper-parameters: ``config/base_bc.jsonnet`` + ``config/sst/train.jsonnet``: embedding 300, BiLSTM 1 layer of 128
  per direction, attention hidden 256 // 2 = 128, batch 32 with length bucketing (padding noise 0.2), 8 epochs,
  Adam with amsgrad, lr 1e-3, weight decay 1e-5 on encoder and output, 0 on the attention layer, plain Adam for
  the embedding (their parameter groups leave it in the default group), model selection on dev AUC, test
  evaluated at the selected epoch; SST sentences with more than 5 tokens (``min_length`` 5);
- data preparation: ``amep/commands/make_dataset/bc/sst.py`` (see :mod:`attnkit.zoo.sst`).

iAT, two variants (``iat_variant``):

- ``"paper"`` (default): for sentence t, d_tk = m_t * (s_k - s_t) / ||m_t * (s_k - s_t)|| for every other k in
  the batch (m_t: t's token mask, padded scores taken as 0 as their masked softmax does); the loss gradient
  w.r.t. the coefficients of r(alpha) = sum_k alpha_k d_tk is alpha-grad_k = <d_tk, g_t>; alpha = its unit
  vector; r_t = xi * normalize(sum_k alpha_k d_tk). r_t lies in span{d_tk} and has norm xi (the official code
  also normalises the final perturbation before scaling by xi).
- ``"official"``: what ``TanhBCAttentioniAT`` computes. It builds the (B, B, T) normalised differences and zero
  coefficients, but adds ``normalize(coefficients * differences)`` = 0 to the scores and takes the gradient
  w.r.t. that sum, which is g itself; the second pass adds ``xi * normalize(-g)``. So the released iAT
  perturbation is minus the AT one (a loss-decreasing step) and does not depend on the differences (a test
  replays the construction). Reported here as found, selectable for a comparison.

Deviations:

- no pretrained vectors offline: the embedding is randomly initialised (Xavier uniform, AllenNLP's default for an
  embedding without a pretrained file) and trained from scratch; the official SST config loads fastText
  ``wiki.simple.vec`` (300-d) and keeps only words that have a vector; we keep every training token;
- data (:mod:`attnkit.zoo.sst`): GLUE SST-2 train phrases (67,349) instead of the 6,920 SST training sentences;
  the test split is the 872 GLUE validation sentences (= SST's binary dev sentences), all kept; dev is a fixed,
  seeded 1,000 held-out training phrases; the > 5 token filter is applied to the training pool only, and their
  filter's strict ``< max length`` (which drops the longest sentences) is not reproduced;
- accuracy counts logit > 0 as positive (the official metric feeds (1 - logit, logit) to a categorical accuracy,
  i.e. thresholds the raw logit at 0.5);
- the official probe pass (``zero_grad(); loss_adv_first.backward()``) leaves its parameter gradients in place
  and the trainer adds the main backward on top, so the update follows 2 L + lambda L_adv; the default here is the
  paper's L + lambda L_adv, ``keep_probe_gradients=True`` reproduces the code;
- cheaper but equal: the official code re-runs embedding + BiLSTM for the probe pass; there is no dropout, so the
  probe equals the clean pass and g is taken from the clean graph, and the adversarial pass reuses the encoder
  states (the perturbation enters after the encoder): the same values and gradients with one encoder pass;
- ``xi`` defaults to 1.0: the official layer takes xi as a required argument and the repository ships no AT
  config, so there is no official default;
- CPU-size runs (fewer epochs, a training subset) are set by the caller; the defaults are the official sizes.

Also reported (optional, ``interpretability``): the paper's interpretability measure in proxy form, the mean over
test sentences of the Pearson correlation between attention weights and gradient-based word importance
(|d logit / d e_t . e_t| with the attention detached, as Jain & Wallace compute it).
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from attnkit.zoo.base import check_bool, check_choice, check_float, check_int

MODES = ("plain", "at", "iat")
IAT_VARIANTS = ("paper", "official")
NORM_EPS = 1e-12  # F.normalize's default, as in the official code
OWNER = "attention AT"


@dataclass
class ATConfig:
    """One training run. Defaults: the official SST recipe (``config/base_bc.jsonnet``) and lambda 1, xi 1."""

    mode: str = "plain"  # "plain" | "at" | "iat"
    iat_variant: str = "paper"  # "paper" (span of normalised differences) | "official" (what the released code does)
    xi: float = 1.0  # perturbation norm per sentence
    lam: float = 1.0  # weight of the adversarial loss
    keep_probe_gradients: bool = False  # True: 2 L + lam L_adv, as the official code's update
    embed_dim: int = 300
    hidden_dim: int = 128  # per LSTM direction
    epochs: int = 8
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-5  # encoder and output layer (attention layer and embedding: 0)
    padding_noise: float = 0.2  # length-bucketing noise, as AllenNLP's bucket sampler
    balance_classes: bool = True  # positives weighted n_neg / n_pos in the loss
    min_tokens: int = 6  # SST-2 training pool: phrases with > 5 tokens (official min_length 5)
    dev_size: int = 1000  # SST-2: held-out training phrases for epoch selection by AUC (0: last epoch)
    train_size: int = 0  # SST-2: training phrases used (0: all of the pool left after dev)
    min_count: int = 1
    interpretability: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice(OWNER, "mode", self.mode, MODES)
        check_choice(OWNER, "iat_variant", self.iat_variant, IAT_VARIANTS)
        check_float(OWNER, "xi", self.xi, 0.0, open_lo=True)
        check_float(OWNER, "lam", self.lam, 0.0)
        check_float(OWNER, "lr", self.lr, 0.0, open_lo=True)
        check_float(OWNER, "weight_decay", self.weight_decay, 0.0)
        check_float(OWNER, "padding_noise", self.padding_noise, 0.0, 0.99)
        for name in ("embed_dim", "hidden_dim", "epochs", "batch_size", "min_tokens", "min_count"):
            check_int(OWNER, name, getattr(self, name), 1)
        for name in ("dev_size", "train_size", "seed"):
            check_int(OWNER, name, getattr(self, name), 0)
        for name in ("keep_probe_gradients", "balance_classes", "interpretability"):
            check_bool(OWNER, name, getattr(self, name))


class Output(NamedTuple):
    logits: torch.Tensor  # (B,)
    attention: torch.Tensor  # (B, T)
    scores: torch.Tensor  # (B, T) pre-softmax
    hidden: torch.Tensor  # (B, T, 2H)
    mask: torch.Tensor  # (B, T) bool
    embedded: torch.Tensor  # (B, T, E)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over the valid positions of each row (padded ones get 0 weight and 0 gradient)."""
    return scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)


class AttentionBiLSTM(nn.Module):
    """Embedding -> 1-layer BiLSTM -> additive tanh attention -> weighted sum -> one logit (shapes: module doc)."""

    def __init__(self, vocab_size: int, embed_dim: int = 300, hidden_dim: int = 128) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        nn.init.xavier_uniform_(self.embedding.weight)
        with torch.no_grad():
            self.embedding.weight[0].zero_()
        self.encoder = nn.LSTM(embed_dim, hidden_dim, num_layers=1, batch_first=True, bidirectional=True)
        width = 2 * hidden_dim
        self.attention = nn.Sequential(nn.Linear(width, width // 2), nn.Tanh(), nn.Linear(width // 2, 1, bias=False))
        self.output = nn.Linear(width, 1)

    def encode(self, embedded: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(embedded, lengths.cpu(), batch_first=True, enforce_sorted=False)
        hidden, _ = self.encoder(packed)
        hidden, _ = nn.utils.rnn.pad_packed_sequence(hidden, batch_first=True, total_length=embedded.shape[1])
        return hidden

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.attention(hidden).squeeze(-1)

    def classify(self, hidden: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor,
                 detach_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B,), attention (B, T)) from encoder states and (possibly perturbed) scores."""
        attention = masked_softmax(scores, mask)
        weights = attention.detach() if detach_attention else attention
        context = torch.einsum("bt,btd->bd", weights, hidden)
        return self.output(context).squeeze(-1), attention

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor, detach_attention: bool = False) -> Output:
        mask = torch.arange(tokens.shape[1], device=tokens.device)[None, :] < lengths[:, None].to(tokens.device)
        embedded = self.embedding(tokens)
        hidden = self.encode(embedded, lengths)
        scores = self.scores(hidden)
        logits, attention = self.classify(hidden, scores, mask, detach_attention)
        return Output(logits, attention, scores, hidden, mask, embedded)


def balanced_bce(logits: torch.Tensor, labels: torch.Tensor, pos_weight: float) -> torch.Tensor:
    """Batch mean of the BCE with positives weighted ``pos_weight`` (the official ``weighted_loss``)."""
    target = labels.to(logits.dtype)
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    weight = target * pos_weight + (1 - target)
    return (loss * weight).mean()


def at_perturbation(grad: torch.Tensor, xi: float) -> torch.Tensor:
    """Attention AT: ``xi * g / ||g||`` per sentence (rows of the (B, T) score gradient)."""
    return xi * F.normalize(grad, dim=-1, eps=NORM_EPS)


def iat_directions(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, B, T): d[t, k] = m_t (s_k - s_t) / ||m_t (s_k - s_t)|| (padded scores read as 0; d[t, t] = 0)."""
    s = scores * mask
    diff = (s[None, :, :] - s[:, None, :]) * mask[:, None, :]
    return F.normalize(diff, dim=-1, eps=NORM_EPS)


def iat_perturbation(scores: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor, xi: float) -> torch.Tensor:
    """Attention iAT (paper form): ``xi`` times the unit combination of the difference directions whose
    coefficients are the normalised loss gradient w.r.t. them (module docstring); (B, T)."""
    d = iat_directions(scores.detach(), mask)
    alpha = F.normalize(torch.einsum("tkn,tn->tk", d, grad), dim=-1, eps=NORM_EPS)
    return xi * F.normalize(torch.einsum("tk,tkn->tn", alpha, d), dim=-1, eps=NORM_EPS)


def iat_official_perturbation(grad: torch.Tensor, xi: float) -> torch.Tensor:
    """What the released ``TanhBCAttentioniAT`` adds in its second pass: ``xi * normalize(-g)``."""
    return xi * F.normalize(-grad, dim=-1, eps=NORM_EPS)


def perturbation(cfg: ATConfig, scores: torch.Tensor, mask: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The (B, T) perturbation of ``cfg.mode`` (not for "plain"), detached."""
    if cfg.mode == "at":
        r = at_perturbation(grad, cfg.xi)
    elif cfg.mode == "iat" and cfg.iat_variant == "paper":
        r = iat_perturbation(scores, mask, grad, cfg.xi)
    elif cfg.mode == "iat":
        r = iat_official_perturbation(grad, cfg.xi)
    else:
        raise ValueError(f"{OWNER}: no perturbation for mode={cfg.mode!r}; accepted: 'at', 'iat'")
    return r.detach()


def training_loss(model: AttentionBiLSTM, tokens: torch.Tensor, lengths: torch.Tensor, labels: torch.Tensor,
                  cfg: ATConfig, pos_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """(loss to backpropagate, {"loss": L, "loss_adv": L_adv}) of one batch under ``cfg.mode``."""
    out = model(tokens, lengths)
    loss = balanced_bce(out.logits, labels, pos_weight)
    if cfg.mode == "plain":
        return loss, {"loss": loss.item(), "loss_adv": 0.0}
    (grad,) = torch.autograd.grad(loss, out.scores, retain_graph=True)
    r = perturbation(cfg, out.scores, out.mask, grad)
    logits_adv, _ = model.classify(out.hidden, out.scores + r, out.mask)
    loss_adv = balanced_bce(logits_adv, labels, pos_weight)
    total = loss + cfg.lam * loss_adv
    if cfg.keep_probe_gradients:
        total = total + loss
    return total, {"loss": loss.item(), "loss_adv": loss_adv.item()}


def pad_batch(sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    tokens = torch.zeros(len(sequences), int(lengths.max()), dtype=torch.long)
    for i, s in enumerate(sequences):
        tokens[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return tokens, lengths


def bucket_batches(lengths: list[int], batch_size: int, noise: float, rng: random.Random) -> list[list[int]]:
    """AllenNLP-style bucketing: sort by length * (1 + U(-noise, noise)), cut into batches, shuffle the batches."""
    noisy = [n + rng.uniform(-noise * n, noise * n) for n in lengths]
    order = sorted(range(len(lengths)), key=noisy.__getitem__)
    batches = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def roc_auc(scores: list[float], labels: list[int]) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half); nan when one class is absent."""
    pos = sum(labels)
    neg = len(labels) - pos
    if pos == 0 or neg == 0:
        return float("nan")
    order = sorted(range(len(scores)), key=scores.__getitem__)
    ranks = [0.0] * len(scores)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = sum(r for r, y in zip(ranks, labels) if y == 1)
    return (rank_sum - pos * (pos + 1) / 2) / (pos * neg)


def _pearson(x: torch.Tensor, y: torch.Tensor) -> float | None:
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    den = float(x.norm() * y.norm())
    return float((x * y).sum()) / den if den > 0 else None


def evaluate(model: AttentionBiLSTM, encoded: list[list[int]], labels: list[int], batch_size: int = 256,
             interpretability: bool = False) -> dict[str, float]:
    """accuracy, f1 (positive class), auc; with ``interpretability`` also ``attn_grad_pearson`` (module doc)."""
    model.eval()
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    logits_all = [0.0] * len(encoded)
    correlations = []
    for start in range(0, len(order), batch_size):
        idx = order[start: start + batch_size]
        tokens, lengths = pad_batch([encoded[i] for i in idx])
        with torch.no_grad():
            out = model(tokens, lengths)
        for i, v in zip(idx, out.logits.tolist()):
            logits_all[i] = v
        if interpretability:
            with torch.enable_grad():
                out = model(tokens, lengths, detach_attention=True)
                (grad,) = torch.autograd.grad(out.logits.sum(), out.embedded)
            importance = (grad * out.embedded).sum(-1).abs().detach()
            for row, n in enumerate(lengths.tolist()):
                if n >= 2:
                    c = _pearson(out.attention[row, :n].detach(), importance[row, :n])
                    if c is not None:
                        correlations.append(c)
    model.train()
    preds = [int(v > 0) for v in logits_all]
    tp = sum(p == 1 and y == 1 for p, y in zip(preds, labels))
    fp = sum(p == 1 and y == 0 for p, y in zip(preds, labels))
    fn = sum(p == 0 and y == 1 for p, y in zip(preds, labels))
    result = {"accuracy": sum(p == y for p, y in zip(preds, labels)) / len(labels),
              "f1": 2 * tp / (2 * tp + fp + fn) if tp else 0.0,
              "auc": roc_auc(logits_all, labels)}
    if interpretability:
        result["attn_grad_pearson"] = sum(correlations) / len(correlations) if correlations else float("nan")
    return result


def make_optimizer(model: AttentionBiLSTM, cfg: ATConfig) -> torch.optim.Optimizer:
    """The official parameter groups: Adam(amsgrad) with weight decay on encoder and output, none on attention;
    the embedding in the default group (plain Adam, no decay)."""
    return torch.optim.Adam([
        {"params": model.encoder.parameters(), "weight_decay": cfg.weight_decay, "amsgrad": True},
        {"params": model.attention.parameters(), "weight_decay": 0.0, "amsgrad": True},
        {"params": model.output.parameters(), "weight_decay": cfg.weight_decay, "amsgrad": True},
        {"params": model.embedding.parameters(), "weight_decay": 0.0, "amsgrad": False},
    ], lr=cfg.lr)


def load_sst2(cfg: ATConfig) -> dict[str, list[tuple[str, int]]]:
    """{"train", "dev", "test"} of SST-2 for ``cfg`` (splits: :func:`attnkit.zoo.sst.split_train`)."""
    from attnkit.zoo import sst

    train, dev = sst.split_train(sst.sst2_train(), cfg.min_tokens, cfg.dev_size, cfg.train_size)
    return {"train": train, "dev": dev, "test": sst.sst2_test()}


def train_classifier(cfg: ATConfig, data: dict[str, list[tuple[str, int]]] | None = None,
                     progress: bool = False) -> dict[str, Any]:
    """Train one classifier under ``cfg.mode``; seeded (weights and batch order by ``cfg.seed``).

    ``data``: {"train": [(text, label)], "test": [...], "dev": [...] (optional)}; default SST-2
    (:func:`load_sst2`; ``min_tokens`` / ``dev_size`` / ``train_size`` apply to it only). The epoch with the best
    dev AUC is kept (the last one without dev data) and scored on test. Returns ``test_accuracy``, ``test_f1``,
    ``test_auc`` (and ``attn_grad_pearson``) at that epoch, ``test_accuracy_last``, ``best_epoch``, ``history``
    (per epoch: train loss, adversarial loss, dev AUC, test accuracy), sizes, ``seconds`` and the config.
    """
    from attnkit.zoo.sst import Vocab

    start = time.perf_counter()
    data = load_sst2(cfg) if data is None else {"dev": [], **data}
    for split in ("train", "test"):
        if not data.get(split):
            raise ValueError(f"{OWNER}: data[{split!r}] is empty; accepted: a non-empty list of (text, label)")
    vocab = Vocab.build([t for t, _ in data["train"]], cfg.min_count)
    enc = {k: [vocab.encode(t) for t, _ in v] for k, v in data.items()}
    lab = {k: [int(y) for _, y in v] for k, v in data.items()}
    n_pos = sum(lab["train"])
    pos_weight = (len(lab["train"]) - n_pos) / n_pos if cfg.balance_classes and n_pos else 1.0

    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    model = AttentionBiLSTM(len(vocab), cfg.embed_dim, cfg.hidden_dim)
    opt = make_optimizer(model, cfg)
    lengths = [len(s) for s in enc["train"]]
    y_train = torch.tensor(lab["train"])
    history, best, best_state = [], (-math.inf, 0), None
    for epoch in range(1, cfg.epochs + 1):
        totals, steps = {"loss": 0.0, "loss_adv": 0.0}, 0
        for idx in bucket_batches(lengths, cfg.batch_size, cfg.padding_noise, rng):
            tokens, lens = pad_batch([enc["train"][i] for i in idx])
            opt.zero_grad(set_to_none=True)
            loss, parts = training_loss(model, tokens, lens, y_train[idx], cfg, pos_weight)
            loss.backward()
            opt.step()
            for k in totals:
                totals[k] += parts[k]
            steps += 1
        row = {"epoch": epoch, "train_loss": totals["loss"] / steps, "train_loss_adv": totals["loss_adv"] / steps}
        if enc["dev"]:
            row["dev_auc"] = evaluate(model, enc["dev"], lab["dev"])["auc"]
        row["test_accuracy"] = evaluate(model, enc["test"], lab["test"])["accuracy"]
        history.append(row)
        select = row.get("dev_auc", epoch)  # no dev data: the last epoch
        if not math.isnan(select) and select > best[0]:
            best, best_state = (select, epoch), copy.deepcopy(model.state_dict())
        if progress:
            print(f"[{cfg.mode}{'/' + cfg.iat_variant if cfg.mode == 'iat' else ''} seed {cfg.seed}] " +
                  " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()),
                  flush=True)
    if best_state is not None:
        model.load_state_dict(best_state)
    test = evaluate(model, enc["test"], lab["test"], interpretability=cfg.interpretability)
    return {
        "mode": cfg.mode, "test_accuracy": test["accuracy"], "test_f1": test["f1"], "test_auc": test["auc"],
        **({"attn_grad_pearson": test["attn_grad_pearson"]} if cfg.interpretability else {}),
        "test_accuracy_last": history[-1]["test_accuracy"], "best_epoch": best[1],
        "dev_auc": history[best[1] - 1].get("dev_auc"), "history": history,
        "sizes": {"train": len(enc["train"]), "dev": len(enc["dev"]), "test": len(enc["test"]), "vocab": len(vocab)},
        "pos_weight": pos_weight, "seconds": time.perf_counter() - start, "config": asdict(cfg),
    }
