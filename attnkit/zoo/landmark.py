"""Landmark attention: blocks gated by their landmark's weight in a grouped softmax; top-k block retrieval to decode.

Paper: Mohtashami, Jaggi, "Landmark Attention: Random-Access Infinite Context Length for Transformers"
(arXiv 2305.16300; code epfml/landmark-attention, lm_benchmark/models/landmark.py ``landmark_grouped_softmax`` and
lm_benchmark/models/caches/mem_cache.py for retrieval).
Idea: every block of b tokens ends with a landmark token whose key stands for the block. A query in block c runs
one softmax over {landmarks of the past blocks} + {tokens of its own block so far}; a past block's tokens share
their landmark's weight through a softmax over that block alone, so attending to a block is gated by its landmark
and the landmark scores can later pick blocks to retrieve.
Grouped softmax (training / parallel path, faithful to ``landmark_grouped_softmax``): for query t in block
c = t // b, with s_j = q_t . k_j / sqrt D and l_g = q_t . kL_g / sqrt D,
    [G_0..G_{c-1}, w_{cb}..w_t] = softmax([l_0..l_{c-1}, s_{cb}..s_t]),
    y_t = sum_{j = cb..t} w_j v_j + sum_{g < c} G_g sum_{j in block g} softmax_{i in block g}(s_i)_j v_j.
The landmarks carry no value (their probability only gates), and the current block's landmark is ignored, as in the
code.
Landmarks without a landmark token in the input: the mixer sees (B, T, d) and cannot insert tokens, so the
landmark of block g is formed inside the mixer from the block's last position: kL_g = W_K(x_end(g) + l), where l is
a learned landmark embedding (the paper's landmark token embedding, N(0, 0.02) like a GPT-2 token embedding). In the
paper the landmark is an extra token after the block whose hidden state, from the second layer on, has read its
block; here the block's last hidden state plays that part (in a stacked LM it has read the block through earlier
layers). A block's landmark exists once its last token is seen, and only complete blocks have one.
Decode (retrieval inference, ``top_k`` > 0): per query and head, the top_k past blocks by landmark score are
retrieved (the code's ``per_token_and_head`` selection) and the grouped softmax runs over the retrieved blocks'
landmarks + the current block; the other blocks are dropped. This differs from the training path whenever a query
has more than top_k past blocks; ``top_k = 0`` keeps every block (decode = parallel forward). The paper's inference
also keeps the current chunk (e.g. 250 tokens, several blocks) in full; here only the current block is local.
Shapes: x (B, T, d); q, k, v (B, H, T, D); landmark keys (B, H, T // b, D); decode cache k, v (B, H, n, D) and
landmark keys (B, H, n // b, D).
Defaults: block 50 and top_k 2 (the code's ``mem_freq`` 50 and the paper's evaluations with 2 retrieved blocks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from attnkit.zoo.base import State, check_int, masked_softmax
from attnkit.zoo.softmax import SoftmaxAttention, SoftmaxConfig


@dataclass
class LandmarkConfig(SoftmaxConfig):
    """Settings of landmark attention: heads, biases, the block size b and the blocks retrieved per query when
    decoding (0: all, as in training)."""

    mixer_name: ClassVar[str] = "landmark"

    block_size: int = 50
    top_k: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.mixer_name, "block_size", self.block_size, 1)
        check_int(self.mixer_name, "top_k", self.top_k, 0)


class LandmarkAttention(SoftmaxAttention):
    """Grouped-softmax landmark attention.

    ``state_size(seq_len)`` counts the whole KV cache and one landmark key per complete block:
    2 * d * seq_len + d * (seq_len // block_size). Retrieval reads top_k blocks but every block is kept.
    """

    name = "landmark"
    paper = "https://arxiv.org/abs/2305.16300"
    config_class = LandmarkConfig

    def __init__(self, d_model: int, config: LandmarkConfig | None = None) -> None:
        super().__init__(d_model, config)
        self.landmark = nn.Parameter(0.02 * torch.randn(d_model))

    def landmark_keys(self, x_end: torch.Tensor) -> torch.Tensor:
        """Blocks' last inputs (B, G, d) -> landmark keys (B, H, G, D)."""
        return self.proj.k(x_end + self.landmark).unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def grouped(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kl: torch.Tensor,
                positions: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """The grouped softmax.

        Parameters
        ----------
        q : (B, H, Tq, D) queries at ``positions`` (Tq,); k, v : (B, H, n, D) keys and values at 0 .. n - 1.
        kl : (B, H, G, D) landmark keys of blocks 0 .. G - 1.
        gate : bool, broadcastable to (B, H, Tq, G): the landmarks a query may use (its past blocks, retrieved).

        Returns
        -------
        (B, H, Tq, D).
        """
        b, n = self.config.block_size, k.shape[2]
        scale = self.head_dim ** -0.5
        key_pos = torch.arange(n, device=q.device)
        q_block, k_block = (positions // b)[:, None], (key_pos // b)[None, :]  # (Tq, 1), (1, n)
        current = (k_block == q_block) & (key_pos[None, :] <= positions[:, None])  # (Tq, n)
        s = (q @ k.transpose(-1, -2)) * scale  # (B, H, Tq, n)
        top = masked_softmax(torch.cat([(q @ kl.transpose(-1, -2)) * scale, s], dim=-1),
                             torch.cat([gate.expand(*s.shape[:-1], kl.shape[2]), current.expand_as(s)], dim=-1))
        landmark_w, current_w = top.split([kl.shape[2], n], dim=-1)  # (B, H, Tq, G), (B, H, Tq, n)
        # softmax inside every block (keys padded to whole blocks), then scaled by the block's landmark weight
        blocks = -(-n // b)
        padded = nn.functional.pad(s, (0, blocks * b - n)).unflatten(-1, (blocks, b))  # (B, H, Tq, blocks, b)
        real = (torch.arange(blocks * b, device=q.device) < n).view(blocks, b)
        within = masked_softmax(padded, real).flatten(-2)[..., :n]  # (B, H, Tq, n)
        block_w = nn.functional.pad(landmark_w, (0, blocks - kl.shape[2]))  # a block without landmark gets 0
        weights = current_w + within * block_w[..., key_pos // b]
        return weights @ v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = self.config.block_size, x.shape[1]
        q, k, v = self.proj.qkv(x)
        kl = self.landmark_keys(x[:, b - 1 :: b][:, : t // b])  # complete blocks only
        positions = torch.arange(t, device=x.device)
        past = torch.arange(t // b, device=x.device)[None, :] < (positions // b)[:, None]  # (T, G)
        return self.proj.out(self.grouped(q, k, v, kl, positions, past))

    def init_state(self, batch: int) -> State:
        state = super().init_state(batch)
        state["kl"] = state["k"].clone()  # (B, H, blocks seen, D)
        return state

    def step(self, x_t: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        b, top_k = self.config.block_size, self.config.top_k
        q, k, v = self.proj.qkv(x_t[:, None])  # (B, H, 1, D)
        state["k"] = torch.cat([state["k"], k], dim=2)
        state["v"] = torch.cat([state["v"], v], dim=2)
        t = state["k"].shape[2] - 1
        kl = state["kl"]  # the blocks before t's block, all complete
        gate = torch.ones(*kl.shape[:2], 1, kl.shape[2], dtype=torch.bool, device=x_t.device)
        if 0 < top_k < kl.shape[2]:  # retrieve the top_k blocks by landmark score, per head
            chosen = (q @ kl.transpose(-1, -2)).topk(top_k, dim=-1).indices  # (B, H, 1, top_k)
            gate = torch.zeros_like(gate).scatter_(-1, chosen, True)
        y = self.grouped(q, state["k"], state["v"], kl, torch.tensor([t], device=x_t.device), gate)
        if (t + 1) % b == 0:  # the block is complete: its landmark joins the cache
            state["kl"] = torch.cat([kl, self.landmark_keys(x_t[:, None])], dim=2)
        return self.proj.out(y)[:, 0], state

    def state_size(self, seq_len: int | None = None) -> int:
        n = self.need_seq_len(seq_len)
        return self.num_heads * self.head_dim * (2 * n + n // self.config.block_size)
