"""MoE: routing formula and bias, hash tables, clamped SwiGLU, dropless experts, balance loss, bias update."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from v4train.model.config import ModelConfig
from v4train.model.moe import MoE, Router, SwiGLU, build_hash_table, sequence_balance_loss, update_expert_bias


def _cfg(**overrides):
    base = dict(dim=16, moe_inter_dim=8, n_routed_experts=6, n_activated_experts=2, vocab_size=50,
                n_hash_layers=1, route_scale=1.5, balance_loss_weight=0.01, bias_update_speed=0.001)
    return ModelConfig.preset("nano", **{**base, **overrides})


def _randomise(module, seed=0, std=0.5):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module


def test_learned_routing_formula_and_bias_changes_selection_only():
    router = _randomise(Router(_cfg(), layer_idx=1))
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(1))
    tokens = torch.zeros(32, dtype=torch.long)
    scores = F.softplus(x @ router.weight.t()).sqrt()
    out = router(x, tokens)
    torch.testing.assert_close(out.scores, scores)
    assert torch.equal(out.indices, scores.topk(2, dim=-1).indices)
    with torch.no_grad():
        router.bias[5] = 100.0
    biased = router(x, tokens)
    assert (biased.indices == 5).any(dim=-1).all() and not (out.indices == 5).any(dim=-1).all()
    # weights: the unbiased scores at the chosen experts, normalised, times route_scale
    chosen = scores.gather(1, biased.indices)
    torch.testing.assert_close(biased.weights, chosen / chosen.sum(-1, keepdim=True) * 1.5)
    torch.testing.assert_close(biased.weights.sum(-1), torch.full((32,), 1.5))


def test_hash_tables_are_deterministic_distinct_and_per_layer():
    table = build_hash_table(50, 6, 2, layer_idx=0)
    assert table.shape == (50, 2) and table.dtype == torch.int32
    assert torch.equal(table, build_hash_table(50, 6, 2, layer_idx=0))
    assert not torch.equal(table, build_hash_table(50, 6, 2, layer_idx=1))
    assert (table[:, 0] != table[:, 1]).all() and table.min() >= 0 and table.max() < 6
    big = build_hash_table(20000, 8, 3, layer_idx=0)  # spans several generation chunks
    assert (big.sort(-1).values.diff(dim=-1) > 0).all()
    counts = torch.bincount(big.flatten().long(), minlength=8).float()
    assert counts.max() / counts.min() < 1.1


def test_hash_routing_ignores_activations_and_has_no_bias():
    cfg = _cfg()
    router = _randomise(Router(cfg, layer_idx=0))
    assert router.is_hash and not hasattr(router, "bias")
    assert torch.equal(router.tid2eid, Router(cfg, layer_idx=0).tid2eid)
    tokens = torch.tensor([3, 7, 3, 49])
    gen = torch.Generator().manual_seed(2)
    a = router(torch.randn(4, 16, generator=gen), tokens)
    b = router(torch.randn(4, 16, generator=gen), tokens)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.indices, router.tid2eid[tokens].long())
    # the gate is still trained through the weights
    chosen = a.scores.gather(1, a.indices)
    torch.testing.assert_close(a.weights, chosen / chosen.sum(-1, keepdim=True) * 1.5)


def test_swiglu_clamp_zeroes_gradients_where_clamped():
    ffn = SwiGLU(dim=4, inter_dim=4, limit=1.0)
    with torch.no_grad():
        for lin in (ffn.w1, ffn.w2, ffn.w3):
            lin.weight.copy_(torch.eye(4))
    x = torch.tensor([[2.0, 0.5, -3.0, 1.5]], requires_grad=True)
    y = ffn(x)
    # gate clamped above at 1, up clamped to [-1, 1]
    torch.testing.assert_close(y, torch.tensor([[F.silu(torch.tensor(1.0)), F.silu(torch.tensor(0.5)) * 0.5,
                                                 -F.silu(torch.tensor(-3.0)), F.silu(torch.tensor(1.0))]]))
    y.sum().backward()
    g = x.grad[0]
    assert g[0] == 0 and g[3] == 0  # both branches clamped
    s = torch.sigmoid(torch.tensor(-3.0))
    torch.testing.assert_close(g[2], -(s * (1 + -3.0 * (1 - s))))  # only up clamped: d silu(x)/dx * (-1)
    assert g[1] > 0


def test_dropless_experts_match_a_per_token_reference():
    moe = _randomise(MoE(_cfg(), layer_idx=1)).eval()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 16, generator=gen)
    tokens = torch.randint(0, 50, (2, 5), generator=gen)
    y = moe(x, tokens)
    route = moe.gate(x.view(10, 16), tokens.view(10))
    expected = torch.stack([
        sum(route.weights[t, k]
            * _expert_no_weight(moe.experts.experts[str(int(route.indices[t, k]))], x.view(10, 16)[t])
            for k in range(2)) + moe.shared_experts(x.view(10, 16)[t:t + 1])[0]
        for t in range(10)
    ])
    torch.testing.assert_close(y.view(10, 16), expected, rtol=1e-5, atol=1e-6)


def _expert_no_weight(expert, x_D):
    return expert(x_D.unsqueeze(0))[0]


def test_balance_loss_values():
    # uniform scores and uniform selection give exactly 1
    scores = torch.ones(1, 4, 4)
    indices = torch.tensor([[[0, 1], [2, 3], [0, 1], [2, 3]]])
    torch.testing.assert_close(sequence_balance_loss(scores, indices), torch.tensor(1.0))
    # everything on expert 0/1 with scores concentrated there: f = [2, 2, 0, 0], P = [0.4, 0.4, 0.1, 0.1]
    scores = torch.tensor([4.0, 4.0, 1.0, 1.0]).expand(1, 4, 4)
    indices = torch.tensor([[0, 1]]).expand(1, 4, 2)
    torch.testing.assert_close(sequence_balance_loss(scores, indices), torch.tensor(1.6))


def test_balance_loss_gradient_is_injected_with_the_scale():
    cfg = _cfg()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 6, 16, generator=gen)
    tokens = torch.randint(0, 50, (2, 6), generator=gen)
    moe = _randomise(MoE(cfg, layer_idx=1)).train()
    moe(x, tokens, aux_loss_scale=50.0).sum().backward()
    injected = moe.gate.weight.grad.clone()
    moe.zero_grad()
    moe.eval()  # no injection: add the loss by hand
    y = moe(x, tokens)
    route = moe.gate(x.view(12, 16), tokens.view(12))
    aux = sequence_balance_loss(route.scores.view(2, 6, -1), route.indices.view(2, 6, -1))
    y.sum().backward(retain_graph=True)
    without_aux = moe.gate.weight.grad.clone()
    (50.0 * cfg.balance_loss_weight * aux).backward()
    torch.testing.assert_close(injected, moe.gate.weight.grad, rtol=1e-5, atol=1e-6)
    assert (injected - without_aux).abs().max() > 1e-3
    assert len(moe.aux_log) == 1
    torch.testing.assert_close(moe.aux_log[0], cfg.balance_loss_weight * aux.detach())


def test_counts_accumulate_in_training_and_bias_follows_the_sign_rule():
    cfg = _cfg()
    stage = nn.ModuleDict({"0": MoE(cfg, 0), "1": MoE(cfg, 1)})
    _randomise(stage)
    gen = torch.Generator().manual_seed(5)
    x, tokens = torch.randn(2, 6, 16, generator=gen), torch.randint(0, 50, (2, 6), generator=gen)
    stage["1"].train()(x, tokens)
    stage["1"].train()(x, tokens)
    assert int(stage["1"].gate.expert_counts.sum()) == 2 * 12 * 2
    with torch.no_grad():
        stage["1"].eval()(x, tokens)  # eval forwards do not count
    assert int(stage["1"].gate.expert_counts.sum()) == 48
    with torch.no_grad():
        stage["1"].gate.expert_counts.copy_(torch.tensor([10, 0, 5, 5, 4, 6]))
        stage["1"].gate.bias.copy_(torch.tensor([0.5, 0.0, 0.0, 0.0, 0.0, 0.0]))
    metrics = update_expert_bias(stage, group=None)
    torch.testing.assert_close(stage["1"].gate.bias, torch.tensor([0.499, 0.001, 0.0, 0.0, 0.001, -0.001]))
    assert int(stage["1"].gate.expert_counts.abs().sum()) == 0
    assert metrics == {"moe_max_violation": 1.0}  # max 10 over mean 5
    assert update_expert_bias(stage, group=None) == {}  # nothing counted since


def test_an_expert_without_tokens_still_gets_a_zero_gradient():
    moe = _randomise(MoE(_cfg(), layer_idx=1)).train()
    with torch.no_grad():
        moe.gate.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, -1e3, -1e3]))  # experts 4, 5 never chosen
    x = torch.randn(1, 4, 16, generator=torch.Generator().manual_seed(6))
    moe(x, torch.zeros(1, 4, dtype=torch.long)).sum().backward()
    assert torch.equal(moe.experts.experts["5"].w1.weight.grad, torch.zeros(8, 16))
    assert moe.experts.experts["0"].w1.weight.grad.abs().sum() + moe.experts.experts["1"].w1.weight.grad.abs().sum() > 0


def test_routing_statistics_for_logging():
    from v4train.model.moe import pop_moe_stats

    cfg = _cfg(balance_loss_weight=0.0)
    stage = nn.ModuleDict({"0": MoE(cfg, 0), "1": MoE(cfg, 1)})
    _randomise(stage)
    gen = torch.Generator().manual_seed(7)
    x, tokens = torch.randn(1, 3, 16, generator=gen), torch.randint(0, 50, (1, 3), generator=gen)
    assert pop_moe_stats(stage) == {}
    with torch.no_grad():
        stage["1"].gate.bias.copy_(torch.tensor([9.0, 9.0, 0.0, 0.0, 0.0, 0.0]))  # layer 1 uses experts 0, 1 only
    stage.train()
    for moe in stage.values():
        moe(x, tokens)
    per = {name: moe.load_counts.clone() for name, moe in stage.items()}
    stats = pop_moe_stats(stage, per_layer=True)
    assert stats["moe_dead_experts/1"] == 4 and per["1"].tolist() == [3, 3, 0, 0, 0, 0]
    dead0 = int((per["0"] == 0).sum())
    assert stats["moe_dead_experts"] == 4 + dead0
    assert stats["moe_max_load/1"] == pytest.approx(3 / 1.0)  # 3 tokens on expert 0 vs a mean of 6 / 6
    assert stats["moe_max_load"] == max(stats["moe_max_load/0"], stats["moe_max_load/1"])
    with torch.no_grad():
        route, route0 = (stage[k].gate(x.view(3, 16), tokens.view(3)) for k in ("1", "0"))
    p = route.scores / route.scores.sum(-1, keepdim=True)
    entropy1 = float(-(p * p.log()).sum(-1).mean())
    p0 = route0.scores / route0.scores.sum(-1, keepdim=True)
    entropy0 = float(-(p0 * p0.log()).sum(-1).mean())
    assert stats["moe_router_entropy"] == pytest.approx((entropy0 + entropy1) / 2, rel=1e-5)
    assert pop_moe_stats(stage) == {} and int(stage["1"].load_counts.sum()) == 0


def test_replayed_routing_from_a_cpu_tape_follows_the_scores_device():
    """Anticipatory routing restored from a checkpoint holds its indices on the CPU; on a GPU rank the router
    must hand them out on the scores' device (shown with ``meta`` scores)."""
    from v4train.model.moe import RoutingTape

    router = Router(_cfg(), layer_idx=1).to("meta")
    recorded = torch.tensor([[0, 3], [5, 1]])
    router.tape = RoutingTape("replay", {1: [recorded]})
    scores = torch.empty(2, 6, device="meta")
    got = router._select(scores, torch.zeros(2, dtype=torch.long, device="meta"))
    assert got.device == scores.device and got.shape == recorded.shape
