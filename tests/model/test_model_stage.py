"""V4Stage: pipeline split parity, state-dict names, layout-free init, parameter budget, memorisation."""

import pytest
import torch

from v4train.model import ModelConfig, V4Stage, stage_layer_ranges
from v4train.model.budget import param_counts
from v4train.model.moe import update_expert_bias

SEED = 1234


def _cfg(**overrides):
    # nano with a smaller vocab and width so each test runs in well under a second per step
    base = dict(vocab_size=512, dim=64, q_lora_rank=32, o_lora_rank=32, moe_inter_dim=64, window=8)
    return ModelConfig.preset("nano", **{**base, **overrides})


def _batch(cfg, B=2, S=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (B, S), generator=gen)
    # two packed documents in row 0, one in row 1
    pos = torch.stack([torch.cat([torch.arange(10), torch.arange(S - 10)]), torch.arange(S)])
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    return ids, pos, labels


def _stages(cfg, pp_size):
    stages = [V4Stage(cfg, pp_rank=r, pp_size=pp_size) for r in range(pp_size)]
    for s in stages:
        s.init_weights(SEED)
        s.aux_loss_scale = 0.5
        s.attention_mode = "dense"
    return stages


def test_stage_layer_ranges():
    assert stage_layer_ranges(4, 1) == [range(0, 4)]
    assert stage_layer_ranges(4, 2) == [range(0, 2), range(2, 4)]
    assert stage_layer_ranges(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    with pytest.raises(ValueError, match="pp_size 5"):
        stage_layer_ranges(4, 5)


def test_state_dict_keys_of_a_split_share_only_the_embedding():
    cfg = _cfg()
    (full,) = _stages(cfg, 1)
    parts = _stages(cfg, 2)
    keys = [set(p.state_dict()) for p in parts]
    assert keys[0] & keys[1] == {"embed.weight"}  # the last stage's copy for MTP, same name
    assert keys[0] | keys[1] == set(full.state_dict())
    assert "layers.3.attn.wq_a.weight" in keys[1] and "head.weight" in keys[1] and "mtp.0.e_proj.weight" in keys[1]
    assert "layers.1.ffn.gate.bias" in keys[0] and "layers.0.ffn.gate.tid2eid" in keys[0]
    assert "layers.1.attn.indexer.compressor.ape" in keys[0] and "layers.2.attn.compressor.wkv.weight" in keys[1]
    full_sd = full.state_dict()
    for part in parts:
        for name, value in part.state_dict().items():
            assert torch.equal(value, full_sd[name]), name


def test_shared_embedding_parameters_contract():
    cfg = _cfg()
    (full,) = _stages(cfg, 1)
    assert full.shared_embedding_parameters() == []
    first, middle, last = _stages(_cfg(n_layers=3, compress_ratios=(0, 4, 32, 0)), 3)
    assert first.shared_embedding_parameters() == [first.embed.weight]
    assert middle.shared_embedding_parameters() == [] and not hasattr(middle, "embed")
    assert last.shared_embedding_parameters() == [last.embed.weight]
    assert torch.equal(first.embed.weight, last.embed.weight)
    no_mtp = _stages(_cfg(mtp_depth=0, compress_ratios=(0, 4, 32, 4)), 2)
    assert [s.shared_embedding_parameters() for s in no_mtp] == [[], []] and not hasattr(no_mtp[1], "embed")


def test_attention_mode_and_mtp_weight_attributes():
    stage = V4Stage(_cfg(), pp_rank=0, pp_size=1)
    assert stage.attention_mode is None and stage.mtp_loss_weight == 0.3
    ids = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(RuntimeError, match="attention_mode is not set"):
        stage(ids, torch.arange(8)[None], ids)
    for mode in ("sparse", "indexer_warmup", "dense"):
        stage.attention_mode = mode
        assert stage.attention_mode == mode
    with pytest.raises(ValueError, match="attention_mode 'topk'"):
        stage.attention_mode = "topk"
    assert stage.attention_mode == "dense"  # a refused mode changes nothing


def test_init_is_seeded_per_name():
    cfg = _cfg()
    a, b, c = V4Stage(cfg, pp_rank=0, pp_size=1), V4Stage(cfg, pp_rank=0, pp_size=1), V4Stage(cfg, pp_rank=0, pp_size=1)
    a.init_weights(7)
    b.init_weights(7)
    c.init_weights(8)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.layers["0"].attn.wq_a.weight, c.layers["0"].attn.wq_a.weight)
    assert not torch.equal(a.layers["0"].attn.wq_a.weight, a.layers["1"].attn.wq_a.weight)
    assert torch.equal(a.layers["2"].ffn_norm.weight, torch.ones(cfg.dim))
    assert a.layers["2"].attn.attn_sink.abs().sum() == 0
    assert a.layers["1"].attn.wq_b.weight.std().item() == pytest.approx(cfg.init_std, rel=0.05)


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_pipeline_split_matches_single_stage_losses_and_gradients(mode):
    cfg = _cfg()
    ids, pos, labels = _batch(cfg)
    (full,) = _stages(cfg, 1)
    full.attention_mode = mode
    loss_full = full(ids, pos, labels)
    loss_full.sum().backward()

    first, last = _stages(cfg, 2)
    first.attention_mode = last.attention_mode = mode
    sent = first(ids, pos)
    assert sent.shape == (ids.shape[1], ids.shape[0], cfg.hc_mult * cfg.dim) and sent.dtype == torch.float32
    received = sent.detach().requires_grad_()
    last.set_input_tensor([received])
    loss_split = last(ids, pos, labels)
    loss_split.sum().backward()
    sent.backward(received.grad)

    assert loss_full.shape == ids.shape and loss_full.dtype == torch.float32
    assert (loss_full[:, -1] == 0).all()  # ignored label
    torch.testing.assert_close(loss_split, loss_full, rtol=0, atol=1e-6)
    grads = {n: p.grad for n, p in full.named_parameters()}
    # the trainer sums the two embedding copies' gradients (Megatron's embedding group)
    shared = [p.grad for s in (first, last) for p in s.shared_embedding_parameters()]
    torch.testing.assert_close(shared[0] + shared[1], grads["embed.weight"], rtol=1e-5, atol=1e-7)
    split_names = set()
    for stage in (first, last):
        for name, p in stage.named_parameters():
            split_names.add(name)
            if name == "embed.weight":
                continue
            if grads[name] is None:  # the idle indexer (dense mode); HCA m' = 32 > S: no compressed entry
                assert p.grad is None and (".indexer." in name or name.startswith("layers.2.attn.compressor")), name
                continue
            torch.testing.assert_close(p.grad, grads[name], rtol=1e-5, atol=1e-6, msg=name)
    assert split_names == set(grads)
    # auxiliary metrics agree too
    full_aux = full.pop_aux_metrics()
    first_aux, last_aux = first.pop_aux_metrics(), last.pop_aux_metrics()
    assert first_aux["balance_loss"] + last_aux["balance_loss"] == pytest.approx(full_aux["balance_loss"], rel=1e-6)
    assert last_aux["mtp_loss"] == pytest.approx(full_aux["mtp_loss"], rel=1e-6) and "mtp_loss" not in first_aux
    if mode == "sparse":
        split_mean = (first_aux["indexer_loss"] + last_aux["indexer_loss"]) / 2
        assert split_mean == pytest.approx(full_aux["indexer_loss"], rel=1e-5)
    for i in ("1", "2"):
        stage = first if i == "1" else last
        assert torch.equal(stage.layers[i].ffn.gate.expert_counts, full.layers[i].ffn.gate.expert_counts)


