"""PyramidKV: SnapKV's selection with per-layer budgets that shrink from the lower layers to the upper ones."""

from __future__ import annotations

from dataclasses import dataclass

from attnkit.hf.cache import KVLayer
from attnkit.methods.base import LayerContext, check_int
from attnkit.methods.stored.snapkv import SnapKV, SnapKVLayer


def pyramid_older(budget: int, window: int, beta: int, prompt: int, depth: int, layers: int) -> int:
    """Older-than-window tokens layer ``depth`` of ``layers`` keeps for a ``prompt``-token prompt: an arithmetic
    sequence from ``hi = 2 (budget - window) - lo`` at the bottom to ``lo = (budget - window) // beta`` at the
    top (hi capped by what the prompt holds, lo then raised to keep the mean), each term rounded; a prompt with
    fewer than ``2 (budget - window)`` older tokens gives every layer ``budget - window`` (SnapKV)."""
    share = budget - window
    if prompt - window < 2 * share or layers == 1:
        return share
    lo = share // beta
    hi = 2 * share - lo
    if hi >= prompt - window:
        hi = prompt - window
        lo = 2 * share - hi
    return round(hi - depth * (hi - lo) / (layers - 1))


class PyramidKVLayer(SnapKVLayer):
    """A SnapKV layer whose number of kept older tokens depends on its depth among the method's layers."""

    def __init__(self, cfg: "PyramidKV", layer_idx: int, run, depth: int, layers: int) -> None:
        super().__init__(cfg, layer_idx, run)
        self.depth, self.layers = depth, layers

    def keep_older(self, n_obs: int, w: int) -> int:
        cfg = self.cfg
        return pyramid_older(cfg.budget, w, cfg.beta, n_obs, self.depth, self.layers)


@dataclass
class PyramidKV(SnapKV):
    """SnapKV with a pyramid of budgets: lower layers keep more of the prompt, upper layers less, same total.

    Paper: PyramidKV, Cai et al. 2024 (https://arxiv.org/abs/2406.02069; Zefan-Cai/KVCache-Factory). Attention
    scatters widely in the lower layers and concentrates on a few tokens in the upper ones ("pyramidal
    information funneling"), so a fixed total budget is better spent unevenly.

    Selection per layer is SnapKV's (observation window of the prompt's last ``window`` queries, pooled scores,
    per KV head); the number of older tokens layer l of L keeps follows the official code: with
    s = budget - window, lo = s // beta and hi = 2 s - lo (capped at the prompt's older tokens, lo then raised to
    keep the mean), layer l keeps round(hi - l (hi - lo) / (L - 1)) plus the window; prompts shorter than 2 s
    plus the window are compressed uniformly (SnapKV). Deviations from the official code: its integer step
    ((hi - lo) // (L - 1)) leaves the upper layers above lo, so its total exceeds L * budget by up to
    ~L^2 / 2 tokens (416 for Llama-3-8B at budget 1024); we keep the paper's equal total (within rounding).
    Depth counts the model's global-attention layers only (Gemma-3's sliding layers keep their own window),
    where the official code indexes all layers of its (all-global) models.
    Shapes: keys/values (B, Hkv, older_l + window + generated, D) after the compression.
    """

    name = "pyramidkv"
    summary = "SnapKV selection with budgets shrinking from lower to upper layers (same total)"
    paper = "https://arxiv.org/abs/2406.02069"

    beta: int = 20

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.name, "beta", self.beta, 1)

    @classmethod
    def for_budget(cls, tokens: int) -> "PyramidKV":
        """``tokens`` per layer on average (the pyramid's mean), SnapKV's window rule."""
        return cls(budget=tokens, window=min(32, tokens // 4))

    def make_layer(self, ctx: LayerContext) -> KVLayer:
        types = ctx.run.layer_types
        own = [i for i, t in enumerate(types) if t != "sliding_attention"]
        return PyramidKVLayer(self, ctx.layer_idx, ctx.run, own.index(ctx.layer_idx), len(own))
