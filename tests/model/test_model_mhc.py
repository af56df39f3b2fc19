"""mHC: Sinkhorn as OC implements it, the transpose convention of the write, read and head (spec 4, 0.1 item 4)."""

import math

import pytest
import torch

from v4train.model.mhc import HyperConnection, HyperHead, hc_write, sinkhorn, split_mixes


def _reference_sinkhorn(logits, iters, eps):
    """The algorithm written out on Python floats (float64), one matrix at a time."""
    n = len(logits)
    m = []
    for row in logits:
        top = max(row)
        exps = [math.exp(v - top) for v in row]
        total = sum(exps)
        m.append([e / total + eps for e in exps])

    def normalise_columns(m):
        sums = [sum(m[j][k] for j in range(n)) + eps for k in range(n)]
        return [[m[j][k] / sums[k] for k in range(n)] for j in range(n)]

    m = normalise_columns(m)
    for _ in range(iters - 1):
        m = [[v / (sum(row) + eps) for v in row] for row in m]
        m = normalise_columns(m)
    return m


@pytest.mark.parametrize("std", [1.0, 3.0])
def test_sinkhorn_columns_sum_to_one_and_match_reference(std):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 4, 4, generator=gen) * std
    comb = sinkhorn(logits, iters=20, eps=1e-6)
    assert (comb >= 0).all()
    torch.testing.assert_close(comb.sum(dim=-2), torch.ones(64, 4), rtol=0, atol=1e-5)
    for i in range(0, 64, 9):
        expected = torch.tensor(_reference_sinkhorn(logits[i].double().tolist(), 20, 1e-6), dtype=torch.float32)
        torch.testing.assert_close(comb[i], expected, rtol=0, atol=1e-6)


def test_sinkhorn_gradients_are_finite():
    logits = (torch.randn(8, 4, 4, generator=torch.Generator().manual_seed(2)) * 3).requires_grad_()
    (sinkhorn(logits, 20, 1e-6) * torch.arange(16.0).view(4, 4)).sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_write_uses_the_transpose_convention():
    # X'_k = post_k * y + sum_j comb[j, k] X_j with hand-made numbers (N = 2, D = 1)
    X = torch.tensor([1.0, 10.0]).view(1, 1, 2, 1)
    comb = torch.tensor([[0.1, 0.9], [0.7, 0.3]]).view(1, 1, 2, 2)
    post = torch.tensor([1.0, 2.0]).view(1, 1, 2)
    y = torch.tensor([5.0]).view(1, 1, 1)
    out = hc_write(y, X, post, comb).flatten()
    # k=0: 1*5 + 0.1*1 + 0.7*10 ; k=1: 2*5 + 0.9*1 + 0.3*10
    torch.testing.assert_close(out, torch.tensor([12.1, 13.9]))


def test_split_mixes_layout_pre_post_res():
    n = 2
    mixes = torch.tensor([0.0, 1.0, 2.0, -1.0, 3.0, 0.0, 0.0, 3.0])  # pre(2), post(2), res(4) row-major
    scale = torch.tensor([1.0, 1.0, 1.0])
    pre, post, comb = split_mixes(mixes, scale, torch.zeros(8), n, iters=20, eps=1e-6)
    torch.testing.assert_close(pre, torch.sigmoid(torch.tensor([0.0, 1.0])) + 1e-6)
    torch.testing.assert_close(post, 2 * torch.sigmoid(torch.tensor([2.0, -1.0])))
    assert comb[0, 0] > 0.9 and comb[1, 1] > 0.9  # large logits on comb[0,0] and comb[1,1]


def test_read_and_head_by_hand():
    hc = HyperConnection(dim=3, n=2, sinkhorn_iters=20, hc_eps=1e-6, norm_eps=1e-6)
    with torch.no_grad():
        hc.base.copy_(torch.tensor([0.0, math.log(3.0), 0.5, 0.0, 4.0, 0.0, 0.0, 4.0]))
    X = torch.arange(12.0).view(2, 1, 2, 3)
    x, post, comb = hc.read(X)  # fn = 0: mixes vanish, only the biases act
    expected = 0.5 * X[:, :, 0] + 0.75 * X[:, :, 1] + 1e-6 * X.sum(2)
    torch.testing.assert_close(x, expected)
    torch.testing.assert_close(post[0, 0], 2 * torch.sigmoid(torch.tensor([0.5, 0.0])))
    head = HyperHead(dim=3, n=2, hc_eps=1e-6, norm_eps=1e-6)
    with torch.no_grad():
        head.base.copy_(torch.tensor([0.0, math.log(3.0)]))
    torch.testing.assert_close(head(X), expected)


def test_init_reads_the_mean_and_mixes_near_identity():
    hc = HyperConnection(dim=8, n=4, sinkhorn_iters=20, hc_eps=1e-6, norm_eps=1e-6)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in hc.named_parameters():
            hc.init_parameter(name, p, gen, 0.02)
    assert hc.scale.tolist() == pytest.approx([0.01] * 3)
    X = torch.randn(2, 5, 4, 8, generator=gen)
    x, post, comb = hc.read(X)
    torch.testing.assert_close(x, X.mean(2), rtol=0, atol=2e-3 * X.abs().max().item())
    torch.testing.assert_close(post, torch.ones_like(post), rtol=0, atol=1e-2)
    assert (comb.diagonal(dim1=-2, dim2=-1) > 0.9).all()


def test_sinkhorn_closed_form_backward_equals_autograd_of_the_steps():
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(5, 4, 4, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: sinkhorn(x, 20, 1e-6), (logits,))

    def plain(x):  # the steps written with autograd-tracked ops
        c = x.softmax(-1) + 1e-6
        c = c / (c.sum(-2, keepdim=True) + 1e-6)
        for _ in range(19):
            c = c / (c.sum(-1, keepdim=True) + 1e-6)
            c = c / (c.sum(-2, keepdim=True) + 1e-6)
        return c

    g = torch.randn(5, 4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    (ours,) = torch.autograd.grad(sinkhorn(logits, 20, 1e-6), logits, g)
    (ref,) = torch.autograd.grad(plain(logits), logits, g)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
