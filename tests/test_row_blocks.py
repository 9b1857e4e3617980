"""Eager scoring passes in query-row blocks: H2O and SpAtten score with every query's probabilities, and a long
prefill chunk's (B, H, q, n) float32 probabilities (1.5 GiB per 2,048-query chunk for H2O at a 4,096-token
budget on a 32-head model) are never whole. Above ``MASKED_SCORE_BYTES`` the chunk goes in row blocks, each observed as it is made; logits
equal the one-block run's on a ragged, left-padded batch (eviction active: budgets below the prompt)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config

import attnkit
from attnkit.hf import attention
from attnkit.methods.stored.h2o import H2OLayer
from attnkit.methods.stored.snapkv import SnapKVLayer
from attnkit.methods.stored.spatten import SpAttenLayer
from attnkit.session import cache_argument
from conftest import DEVICE, DTYPE
from test_methods import MODELS, assert_close
from test_padded_batch import LENGTHS, prompts, stream_logits

BLOCK_ROWS = 8  # query rows per block under the test's score budget (the one prompt chunk has 51 queries)
CASES = {
    "h2o": ("h2o", {"heavy": 8, "recent": 6}),
    "spatten": ("spatten", {"budget": 16, "recent": 2, "value_threshold": 1e-3}),  # its own attend: values pruned
    "spatten/heads": ("spatten", {"budget": 16, "recent": 2, "head_keep": 0.5}),
    "spatten/msb": ("spatten", {"budget": 16, "recent": 2, "msb_bits": 4, "lsb_bits": 4}),
}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    return MODELS[request.param](dtype=DTYPE).to(DEVICE)


def logits_and_blocks(model, method: str, settings: dict, monkeypatch, block_rows: int | None):
    """Logits (B, 1 + 2, V) of one ragged batch, and the query rows (start, stop) of every prefill ``observe``."""
    if block_rows is not None:  # B x H x n x 4 bytes x rows: the batch's 3 rows, 4 heads, 51 keys
        monkeypatch.setattr(attention, "MASKED_SCORE_BYTES", len(LENGTHS) * 4 * max(LENGTHS) * 4 * block_rows)
    blocks = []
    cls = H2OLayer if method == "h2o" else SpAttenLayer
    real = cls.observe

    def observe(self, probs, rows=None):
        if self.qpos.shape[1] > 1:
            blocks.append((rows.start, rows.stop))
        return real(self, probs, rows)

    monkeypatch.setattr(cls, "observe", observe)
    decode_ids = torch.randint(3, 256, (len(LENGTHS), 2), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    with attnkit.apply(model, method, **settings):
        logits = stream_logits(model, prompts(), decode_ids)
    monkeypatch.undo()
    return logits, blocks


@pytest.mark.parametrize("case", list(CASES))
def test_row_blocks_equal_one_block(model, case, monkeypatch):
    method, settings = CASES[case]
    whole, one = logits_and_blocks(model, method, settings, monkeypatch, None)
    blocked, many = logits_and_blocks(model, method, settings, monkeypatch, BLOCK_ROWS)
    q = max(LENGTHS)
    assert set(one) == {(0, q)}
    # every global layer's prefill went in ceil(51 / 8) blocks, each at most 8 rows, covering the chunk
    assert len(many) == len(one) * -(-q // BLOCK_ROWS)
    assert all(stop - start <= BLOCK_ROWS for start, stop in many)
    assert_close(blocked, whole, f"{case}: {BLOCK_ROWS}-row blocks vs one block")


def test_snapkv_under_a_softcap_observes_only_its_window(monkeypatch):
    """A softcapped model (Gemma-2) takes the eager path; SnapKV must still score with its last ``window``
    queries only (it once received the whole chunk's probabilities there and scored with every query)."""
    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, sliding_window=8, layer_types=["full_attention"] * 2,
        max_position_embeddings=2048, attn_logit_softcapping=20.0, final_logit_softcapping=None,
        attn_implementation="eager",
    )
    model = AutoModelForCausalLM.from_config(config, dtype=DTYPE).to(DEVICE).eval()
    windows = []
    real = SnapKVLayer.observe

    def observe(self, probs, rows=None):
        windows.append(probs.shape[2])
        return real(self, probs, rows)

    monkeypatch.setattr(SnapKVLayer, "observe", observe)
    ids = torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.no_grad(), attnkit.apply(model, "snapkv", budget=16, window=4, kernel=3):
        model(input_ids=ids, **{cache_argument(model): attnkit.inference.new_cache(model)})
    assert windows == [4, 4]


def test_act_reweighs_in_row_blocks_as_in_one(model, monkeypatch):
    """ACT's two float32 passes over its heads (column sums, then the reweighing) in 8-row blocks give the logits
    of one block, on the same ragged batch; and the reweighing is active (the logits differ from ``full``'s)."""
    from attnkit.methods.read import act as act_module

    decode_ids = torch.randint(3, 256, (len(LENGTHS), 2), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    settings = {"tau": 0.05, "heads": "all"}
    with attnkit.apply(model, "full"):
        dense = stream_logits(model, prompts(), decode_ids)
    with attnkit.apply(model, "act", **settings):
        whole = stream_logits(model, prompts(), decode_ids)
    blocks = []
    real = act_module.row_blocks

    def counted(layer, query, key, mask):
        for rows, block_mask in real(layer, query, key, mask):
            blocks.append(rows.stop - rows.start)
            yield rows, block_mask

    monkeypatch.setattr(act_module, "row_blocks", counted)
    monkeypatch.setattr(attention, "MASKED_SCORE_BYTES", len(LENGTHS) * 4 * max(LENGTHS) * 4 * BLOCK_ROWS)
    with attnkit.apply(model, "act", **settings):
        blocked = stream_logits(model, prompts(), decode_ids)
    layers = model.config.get_text_config().num_hidden_layers
    assert len(blocks) == 2 * layers * -(-max(LENGTHS) // BLOCK_ROWS) and max(blocks) <= BLOCK_ROWS
    assert_close(blocked, whole, f"act: {BLOCK_ROWS}-row blocks vs one block")
    assert (whole.float() - dense.float()).abs().max() > 1e-3
