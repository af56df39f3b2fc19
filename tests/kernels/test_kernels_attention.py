"""Sparse attention: the Triton kernels under the interpreter against ``kernels.reference``.

``TRITON_INTERPRET=1`` is set by a module-scoped fixture rather than at import: the whole suite runs
in one process, and a variable set at collection time would send every later model test through the
(hundreds of times slower) interpreter. ``kernels`` reads the variable on each call and reloads its
Triton modules when they were built in the other mode, so the setting is honoured even though other
test modules imported ``kernels`` first.

Tolerances: fp32 within 1e-5, bf16 inputs within 2e-2, relative to max(1, max |reference|).

Shape letters: B batch, T tokens, H heads, D head dim, N KV entries, K entries per token.
"""

from __future__ import annotations

import pytest
import torch

from v4train import kernels
from v4train.kernels import reference

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module", autouse=True)
def interpreter():
    """Route ``kernels`` to the Triton kernels on CPU tensors for this module only."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield


def _inputs(B, T, H, D, N, K, dtype, seed, p_pad=0.2):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g).to(dtype)
    kv = torch.randn(B, N, D, generator=g).to(dtype)
    sink = torch.randn(H, generator=g)
    idx = torch.randint(0, N, (B, T, K), generator=g, dtype=torch.int32)
    idx = torch.where(torch.rand(B, T, K, generator=g) < p_pad, torch.full_like(idx, -1), idx)
    return q, kv, sink, idx


def _check(q, kv, sink, idx, grads=True, seed=0):
    """Forward (and q/kv/sink gradients) of the dispatch vs the reference, within TOL[dtype]."""
    scale = q.shape[-1] ** -0.5
    leaves = [t.clone().requires_grad_(True) for t in (q, kv, sink)]
    refs = [t.clone().requires_grad_(True) for t in (q, kv, sink)]
    out = kernels.sparse_attention(leaves[0], leaves[1], leaves[2], idx, scale)
    ref = reference.sparse_attention(refs[0], refs[1], refs[2], idx, scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    _close(out, ref, TOL[q.dtype], "out")
    if grads:
        g = torch.Generator().manual_seed(seed + 1)
        do = torch.randn(out.shape, generator=g).to(out.dtype)
        got = torch.autograd.grad(out, leaves, do)
        want = torch.autograd.grad(ref, refs, do)
        for name, a, b in zip(("dq", "dkv", "dsink"), got, want):
            assert a.dtype == b.dtype
            _close(a, b, TOL[q.dtype], name)
    return out


def _close(a, b, tol, name):
    err = (a.float() - b.float()).abs().max().item()
    bound = tol * max(1.0, b.float().abs().max().item())
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"


# T is never a multiple of 16; K straddles BLOCK_K (32 for fp32 / 64 for bf16 at D <= 128)
@pytest.mark.parametrize("B,T,H,D,N,K", [
    (1, 19, 2, 32, 40, 24),     # one partial block of entries
    (2, 13, 3, 48, 70, 71),     # D not a power of two, K > BLOCK_K with a ragged tail, odd H
    (1, 7, 20, 16, 30, 40),     # H = 20: one block of 32 heads, 12 of them masked
    (1, 130, 2, 32, 200, 40),   # longer T
])
def test_fp32_matches_reference(B, T, H, D, N, K):
    _check(*_inputs(B, T, H, D, N, K, torch.float32, seed=B + T + H))


@pytest.mark.parametrize("B,T,H,D,N,K", [
    (2, 11, 4, 64, 50, 80),
    (1, 9, 2, 128, 33, 20),
    (1, 5, 16, 512, 300, 144),  # a V4-Flash TP shard: 16 heads of 512, window 128 + top-16
])
def test_bf16_matches_reference(B, T, H, D, N, K):
    _check(*_inputs(B, T, H, D, N, K, torch.bfloat16, seed=T))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_dim_512(dtype):
    """V4's head dim (the largest supported): one head block of 16 with masked heads."""
    _check(*_inputs(1, 3, 2, 512, 24, 20, dtype, seed=5))


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_random_seeds(seed):
    g = torch.Generator().manual_seed(seed)
    T, N, K = (int(x) for x in torch.randint(5, 40, (3,), generator=g))
    _check(*_inputs(1, T, 2, 32, N, K, torch.float32, seed=seed, p_pad=0.5))


def test_padding_rows_give_zero_and_no_gradient():
    """Rows whose entries are all -1 (or out of range) return 0 and contribute no gradient."""
    q, kv, sink, idx = _inputs(2, 9, 2, 32, 20, 12, torch.float32, seed=3)
    idx[0, :4] = -1
    idx[1, 5] = 20                      # == N: out of range counts as none
    idx[1, 6, :] = -7
    out = _check(q, kv, sink, idx)
    assert out[0, :4].abs().max() == 0 and out[1, 5:7].abs().max() == 0
    qg = q.clone().requires_grad_(True)
    sg = sink.clone().requires_grad_(True)
    kernels.sparse_attention(qg, kv, sg, idx, 32 ** -0.5)[0, :4].sum().backward()
    assert qg.grad.abs().max() == 0 and sg.grad.abs().max() == 0


