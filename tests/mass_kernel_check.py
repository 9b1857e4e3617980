"""DHSA's mass kernels (attnkit/kernels/triton_mass.py) against the torch sums, with left padding, a chunked forward
(q < n) and grouped KV heads. Run by tests/test_sparse_prefill.py: in-process on CUDA, and on the CPU in a
subprocess under the Triton interpreter (TRITON_INTERPRET=1 must be set before triton is imported)."""

from __future__ import annotations

import torch

from attnkit.kernels.sparse_prefill import causal_visibility
from attnkit.kernels.triton_mass import far_mass, row_lse
from attnkit.methods.read.dhsa import _mass_torch, mass_ratios
from attnkit.reference import attention_probs


def check(device: str, dtype: torch.dtype = torch.float32) -> None:
    gen = torch.Generator().manual_seed(0)
    b, h, hkv, n, w = 2, 4, 2, 150, 4
    for q, d in ((150, 16), (90, 32), (40, 128), (40, 256)):  # 128: Llama-3.1-8B, 256: Gemma-3
        query = (torch.randn(b, h, q, d, generator=gen) * 1.5).to(device, dtype)
        key = (torch.randn(b, hkv, n, d, generator=gen) * 1.5).to(device, dtype)
        if q != n:  # queries as attention hands them over: a (B, q, H, D) tensor seen transposed
            query = query.transpose(1, 2).contiguous().transpose(1, 2)
        kpos = torch.arange(n).repeat(b, 1)
        kpos[1] -= 7  # row 1: seven pad slots on the left
        kpos = kpos.where(kpos >= 0, torch.tensor(-1)).to(device)
        qpos = kpos[:, n - q :]
        lse = row_lse(query, key, qpos, kpos, 0.3)
        _, want_lse = attention_probs(query, key, causal_visibility(qpos, kpos), 0.3)
        seen = torch.isfinite(want_lse)
        assert torch.equal(torch.isfinite(lse), seen), "rows that see nothing"
        assert torch.allclose(lse[seen], want_lse[seen], atol=1e-4), (lse[seen] - want_lse[seen]).abs().max()
        far = far_mass(query, key, qpos, kpos, 0.3, 2 * w, lse).mean(1).double()
        want_far, _ = _mass_torch(query, key, qpos, kpos, 0.3, w, 64)
        assert torch.allclose(far, want_far, rtol=1e-4, atol=1e-6), (far - want_far).abs().max()
        got = mass_ratios(query, key, None, qpos, kpos, 0.3, w=w, kernel="triton")
        want = mass_ratios(query, key, None, qpos, kpos, 0.3, w=w, kernel="torch")
        assert torch.allclose(got, want, rtol=1e-3), (got - want).abs().max()
        assert (want > 1.0001).any()  # the ratios are not trivially 1
    bad = torch.arange(n).repeat(b, 1).to(device)
    bad[0, 10] = 3  # a position that goes back
    try:
        far_mass(query, key, bad[:, n - q :], bad, 0.3, 2 * w)
    except ValueError as err:
        assert "increase with the slot" in str(err)
    else:
        raise AssertionError("far_mass accepted positions out of order")


def _interpreter_index_fix() -> None:
    """triton 3.6's interpreter turns a scalar into an index with ``int()`` of a 1-element array, which numpy >= 2.4
    refuses (every loop with a runtime bound fails); take the element instead."""
    import numpy as np
    import triton.runtime.interpreter as ti

    if tuple(int(x) for x in np.__version__.split(".")[:2]) < (2, 4) or not hasattr(ti, "_patch_lang_tensor"):
        return
    patch = ti._patch_lang_tensor

    def fixed(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    ti._patch_lang_tensor = fixed


if __name__ == "__main__":
    _interpreter_index_fix()
    check("cpu")
    print("ok")
