"""Activation recompute (model/recompute.py): training with selective / full recompute equals the plain
run bit for bit, routing is replayed (never re-decided) and every statistic is counted once."""

import pytest
import torch

from v4train.model import ModelConfig, V4Stage
from v4train.model.moe import Router, RoutingTape, set_routing_tape, update_expert_bias
from v4train.model.recompute import RECOMPUTE_MODES
from v4train.parallel.optim import build_optimizer

SEED = 1234


def _cfg():
    # nano, small: SWA, CSA (indexer), HCA, hash and learned routing, MTP
    return ModelConfig.preset("nano", vocab_size=256, dim=64, q_lora_rank=32, o_lora_rank=32, moe_inter_dim=64,
                              window=8)


def _batches(cfg, n, B=2, S=24):
    gen = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, cfg.vocab_size, (B, S), generator=gen)
        pos = torch.stack([torch.cat([torch.arange(10), torch.arange(S - 10)]), torch.arange(S)])
        labels = torch.roll(ids, -1, dims=1)
        labels[:, -1] = -100
        out.append((ids, pos, labels))
    return out


def _stage(recompute, mode="sparse"):
    stage = V4Stage(_cfg(), pp_rank=0, pp_size=1)
    stage.init_weights(SEED)
    stage.attention_mode, stage.aux_loss_scale, stage.recompute = mode, 0.5, recompute
    return stage


def _train(recompute, steps=3, micro_batches=2):
    """Losses, aux metrics and expert counts per step, and the final state dict, of a Muon run."""
    stage = _stage(recompute)
    opt = build_optimizer(list(stage.named_parameters()), algorithm="muon", lr=3e-3, weight_decay=0.1, eps=1e-20)
    batches = _batches(stage.cfg, steps * micro_batches)
    log = []
    for step in range(steps):
        losses = []
        for ids, pos, labels in batches[step * micro_batches:(step + 1) * micro_batches]:
            loss = stage(ids, pos, labels).sum() / (labels != -100).sum()
            loss.backward()
            losses.append(loss.detach())
        counts = [r.expert_counts.clone() for r in stage.modules() if isinstance(r, Router) and not r.is_hash]
        metrics = stage.pop_aux_metrics(per_layer=True)
        update_expert_bias(stage, None)
        opt.step()
        opt.zero_grad()
        log.append((losses, counts, metrics))
    return log, {k: v.clone() for k, v in stage.state_dict().items()}, opt.state_dict()


@pytest.fixture(scope="module")
def plain_run():
    return _train("none")


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_recomputed_training_equals_the_plain_run_bitwise(plain_run, recompute):
    """3 Muon steps of 2 micro-batches (sparse attention: the indexer's KL trains too): losses, balance,
    indexer and MTP metrics, expert counts, routing statistics, every parameter, router bias and optimizer
    moment are bit-identical to the run without recompute (the same operations on the same inputs)."""
    (ref_log, ref_state, ref_opt), (log, state, opt) = plain_run, _train(recompute)
    for (ref_losses, ref_counts, ref_metrics), (losses, counts, metrics) in zip(ref_log, log, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(ref_losses, losses, strict=True))
        assert all(torch.equal(a, b) for a, b in zip(ref_counts, counts, strict=True))
        assert metrics == ref_metrics and {"balance_loss", "indexer_loss", "mtp_loss"} <= metrics.keys()
    assert state.keys() == ref_state.keys()
    for key, want in ref_state.items():
        assert torch.equal(state[key], want), key
    flat = lambda sd: [t for s in sd["optimizers"] for v in s["state"].values() for t in v.values()  # noqa: E731
                       if isinstance(t, torch.Tensor)]
    assert all(torch.equal(a, b) for a, b in zip(flat(ref_opt), flat(opt), strict=True)) and flat(opt)


def _grads(stage, ids, pos, labels, between=lambda: None):
    loss = stage(ids, pos, labels).sum()
    between()
    loss.backward()
    return {n: p.grad.clone() for n, p in stage.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_routing_is_replayed_in_the_recompute(recompute):
    """A router bias moved between the forward and the backward would change the top-k a re-decided
    recompute picks; the replay keeps the forward's experts, so the gradients equal the plain run's."""
    ids, pos, labels = _batches(_cfg(), 1)[0]
    want = _grads(_stage("none"), ids, pos, labels)
    stage = _stage(recompute)
    routers = [r for r in stage.modules() if isinstance(r, Router) and not r.is_hash]

    def shuffle_biases():
        with torch.no_grad():
            for r in routers:
                r.bias.copy_(torch.randn(r.bias.shape, generator=torch.Generator().manual_seed(r.layer_idx)) * 10)

    got = _grads(stage, ids, pos, labels, shuffle_biases)
    assert got.keys() == want.keys()
    for name, g in want.items():
        assert torch.equal(got[name], g), name


def test_anticipatory_routing_tape_is_read_once_under_full_recompute():
    """Replaying a captured tape under full recompute: the re-run takes the recorded routes, not the tape
    (a second pop would find it empty), and the gradients equal the plain replay's."""
    ids, pos, labels = _batches(_cfg(), 1)[0]
    grads, left = {}, {}
    for recompute in ("none", "full"):
        stage = _stage(recompute)
        tape = RoutingTape("capture")
        set_routing_tape(stage, tape)
        with torch.no_grad():
            stage(ids, pos, labels)
        captured = set(tape.indices)
        replay = RoutingTape("replay", {layer: list(q) for layer, q in tape.indices.items()})
        set_routing_tape(stage, replay)
        grads[recompute] = _grads(stage, ids, pos, labels)
        assert captured and all(not replay.indices[layer] for layer in captured)  # each route read once
        # the layers the capture did not run (MTP) route normally and append once
        left[recompute] = {layer: len(q) for layer, q in replay.indices.items()}
    assert left["full"] == left["none"]
    for name, g in grads["none"].items():
        assert torch.equal(grads["full"][name], g), name


def _saved_bytes(recompute):
    """Bytes autograd keeps for the backward outside the recomputed regions (their inner saves go to
    torch.utils.checkpoint's own hooks)."""
    stage = _stage(recompute)
    ids, pos, labels = _batches(stage.cfg, 1, S=64)[0]
    saved = {}

    def pack(t):
        saved[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        stage(ids, pos, labels).sum().backward()
    return sum(saved.values())


def test_recompute_keeps_fewer_activations():
    none, selective, full = (_saved_bytes(m) for m in RECOMPUTE_MODES)
    assert full < selective < none


def test_unknown_recompute_mode_is_refused():
    stage = _stage("none")
    with pytest.raises(ValueError, match="recompute 'some'"):
        stage.recompute = "some"
    assert stage.recompute == "none"
