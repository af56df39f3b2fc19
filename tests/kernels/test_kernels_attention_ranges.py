"""Slot ranges in the sparse-attention core: ``ranges`` (lo, hi, offset) gives the same values and gradients
as the same rows listed as indices, on the torch core and through the dispatch under the Triton interpreter."""

from __future__ import annotations

import pytest
import torch

from v4train import kernels
from v4train.kernels import torch_cores


def _case(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    B, T, H, D, N = 2, 150, 2, 8, 40
    q = torch.randn(B, T, H, D, generator=gen)
    kv = torch.randn(B, T + N, D, generator=gen)
    sink = torch.randn(H, generator=gen)
    window = torch.arange(T).view(1, T, 1) - torch.arange(4).view(1, 1, 4)
    idx = torch.where(window >= 0, window, -1).expand(B, T, 4).to(torch.int32).contiguous()
    lo = torch.zeros(B, T, dtype=torch.long)
    lo[1, 70:] = 18  # a second document in row 1: its entries start at slot 18
    hi = torch.minimum((torch.arange(T) + 1) // 4, torch.tensor(N)).expand(B, T).clone()
    hi[1, 70:] = 18 + (torch.arange(70, T) - 70 + 1) // 4
    hi = torch.maximum(hi, lo)
    return q, kv, sink, idx, (lo, hi, T)


def _value_and_grads(fn, q, kv, sink):
    q, kv, sink = (t.clone().requires_grad_() for t in (q, kv, sink))
    out = fn(q, kv, sink)
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(3)))
    return out.detach(), q.grad, kv.grad, sink.grad


def test_ranges_equal_the_same_rows_as_indices():
    q, kv, sink, idx, ranges = _case()
    listed = torch.cat((idx, torch_cores.range_indices(*ranges)), dim=-1)
    assert listed.shape[-1] == 4 + int((ranges[1] - ranges[0]).max())
    got = _value_and_grads(lambda q, kv, s: torch_cores.sparse_attention(q, kv, s, idx, 0.3, ranges), q, kv, sink)
    want = _value_and_grads(lambda q, kv, s: kernels.reference.sparse_attention(q, kv, s, listed, 0.3), q, kv, sink)
    for name, a, b in zip(("out", "dq", "dkv", "dsink"), got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_ranges_refuse_a_wrong_shape():
    q, kv, sink, idx, (lo, hi, offset) = _case()
    with pytest.raises(ValueError, match="ranges lo"):
        torch_cores.sparse_attention(q, kv, sink, idx, 0.3, (lo[:, :-1], hi, offset))


def test_dispatch_lists_ranges_for_the_triton_kernel(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, kv, sink, idx, ranges = _case()
    q, idx, ranges = q[:, :40], idx[:, :40], (ranges[0][:, :40], ranges[1][:, :40], ranges[2])
    got = kernels.sparse_attention(q, kv, sink, idx, 0.3, ranges)
    want = torch_cores.sparse_attention(q, kv, sink, idx, 0.3, ranges)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
