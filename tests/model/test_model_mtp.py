"""MTP (spec 5.3): token alignment, loss value, injection into the backward with its weight, the weight
schedule, and the stage's auxiliary metrics."""

import pytest
import torch
import torch.nn.functional as F

from v4train.model import ModelConfig, V4Stage
from v4train.model.layout import SequenceContext
from v4train.model.mtp import mtp_loss_weight, shift_left


def _stage(**overrides):
    base = dict(vocab_size=128, dim=32, n_heads=2, head_dim=16, rope_head_dim=8, q_lora_rank=16, o_lora_rank=16,
                moe_inter_dim=32, window=8, index_n_heads=2, index_head_dim=8, balance_loss_weight=0.0)
    stage = V4Stage(ModelConfig.preset("nano", **{**base, **overrides}), pp_rank=0, pp_size=1)
    stage.init_weights(3)
    stage.attention_mode = "dense"
    return stage.train()


def _batch(B=2, S=20, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 128, (B, S + 1), generator=gen)
    pos = torch.stack([torch.arange(S), torch.cat([torch.arange(7), torch.arange(S - 7)])])
    labels = ids[:, 1:].clone()
    labels[1, 3] = -100
    return ids[:, :-1], pos, labels


def _manual_losses(stage, ids, pos, labels):
    """Main per-token CE and the depth-1 MTP loss written out from the modules (spec 5.3)."""
    ctx = SequenceContext(pos, ids, attention_mode="dense")
    X = stage._embed(ids)
    for block in stage.layers.values():
        X = block(X, ctx)
    main = F.cross_entropy(stage.head(stage.norm(stage.hc_head(X))).flatten(0, 1), labels.flatten(), reduction="none")
    mtp = stage.mtp["0"]
    nxt = labels.clamp(min=0)                                  # Emb(t[i+1])
    target = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)  # t[i+2]
    valid = (labels != -100) & (target != -100)
    x = mtp.e_proj(mtp.enorm(stage.embed(nxt))).unsqueeze(2) + mtp.h_proj(mtp.hnorm(X))
    H = super(type(mtp), mtp).forward(x, ctx, nxt)
    logits = stage.head(mtp.norm(mtp.hc_head(H)))
    ce = F.cross_entropy(logits.flatten(0, 1), torch.where(valid, target, -100).flatten(), reduction="sum")
    return main.view_as(labels), ce / valid.sum()


def test_shift_left():
    ids = torch.tensor([[1, 2, 3, 4]])
    assert shift_left(ids, 0) is ids
    assert shift_left(ids, 1).tolist() == [[2, 3, 4, -100]] and shift_left(ids, 5).tolist() == [[-100] * 4]


def test_weight_schedule():
    assert mtp_loss_weight(False) == 0.3 and mtp_loss_weight(True) == 0.1
    assert mtp_loss_weight(True, after_decay=0.0) == 0.0


def test_mtp_loss_value_and_injected_gradient():
    ids, pos, labels = _batch()
    stage, twin = _stage(), _stage()
    stage.aux_loss_scale, stage.mtp_loss_weight = 0.25, 0.3
    loss_BS = stage(ids, pos, labels)
    main, mtp = _manual_losses(twin, ids, pos, labels)
    # the returned loss is the main CE only; the MTP loss is reported unweighted
    torch.testing.assert_close(loss_BS, main, rtol=1e-5, atol=1e-6)
    metrics = stage.pop_aux_metrics()
    assert metrics["mtp_loss"] == pytest.approx(float(mtp.detach()), rel=1e-5)
    # its gradient arrives with weight * aux_loss_scale
    loss_BS.mean().backward()
    (main.mean() + 0.3 * 0.25 * mtp).backward()
    for (name, p), q in zip(stage.named_parameters(), twin.parameters()):
        if q.grad is None:
            assert p.grad is None, name
            continue
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7, msg=name)
    assert stage.mtp["0"].e_proj.weight.grad.abs().sum() > 0


def test_mtp_is_skipped_with_weight_zero_and_in_eval():
    ids, pos, labels = _batch()
    stage = _stage()
    stage.mtp_loss_weight = 0.0
    stage(ids, pos, labels).mean().backward()
    assert "mtp_loss" not in stage.pop_aux_metrics()
    assert all(p.grad is None for p in stage.mtp.parameters())
    stage.mtp_loss_weight = 0.3
    with torch.no_grad():
        stage.eval()(ids, pos, labels)
    assert stage.pop_aux_metrics() == {}


def test_aux_metrics_keys_of_a_training_step():
    ids, pos, labels = _batch(S=40)
    stage = _stage(balance_loss_weight=1e-4)
    stage.attention_mode = "indexer_warmup"
    stage(ids, pos, labels).mean().backward()
    metrics = stage.pop_aux_metrics(per_layer=True)
    assert {"balance_loss", "mtp_loss", "indexer_loss", "indexer_recall", "moe_dead_experts", "moe_max_load",
            "moe_router_entropy"} <= set(metrics)
    assert "moe_max_load/layers.1.ffn" in metrics and "moe_dead_experts/mtp.0.ffn" in metrics
    assert 0 <= metrics["moe_router_entropy"] <= torch.log(torch.tensor(8.0)).item() + 1e-6
    assert metrics["moe_max_load"] >= 1.0 and 0 < metrics["indexer_recall"] <= 1
    assert stage.pop_aux_metrics() == {}
    with pytest.raises(ValueError, match="attention_mode"):
        stage.attention_mode = "full"
