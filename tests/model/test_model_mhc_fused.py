"""The fused mHC read and write equal the step-by-step autograd reference (values and every gradient), and the
Triton split kernels (gates + Sinkhorn, forward and backward) equal their torch twin under the interpreter."""

from __future__ import annotations

import pytest
import torch

from v4train import kernels
from v4train.kernels import torch_mhc
from v4train.model.mhc import HyperConnection, _FusedRead, hc_write, read_reference

N, D = 4, 24


def _connection(seed: int = 0) -> HyperConnection:
    hc = HyperConnection(D, N, sinkhorn_iters=20, hc_eps=1e-6, norm_eps=1e-6)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        hc.fn.copy_(torch.randn(hc.fn.shape, generator=gen) * 0.3)
        hc.base.copy_(torch.randn(hc.base.shape, generator=gen))
        hc.scale.copy_(torch.tensor([0.7, 1.3, 2.0]))
    return hc


def _value_and_grads(fn, hc, X, seed=4):
    hc.zero_grad(set_to_none=True)
    X = X.clone().requires_grad_()
    outs = fn(X)
    gen = torch.Generator().manual_seed(seed)
    sum((o * torch.randn(o.shape, generator=gen)).sum() for o in outs).backward()
    return [o.detach() for o in outs] + [X.grad] + [p.grad for p in (hc.fn, hc.scale, hc.base)]