def test_window_plus_compressed_layout():
    """The model's layout (spec 3.6): window entries t-W+1..t, then compressed entries offset by T,
    visible iff (s+1)*ratio <= t+1; duplicates of nothing, -1 elsewhere."""
    B, T, H, D, W, ratio = 1, 23, 2, 32, 8, 4
    NC = T // ratio
    g = torch.Generator().manual_seed(7)
    q = torch.randn(B, T, H, D, generator=g)
    kv = torch.randn(B, T + NC, D, generator=g)
    sink = torch.zeros(H)
    t = torch.arange(T)[:, None]
    win = t - (W - 1) + torch.arange(W)[None, :]
    win = torch.where(win >= 0, win, -1)
    s = torch.arange(NC)[None, :]
    comp = torch.where((s + 1) * ratio <= t + 1, s + T, -1)
    idx = torch.cat((win, comp), dim=1).to(torch.int32).expand(B, T, W + NC).contiguous()
    _check(q, kv, sink, idx)


def test_wrong_sink_is_detected():
    """Negative control: the comparison separates the sink-in-denominator semantics from no sink."""
    q, kv, sink, idx = _inputs(1, 9, 2, 32, 20, 12, torch.float32, seed=9)
    out = kernels.sparse_attention(q, kv, sink, idx, 32 ** -0.5)
    no_sink = reference.sparse_attention(q, kv, torch.full_like(sink, -1e4), idx, 32 ** -0.5)
    assert (out - no_sink).abs().max() > 1e-2


def test_dispatch_uses_interpreter_here():
    """Under this module's fixture the dispatch runs the interpreter build of the Triton module."""
    assert kernels.interpret_requested()
    assert kernels.triton_module("triton_attention").INTERPRETED


def test_triton_path_rejects_what_it_cannot_run():
    q, kv, sink, idx = _inputs(1, 3, 2, 8, 5, 4, torch.float64, seed=0)
    with pytest.raises(ValueError, match="dtype"):
        kernels.sparse_attention(q, kv, sink, idx, 1.0)
    q, kv, sink, idx = _inputs(1, 2, 2, 520, 5, 4, torch.float32, seed=0)
    with pytest.raises(ValueError, match="head dim"):
        kernels.sparse_attention(q, kv, sink, idx, 1.0)


# ---------------------------------------------------------------- the reference itself (plain torch)

def test_reference_matches_a_per_row_loop():
    """R eq. 27 with the sink, written out per (b, t, h) in fp64."""
    q, kv, sink, idx = _inputs(2, 5, 3, 8, 9, 6, torch.float64, seed=2, p_pad=0.3)
    idx[1, 2] = -1
    out = reference.sparse_attention(q, kv, sink.double(), idx, 0.4)
    for b in range(2):
        for t in range(5):
            rows = [int(j) for j in idx[b, t] if j >= 0]
            for h in range(3):
                z = torch.stack([0.4 * q[b, t, h] @ kv[b, j] for j in rows]) if rows else torch.zeros(0).double()
                den = z.exp().sum() + sink[h].double().exp()
                want = sum((z[i].exp() / den) * kv[b, j] for i, j in enumerate(rows)) if rows else torch.zeros(8)
                assert torch.allclose(out[b, t, h], want.double(), atol=1e-12)


def test_reference_gradcheck_fp64():
    q, kv, sink, idx = _inputs(1, 4, 2, 6, 7, 5, torch.float64, seed=4)
    leaves = [t.clone().requires_grad_(True) for t in (q, kv, sink.double())]
    assert torch.autograd.gradcheck(lambda a, b, c: reference.sparse_attention(a, b, c, idx, 0.5), leaves)


@pytest.mark.parametrize("block_h,heads_fastest", [(16, False), (16, True), (32, True)])
def test_launch_configs_match_reference(block_h, heads_fastest):
    """Every launch order and head-block size the tuning sweep compares computes the same attention:
    H = 40 heads span several head blocks with a ragged last one, T = 5 tokens several programs each."""
    from v4train.kernels import triton_module

    attn = triton_module("triton_attention")
    q, kv, sink, idx = _inputs(1, 5, 40, 32, 24, 12, torch.float32, seed=7)
    cfg = attn.AttentionConfig(BLOCK_H=block_h, BLOCK_K=16, BLOCK_D=32, num_warps=4, num_stages=1,
                               heads_fastest=heads_fastest)
    leaves = [t.clone().requires_grad_(True) for t in (q, kv, sink)]
    refs = [t.clone().requires_grad_(True) for t in (q, kv, sink)]
    out = attn.sparse_attention(*leaves, idx, 32 ** -0.5, fwd_config=cfg, bwd_config=cfg)
    ref = reference.sparse_attention(*refs, idx, 32 ** -0.5)
    _close(out, ref, TOL[torch.float32], "out")
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(8))
    for name, a, b in zip(("dq", "dkv", "dsink"), torch.autograd.grad(out, leaves, do),
                          torch.autograd.grad(ref, refs, do)):
        _close(a, b, TOL[torch.float32], name)
