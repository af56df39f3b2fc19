"""parallel.optim (AdamW groups, global-norm clipping) and the single-process paths of
parallel.data_parallel, against torch's own implementations."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from v4train.parallel.data_parallel import all_reduce_gradients
from v4train.parallel.optim import build_optimizer, clip_grad_norm_


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.attn_norm = nn.LayerNorm(3)
        self.proj = nn.Linear(3, 3)
        self.sink = nn.Parameter(torch.zeros(2))
        self.frozen = nn.Parameter(torch.zeros(3, 3), requires_grad=False)
        self.mix = nn.Module()
        self.mix.hc_norm = nn.Module()
        self.mix.hc_norm.scale = nn.Parameter(torch.ones(2, 3))  # 2-D, but a norm's parameter


def test_build_optimizer_groups_and_v4_adamw_settings():
    model = _Tiny()
    optimizer = build_optimizer(model.named_parameters(), lr=3e-4, weight_decay=0.1, eps=1e-20)
    assert isinstance(optimizer, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    got = {
        g["name"]: ([names[id(p)] for p in g["params"]], g["weight_decay"])
        for g in optimizer.param_groups
    }
    assert got == {
        "decay": (["embed.weight", "proj.weight"], 0.1),
        "no_decay": (
            ["sink", "attn_norm.weight", "attn_norm.bias", "proj.bias", "mix.hc_norm.scale"], 0.0
        ),
    }
    for group in optimizer.param_groups:
        assert (group["lr"], group["betas"], group["eps"]) == (3e-4, (0.9, 0.95), 1e-20)


def test_build_optimizer_refuses_no_trainable_parameters():
    frozen = nn.Parameter(torch.zeros(2), requires_grad=False)
    with pytest.raises(ValueError, match="named_params holds no parameter that requires grad"):
        build_optimizer([("frozen", frozen)], lr=1e-3, weight_decay=0.1, eps=1e-8)


def _params_with_grads(scale: float) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.zeros(shape)) for shape in ((4, 3), (3,), (2, 2, 2))]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * scale
    return params


@pytest.mark.parametrize("max_norm", [0.5, 100.0])
def test_clip_grad_norm_matches_torch(max_norm):
    ours, theirs = _params_with_grads(1.0), _params_with_grads(1.0)
    ours.append(nn.Parameter(torch.zeros(3)))  # grad None: counts as zero, stays None
    norm = clip_grad_norm_(ours, max_norm, group=None)
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm).item()
    assert norm == pytest.approx(expected, rel=1e-6)
    assert (norm > max_norm) == (max_norm == 0.5)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)
    assert ours[-1].grad is None


def test_clip_grad_norm_measures_only_when_max_norm_is_not_positive():
    params = _params_with_grads(10.0)
    before = [p.grad.clone() for p in params]
    norm = clip_grad_norm_(params, 0.0, group=None)
    assert norm == pytest.approx(math.sqrt(sum(g.square().sum().item() for g in before)), rel=1e-6)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, before))


def test_clip_grad_norm_leaves_non_finite_gradients_for_the_caller():
    params = _params_with_grads(1.0)
    params[1].grad[0] = float("inf")
    before = [p.grad.clone() for p in params]
    assert clip_grad_norm_(params, 1.0, group=None) == math.inf
    assert all(torch.equal(p.grad, g) for p, g in zip(params, before))


def test_all_reduce_gradients_single_process_is_a_no_op():
    params = _params_with_grads(1.0) + [nn.Parameter(torch.zeros(2))]
    before = [p.grad.clone() for p in params[:-1]]
    all_reduce_gradients(params, None)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, before))
    assert params[-1].grad is None
    with pytest.raises(ValueError, match="bucket_numel=0 must be >= 1"):
        all_reduce_gradients(params, None, bucket_numel=0)
