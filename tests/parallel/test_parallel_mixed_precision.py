"""parallel.mixed_precision: bf16 compute copies, fp32 masters, fp32 gradient accumulation."""

import copy

import pytest
import torch

from support.model import next_token_batch, whole_stage
from v4train.model import ModelConfig
from v4train.parallel.mixed_precision import MixedPrecision, computes_in_bf16

SEED = 1234


def _stage():
    cfg = ModelConfig.preset("nano", vocab_size=256, dim=64, q_lora_rank=32, o_lora_rank=32, moe_inter_dim=64,
                             window=8)
    return whole_stage(cfg, "sparse", SEED)


def _batch(seed, B=2, S=24):
    return next_token_batch(256, seed, B, S)


def test_which_parameters_compute_in_bf16():
    names = {n for n, _ in _stage().named_parameters()}
    bf16 = {n for n in names if computes_in_bf16(n)}
    for name in ("embed.weight", "head.weight", "layers.0.attn.wq_a.weight", "layers.1.attn.indexer.wq_b.weight",
                 "layers.1.ffn.experts.experts.0.w1.weight", "layers.1.ffn.shared_experts.w2.weight",
                 "mtp.0.e_proj.weight"):
        assert name in bf16, name
    for name in ("layers.0.hc_attn.fn", "hc_head.base", "layers.0.attn_norm.weight", "norm.weight",
                 "layers.1.attn.compressor.wkv.weight", "layers.1.attn.indexer.compressor.ape",
                 "layers.1.ffn.gate.weight", "layers.0.attn.attn_sink", "layers.0.attn.q_norm.weight"):
        assert name in names and name not in bf16, name


def test_bf16_compute_accumulates_fp32_gradients_on_fp32_masters():
    """Two micro-batches under compute(): bf16 weights and streams inside, the fp32 masters untouched after,
    and each gradient the fp32 sum of the two bf16 backward results (computed here on a bf16 copy)."""
    stage = _stage()
    masters = {n: p.detach().clone() for n, p in stage.named_parameters()}
    reference = copy.deepcopy(stage)
    for name, p in reference.named_parameters():
        if computes_in_bf16(name):
            p.data = p.data.to(torch.bfloat16)
    want = {}
    for seed in (0, 1):
        reference.zero_grad(set_to_none=True)
        reference(*_batch(seed)).sum().backward()
        for name, p in reference.named_parameters():
            if p.grad is not None:
                g = p.grad.float()
                want[name] = g if name not in want else want[name] + g

    mixed = MixedPrecision(stage, "bf16")
    streams = []
    hook = stage.layers["0"].register_forward_hook(lambda m, i, out: streams.append(out.dtype))
    with mixed.compute():
        assert stage.embed.weight.dtype == torch.bfloat16 and stage.layers["0"].hc_attn.fn.dtype == torch.float32
        for seed in (0, 1):
            loss_BS = stage(*_batch(seed))
            assert loss_BS.dtype == torch.float32
            loss_BS.sum().backward()
    hook.remove()
    assert streams == [torch.bfloat16, torch.bfloat16]
    for name, p in stage.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p.detach(), masters[name]), name
        assert (p.grad is None) == (name not in want), name
        if p.grad is not None:
            assert p.grad.dtype == torch.float32
            assert torch.equal(p.grad, want[name]), name


def test_bf16_gradients_are_close_to_fp32():
    stage = _stage()
    batch = _batch(0)
    loss32 = stage(*batch).sum()
    loss32.backward()
    g32 = {n: p.grad.clone() for n, p in stage.named_parameters() if p.grad is not None}
    stage.zero_grad(set_to_none=True)
    with MixedPrecision(stage, "bf16").compute():
        loss16 = stage(*batch).sum()
        loss16.backward()
    assert loss16.item() == pytest.approx(loss32.item(), rel=2e-3)
    # over the whole gradient: a bf16 router score can flip a near-tie top-k and move a few tokens between
    # experts, so single experts' gradients may differ more
    want = torch.cat([g.flatten() for g in g32.values()])
    got = torch.cat([stage.get_parameter(n).grad.flatten() for n in g32])
    assert torch.nn.functional.cosine_similarity(got, want, dim=0) > 0.99


def test_fp32_is_a_no_op_and_unknown_precision_is_refused():
    stage = _stage()
    with MixedPrecision(stage, "fp32").compute():
        assert all(p.dtype == torch.float32 for p in stage.parameters())
    with pytest.raises(ValueError, match="precision 'fp16'"):
        MixedPrecision(stage, "fp16")
