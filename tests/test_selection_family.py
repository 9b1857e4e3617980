"""Method-specific rules of the decode-time selection family (the generic tests run them against the dense
reference): PyramidKV's per-layer budgets, TidalDecode's shared selection."""

from __future__ import annotations

import pytest
import torch

import attnkit
from attnkit.methods.stored.pyramidkv import pyramid_older
from conftest import DEVICE, DTYPE
from test_methods import global_layers, ids_for, stream
from tiny import tiny_llama


def test_pyramid_budgets_shrink_with_depth_and_keep_the_total():
    for budget, window, beta, prompt, layers in [(1024, 32, 20, 8192, 32), (96, 16, 20, 400, 30), (64, 8, 4, 5000, 7)]:
        kept = [pyramid_older(budget, window, beta, prompt, d, layers) for d in range(layers)]
        assert kept == sorted(kept, reverse=True) and kept[0] > kept[-1], kept
        share = budget - window
        assert abs(sum(kept) - layers * share) <= layers / 2, (sum(kept), layers * share)  # the same total
    # a prompt shorter than twice the share: SnapKV's uniform budget; the bottom layer never exceeds the prompt
    assert {pyramid_older(96, 16, 20, 150, d, 30) for d in range(30)} == {80}
    assert pyramid_older(20, 4, 20, 36, 0, 5) == 36 - 4


def test_pyramidkv_keeps_per_layer_budgets_after_the_prompt():
    model = tiny_llama(dtype=DTYPE).to(DEVICE)
    ids = ids_for(200, seed=3)
    settings = dict(budget=40, window=8, kernel=3, beta=4)
    with torch.no_grad(), attnkit.apply(model, "pyramidkv", **settings) as run:
        stream(model, ids, chunk=50, decode=1)
        layers = global_layers(run)
        kept = [int(run.kept_tokens()[i].max()) for i in layers]
    want = [pyramid_older(40, 8, 4, 200, d, len(layers)) + 8 + 1 for d in range(len(layers))]  # + window + 1 decoded
    assert kept == want, (kept, want)