def test_stage_errors_and_logits():
    cfg = _cfg()
    ids, pos, _ = _batch(cfg)
    first, last = _stages(cfg, 2)
    with pytest.raises(RuntimeError, match="stage 1 of 2.*set_input_tensor"):
        last(ids, pos)
    last.set_input_tensor(torch.zeros(3, 2, cfg.hc_mult * cfg.dim))
    with pytest.raises(RuntimeError, match="stage 1: input tensor shape"):
        last(ids, pos)
    with pytest.raises(ValueError, match="pp_rank 2"):
        V4Stage(cfg, pp_rank=2, pp_size=2)
    (full,) = _stages(cfg, 1)
    assert full(ids, pos).shape == (*ids.shape, cfg.vocab_size)
    assert first(ids[:1], pos[:1])._base is None  # Megatron's deallocate_output_tensor rejects views


def test_param_counts_formula_matches_the_built_model():
    for name in ("nano", "small"):
        cfg = ModelConfig.preset(name)
        stage = V4Stage(cfg, pp_rank=0, pp_size=1)
        counts = param_counts(cfg)
        assert counts["total_with_mtp"] == sum(p.numel() for p in stage.parameters())
        assert counts["mtp"] == sum(p.numel() for p in stage.mtp.parameters())
        routed_unused = sum(p.numel() for n, p in stage.named_parameters()
                            if ".ffn.experts.experts." in n and not n.startswith("mtp."))
        routed_unused *= 1 - cfg.n_activated_experts / cfg.n_routed_experts
        assert counts["active"] == pytest.approx(counts["total"] - cfg.vocab_size * cfg.dim - routed_unused)
    nano = param_counts(ModelConfig.preset("nano"))
    assert 9.1e6 < nano["total_with_mtp"] < 9.3e6  # spec 10.1: ~9.2M with MTP and compressors


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_memorises_a_fixed_batch_and_every_parameter_learns(mode):
    torch.manual_seed(0)
    cfg = _cfg()
    ids, pos, labels = _batch(cfg, B=2, S=32)
    (model,) = _stages(cfg, 1)
    model.train()
    model.attention_mode = mode
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for step in range(30):
        loss = model(ids, pos, labels).sum() / (labels != -100).sum()
        opt.zero_grad()
        loss.backward()
        if step == 0:
            for name, p in model.named_parameters():
                if mode == "dense" and ".indexer." in name:
                    assert p.grad is None, name  # idle in dense mode
                else:
                    assert p.grad is not None and p.grad.abs().sum() > 0, name
        opt.step()
        update_expert_bias(model, group=None)
        losses.append(loss.item())
    assert losses[0] == pytest.approx(6.24, abs=0.3)  # ~ln(512) at init
    assert losses[-1] < 0.3 * losses[0]
    metrics = model.pop_aux_metrics()
    assert metrics["balance_loss"] > 0 and 0 < metrics["mtp_loss"] < 10
    assert ("indexer_loss" in metrics) == (mode == "sparse")
    assert {"moe_dead_experts", "moe_max_load", "moe_router_entropy"} <= set(metrics)