def test_fused_read_equals_the_autograd_reference():
    hc = _connection()
    X = torch.randn(2, 7, N, D, generator=torch.Generator().manual_seed(1))
    got = _value_and_grads(hc.read, hc, X)
    want = _value_and_grads(lambda X: read_reference(X, hc.fn, hc.scale, hc.base, N, 20, 1e-6, 1e-6), hc, X)
    names = ("x_in", "post", "comb", "dX", "dfn", "dscale", "dbase")
    for name, a, b in zip(names, got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_write_gradients_equal_the_elementwise_formula():
    gen = torch.Generator().manual_seed(2)
    y, X = torch.randn(2, 5, D, generator=gen), torch.randn(2, 5, N, D, generator=gen)
    post, comb = torch.rand(2, 5, N, generator=gen), torch.rand(2, 5, N, N, generator=gen)
    g = torch.randn(2, 5, N, D, generator=gen)
    inputs = [t.clone().requires_grad_() for t in (y, X, post, comb)]
    (hc_write(*inputs) * g).sum().backward()
    ref = [t.clone().requires_grad_() for t in (y, X, post, comb)]
    out = ref[2].unsqueeze(-1) * ref[0].unsqueeze(2) + (ref[3].unsqueeze(-1) * ref[1].unsqueeze(3)).sum(2)
    (out * g).sum().backward()
    for a, b in zip(inputs, ref, strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def _split_case(T=37, seed=3):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(T, (2 + N) * N, generator=gen) * 2
    grads = [torch.randn(T, N, generator=gen), torch.randn(T, N, generator=gen), torch.randn(T, N, N, generator=gen)]
    return z, grads


def test_split_twin_backward_equals_autograd_through_its_steps():
    z, (dpre, dpost, dcomb) = _split_case()
    zd = z.double().requires_grad_()
    pre = torch.sigmoid(zd[:, :N]) + 1e-6
    post = 2 * torch.sigmoid(zd[:, N:2 * N])
    y = zd[:, 2 * N:].view(-1, N, N).softmax(-1) + 1e-6
    for dim in torch_mhc.normalisation_dims(20):
        y = y / (y.sum(dim=dim, keepdim=True) + 1e-6)
    ((pre * dpre).sum() + (post * dpost).sum() + (y * dcomb).sum()).backward()
    outs = torch_mhc.mhc_split_forward(z, N, 20, 1e-6)
    for a, b in zip(outs[:3], (pre, post, y), strict=True):
        torch.testing.assert_close(a, b.float().detach(), rtol=1e-5, atol=1e-6)
    dz = torch_mhc.mhc_split_backward(dpre, dpost, dcomb, *outs, 1e-6)
    torch.testing.assert_close(dz, zd.grad.float(), rtol=1e-4, atol=1e-5)


def test_triton_split_kernels_equal_the_torch_twin(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    z, (dpre, dpost, dcomb) = _split_case(T=21)
    got = kernels.mhc_split_forward(z, N, 20, 1e-6)
    want = torch_mhc.mhc_split_forward(z, N, 20, 1e-6)
    for name, a, b in zip(("pre", "post", "comb", "denoms"), got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    dz = kernels.mhc_split_backward(dpre, dpost, dcomb, *want, 1e-6)
    torch.testing.assert_close(dz, torch_mhc.mhc_split_backward(dpre, dpost, dcomb, *want, 1e-6),
                               rtol=1e-4, atol=1e-5)


def test_fused_read_and_write_pass_float64_gradcheck():
    d = 3  # few inputs: the numerical Jacobian costs one forward per input element
    gen = torch.Generator().manual_seed(5)
    X = torch.randn(1, 2, N, d, dtype=torch.float64, generator=gen).requires_grad_()
    fn = (torch.randn((2 + N) * N, N * d, dtype=torch.float64, generator=gen) * 0.3).requires_grad_()
    scale = torch.tensor([0.7, 1.3, 2.0], dtype=torch.float64, requires_grad=True)
    base = torch.randn((2 + N) * N, dtype=torch.float64, generator=gen).requires_grad_()
    torch.autograd.gradcheck(lambda X, fn, scale, base: _FusedRead.apply(X, fn, scale, base, N, 20, 1e-6, 1e-6),
                             (X, fn, scale, base), fast_mode=True)
    y = torch.randn(1, 2, d, dtype=torch.float64, generator=gen).requires_grad_()
    post = torch.rand(1, 2, N, dtype=torch.float64, generator=gen).requires_grad_()
    comb = torch.rand(1, 2, N, N, dtype=torch.float64, generator=gen).requires_grad_()
    torch.autograd.gradcheck(hc_write, (y, X, post, comb), fast_mode=True)


def test_split_twin_backward_equals_autograd_in_float64():
    z, grads = _split_case()
    zd = z.double().requires_grad_()
    y = zd[:, 2 * N:].view(-1, N, N).softmax(-1) + 1e-6
    for dim in torch_mhc.normalisation_dims(20):
        y = y / (y.sum(dim=dim, keepdim=True) + 1e-6)
    pre = torch.sigmoid(zd[:, :N]) + 1e-6
    post = 2 * torch.sigmoid(zd[:, N:2 * N])
    dpre, dpost, dcomb = (g.double() for g in grads)
    ((pre * dpre).sum() + (post * dpost).sum() + (y * dcomb).sum()).backward()
    outs = torch_mhc.mhc_split_forward(z.double(), N, 20, 1e-6)
    torch.testing.assert_close(outs[2], y.detach(), rtol=1e-12, atol=1e-14)
    dz = torch_mhc.mhc_split_backward(dpre, dpost, dcomb, *outs, 1e-6)
    torch.testing.assert_close(dz, zd.grad, rtol=1e-10, atol=1e-12)


def _reference_write(y_BSD, X_BSND, post_BSN, comb_BSNN):
    return post_BSN.unsqueeze(-1) * y_BSD.unsqueeze(2) + (comb_BSNN.unsqueeze(-1) * X_BSND.unsqueeze(3)).sum(2)


def test_a_fused_mhc_layer_has_the_reference_gradients_in_fp32():
    """Read, a sub-layer, write at the nano width: every gradient within 1e-6 (norm-wise relative) of the
    step-by-step autograd mHC."""
    d = 192
    hc = HyperConnection(d, N, sinkhorn_iters=20, hc_eps=1e-6, norm_eps=1e-6)
    gen = torch.Generator().manual_seed(8)
    with torch.no_grad():
        hc.fn.copy_(torch.randn(hc.fn.shape, generator=gen) * 0.02)
        hc.base.copy_(torch.randn(hc.base.shape, generator=gen))
        hc.scale.fill_(0.5)
    X = torch.randn(2, 16, N, d, generator=gen)
    w = torch.randn(d, d, generator=gen) / d ** 0.5
    g = torch.randn(2, 16, N, d, generator=gen)

    def layer(read, write):
        hc.zero_grad(set_to_none=True)
        Xg = X.clone().requires_grad_()
        x, post, comb = read(Xg)
        (write(torch.tanh(x @ w), Xg, post, comb) * g).sum().backward()
        return [Xg.grad] + [p.grad for p in (hc.fn, hc.scale, hc.base)]

    fused = layer(hc.read, hc_write)
    reference = layer(lambda X: read_reference(X, hc.fn, hc.scale, hc.base, N, 20, 1e-6, 1e-6), _reference_write)
    for name, a, b in zip(("dX", "dfn", "dscale", "dbase"), fused, reference, strict=True):
        error = (a - b).norm() / b.norm()
        assert error <= 1e-6, f"{name}: relative gradient difference {error:.2e}"
