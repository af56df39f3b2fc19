"""The ``kernels`` dispatch: cheap import, reference on CPU without the interpreter, mode reloads.

Shape letters: B batch, T tokens, H heads, D head dim, N KV entries, K entries per token.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from v4train import kernels
from v4train.kernels import reference, torch_cores


def test_import_is_cheap_and_needs_no_triton():
    """Every rank imports ``kernels`` through the model: it must not import triton or touch a GPU driver."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import sys; from v4train import kernels; assert 'triton' not in sys.modules, 'triton imported'; "
            "assert callable(kernels.sparse_attention) and callable(kernels.indexer_topk); "
            "assert kernels.reference.sparse_attention")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


def test_cpu_without_interpreter_takes_the_torch_path(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    g = torch.Generator().manual_seed(0)
    q, kv = torch.randn(1, 6, 2, 8, generator=g), torch.randn(1, 9, 8, generator=g)
    sink, idx = torch.randn(2, generator=g), torch.randint(-1, 9, (1, 6, 5), generator=g, dtype=torch.int32)
    got = kernels.sparse_attention(q, kv, sink, idx, 0.3)
    assert torch.equal(got, torch_cores.sparse_attention(q, kv, sink, idx, 0.3))
    torch.testing.assert_close(got, reference.sparse_attention(q, kv, sink, idx, 0.3), rtol=1e-5, atol=1e-5)
    qi, ki = torch.randn(1, 12, 2, 8, generator=g), torch.randn(1, 3, 8, generator=g)
    w = torch.randn(1, 12, 2, generator=g)
    got, want = kernels.indexer_topk(qi, ki, w, 4, 2), reference.indexer_topk(qi, ki, w, 4, 2)
    assert torch.equal(got.indices, want.indices) and torch.equal(got.scores, want.scores)


def test_triton_modules_rebuild_for_the_requested_mode():
    """Interpreter build for the interpreter tests, JIT build for the sm_90 compile check, in one process."""
    assert kernels.triton_module("triton_attention", interpret=True).INTERPRETED
    assert not kernels.triton_module("triton_attention", interpret=False).INTERPRETED
    assert kernels.triton_module("triton_indexer", interpret=False) is kernels.triton_module(
        "triton_indexer", interpret=False)


@pytest.mark.parametrize("interpret", ["0", "1"])
def test_autocast_casts_both_operands_to_its_dtype(monkeypatch, interpret):
    """Under ``torch.autocast`` an fp32 q next to bf16 kv (autocast's rules on CUDA hand the core exactly that)
    is cast to the autocast dtype, and the kernel runs as it does on bf16 inputs outside autocast; the
    gradient reaches the fp32 q in fp32. Same for the indexer's q and k. Torch path and Triton interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    g = torch.Generator().manual_seed(0)
    q, kv = torch.randn(1, 6, 2, 16, generator=g), torch.randn(1, 9, 16, generator=g).bfloat16()
    sink, idx = torch.randn(2, generator=g), torch.randint(-1, 9, (1, 6, 5), generator=g, dtype=torch.int32)
    do = torch.randn(1, 6, 2, 16, generator=g).bfloat16()
    q16 = q.bfloat16().requires_grad_()
    want = kernels.sparse_attention(q16, kv, sink, idx, 0.3)
    want.backward(do)
    q32 = q.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = kernels.sparse_attention(q32, kv, sink, idx, 0.3)
    got.backward(do)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    assert q32.grad.dtype == torch.float32 and torch.equal(q32.grad, q16.grad.float())

    qi, ki = torch.randn(1, 12, 2, 16, generator=g), torch.randn(1, 3, 16, generator=g).bfloat16()
    w = torch.randn(1, 12, 2, generator=g)
    want = kernels.indexer_topk(qi.bfloat16(), ki, w, 4, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = kernels.indexer_topk(qi, ki, w, 4, 2)
    assert torch.equal(got.indices, want.indices) and torch.equal(got.scores, want.scores)
