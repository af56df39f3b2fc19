"""parallel/fp8.py: blockwise e4m3 quantisation bounds, the emulated FP8 linear, enable_fp8 on a nano stage,
Megatron TP layers, and the Transformer Engine context (GPU only)."""

import contextlib
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from support.model import next_token_batch, whole_stage
from v4train.model.config import ModelConfig
from v4train.parallel.fp8 import (
    E4M3_MAX, FP32_MODULE_NAMES, Fp8Linear, Fp8Recipe, dequantize_activation, dequantize_weight, enable_fp8,
    fp8_autocast_context, fp8_linear, quantize_activation, quantize_weight,
)

# e4m3: 3 mantissa bits, so round-to-nearest errs by at most half an ulp = 2^-4 of a normal value
# (|v| >= 2^-6 after scaling); below that the subnormal spacing is 2^-9, an absolute error <= 2^-10.
REL_BOUND = 2.0 ** -4
SUBNORMAL_ABS_BOUND = 2.0 ** -10
SLACK = 1 + 2.0 ** -20  # fp32 rounding of x / scale and q * scale


def _wide_range(*shape, seed=0):
    """Values over ~10 decades, so tiles hit the normal and the subnormal e4m3 range."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen) * torch.exp(3 * torch.randn(*shape, generator=gen))


def _assert_within_e4m3_bound(x, deq, scale_full):
    err = (deq - x).abs()
    bound = torch.maximum(REL_BOUND * x.abs(), SUBNORMAL_ABS_BOUND * scale_full) * SLACK
    assert (err <= bound).all(), f"worst excess {(err - bound).max().item():.3g}"


def test_recipe_rejects_bad_sizes():
    with pytest.raises(ValueError, match="activation_tile"):
        Fp8Recipe(activation_tile=0)
    with pytest.raises(ValueError, match="weight_block"):
        Fp8Recipe(weight_block=2.0)


def test_activation_round_trip_bound_and_ragged_tiles():
    x = _wide_range(33, 300)  # 300 = 128 + 128 + 44: a ragged last tile
    q, scale = quantize_activation(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == x.shape
    assert scale.shape == (33, 3) and scale.dtype == torch.float32
    for j, (lo, hi) in enumerate([(0, 128), (128, 256), (256, 300)]):
        torch.testing.assert_close(scale[:, j], x[:, lo:hi].abs().amax(dim=1) / E4M3_MAX, rtol=0, atol=0)
        # every tile uses the full e4m3 range: its amax lands on 448
        assert (q[:, lo:hi].float().abs().amax(dim=1) == E4M3_MAX).all()
    deq = dequantize_activation(q, scale)
    _assert_within_e4m3_bound(x, deq, scale.repeat_interleave(128, dim=1)[:, :300])


def test_weight_round_trip_bound_and_ragged_blocks():
    w = _wide_range(192, 96, seed=1)  # nano-like widths: blocks of 128x96 and 64x96
    q, scale = quantize_weight(w)
    assert scale.shape == (2, 1)
    torch.testing.assert_close(scale, torch.stack([w[:128].abs().amax(), w[128:].abs().amax()]).view(2, 1) / E4M3_MAX,
                               rtol=0, atol=0)
    deq = dequantize_weight(q, scale)
    _assert_within_e4m3_bound(w, deq, scale.repeat_interleave(128, dim=0)[:192])


def test_zero_tiles_and_empty_inputs_quantise_cleanly():
    x = torch.zeros(4, 130)
    x[:, 128:] = torch.tensor([1.0, -2.0])
    q, scale = quantize_activation(x)
    assert torch.equal(scale[:, 0], torch.ones(4)) and torch.equal(dequantize_activation(q, scale), x)
    q, scale = quantize_activation(torch.zeros(0, 192))
    assert q.shape == (0, 192) and scale.shape == (0, 2)
    with pytest.raises(ValueError, match="floating-point"):
        quantize_activation(torch.ones(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="scale shape"):
        dequantize_weight(*quantize_weight(torch.ones(4, 4)), block=2)


def test_an_outlier_changes_only_its_own_tile_or_block():
    x = _wide_range(4, 384, seed=2).clamp(-10, 10)
    x_out = x.clone()
    x_out[1, 200] = 1e4  # row 1, tile 1
    before = dequantize_activation(*quantize_activation(x))
    after = dequantize_activation(*quantize_activation(x_out))
    changed = (before != after)
    changed[1, 200] = False
    assert changed[1, 128:256].any()  # the outlier's tile lost resolution
    changed[1, 128:256] = False
    assert not changed.any()

    w = _wide_range(256, 384, seed=3).clamp(-10, 10)
    w_out = w.clone()
    w_out[130, 5] = 1e4  # block (1, 0)
    before, after = dequantize_weight(*quantize_weight(w)), dequantize_weight(*quantize_weight(w_out))
    changed = before != after
    assert changed[128:, :128].sum() > 1
    changed[128:, :128] = False
    assert not changed.any()


def _reference(x, w, b, recipe):
    """Explicit dequantise-then-matmul with autograd on the dequantised operands (straight-through)."""
    K = x.shape[-1]
    xd = dequantize_activation(*quantize_activation(x.detach().reshape(-1, K), recipe.activation_tile),
                               recipe.activation_tile).requires_grad_()
    wd = dequantize_weight(*quantize_weight(w.detach(), recipe.weight_block), recipe.weight_block).requires_grad_()
    bd = None if b is None else b.detach().clone().requires_grad_()
    return F.linear(xd, wd, bd), xd, wd, bd


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("recipe", [Fp8Recipe(), Fp8Recipe(activation_tile=32, weight_block=64)])
def test_fp8_linear_matches_dequantise_then_matmul(with_bias, recipe):
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 7, 192, generator=gen, requires_grad=True)
    w = (torch.randn(96, 192, generator=gen) * 0.05).requires_grad_()
    b = torch.randn(96, generator=gen, requires_grad=True) if with_bias else None
    y = fp8_linear(x, w, b, recipe)
    y_ref, xd, wd, bd = _reference(x, w, b, recipe)
    assert y.shape == (3, 7, 96) and y.dtype == torch.float32
    assert torch.equal(y.reshape(-1, 96), y_ref)  # bit for bit
    assert not torch.equal(y, F.linear(x, w, b))  # and quantisation is really applied

    grad_y = torch.randn(y.shape, generator=gen)
    y.backward(grad_y)
    y_ref.backward(grad_y.reshape(-1, 96))
    # straight-through: the gradients of the dequantised operands; dx is the same mm call, dW and db are
    # computed in another operand order than autograd's addmm backward, so they get 1e-6 slack
    assert torch.equal(x.grad.reshape(-1, 192), xd.grad)
    torch.testing.assert_close(w.grad, wd.grad, rtol=1e-6, atol=1e-7)
    if with_bias:
        torch.testing.assert_close(b.grad, bd.grad, rtol=1e-6, atol=1e-7)


def test_fp8_linear_module_gradients_and_empty_batch():
    torch.manual_seed(5)
    lin = Fp8Linear(64, 48, bias=True)
    x = torch.randn(10, 64, requires_grad=True)
    lin(x).square().sum().backward()
    for t in (lin.weight.grad, lin.bias.grad, x.grad):
        assert t is not None and torch.isfinite(t).all() and t.abs().sum() > 0
    lin.zero_grad()
    # a routed expert that received no token runs on an empty slice and still gets a (zero) gradient
    y = lin(torch.zeros(0, 64))
    assert y.shape == (0, 48)
    y.sum().backward()
    assert torch.equal(lin.weight.grad, torch.zeros(48, 64)) and torch.equal(lin.bias.grad, torch.zeros(48))
    with pytest.raises(ValueError, match="does not match weight"):
        fp8_linear(torch.randn(2, 63), lin.weight)


def test_from_linear_keeps_parameters_and_refuses_hooks():
    lin = nn.Linear(32, 16)
    f8 = Fp8Linear.from_linear(lin.eval())
    assert f8.weight is lin.weight and f8.bias is lin.bias and not f8.training
    assert set(f8.state_dict()) == set(lin.state_dict())
    lin.register_forward_hook(lambda *a: None)
    with pytest.raises(ValueError, match="hooks"):
        Fp8Linear.from_linear(lin)


def _nano_stage():
    return whole_stage(ModelConfig.preset("nano", vocab_size=512), "dense", 0)


def _batch(B=2, S=32):
    return next_token_batch(512, 6, B, S)


def test_enable_fp8_on_a_nano_stage():
    stage = _nano_stage()
    ids, pos, labels = _batch()
    loss_ref = stage(ids, pos, labels)
    loss_ref.mean().backward()
    grads_ref = {n: p.grad.clone() for n, p in stage.named_parameters() if p.grad is not None}
    stage.zero_grad(set_to_none=True)
    stage.pop_aux_metrics()
    params_before = [id(p) for p in stage.parameters()]
    fp32_state = {k: v.clone() for k, v in stage.state_dict().items()}
    opt = torch.optim.SGD(stage.parameters(), lr=0.1)  # built before the swap

    swapped = enable_fp8(stage)
    cfg = stage.cfg
    per_block = 4 + 3 * cfg.n_routed_experts + 3  # wq_a wq_b wkv wo_b, routed experts, shared expert
    assert len(swapped) == per_block * (cfg.n_layers + cfg.mtp_depth) + 2  # + MTP e_proj, h_proj
    for name in ("layers.0.attn.wq_a", "layers.1.attn.wq_b", "layers.2.attn.wkv", "layers.3.attn.wo_b",
                 "layers.0.ffn.experts.experts.7.w2", "layers.1.ffn.shared_experts.w3",
                 "mtp.0.e_proj", "mtp.0.h_proj", "mtp.0.ffn.experts.experts.0.w1"):
        assert name in swapped and isinstance(stage.get_submodule(name), Fp8Linear), name
    plain = [n for n, m in stage.named_modules() if isinstance(m, nn.Linear) and not isinstance(m, Fp8Linear)]
    assert "head" in plain and "layers.1.attn.compressor.wkv" in plain and "layers.1.attn.indexer.wq_b" in plain
    assert all(FP32_MODULE_NAMES.intersection(n.split(".")) for n in plain)
    assert [id(p) for p in stage.parameters()] == params_before and list(stage.state_dict()) == list(fp32_state)
    assert enable_fp8(stage) == []

    loss = stage(ids, pos, labels)
    assert loss.shape == ids.shape
    assert loss.mean() != loss_ref.mean()  # quantisation is active ...
    assert abs(loss.mean().item() - loss_ref.mean().item()) < 0.03 * loss_ref.mean().item()  # ... and mild
    loss.mean().backward()
    names = [n for n, p in stage.named_parameters() if p.grad is not None]
    assert names == list(grads_ref)
    g = torch.cat([stage.get_parameter(n).grad.flatten() for n in names])
    g_ref = torch.cat([grads_ref[n].flatten() for n in names])
    # not ~1: quantised router inputs flip some top-k choices, which moves whole expert gradients
    assert F.cosine_similarity(g, g_ref, dim=0) > 0.95
    w = stage.layers["0"].attn.wq_a.weight
    before = w.detach().clone()
    opt.step()
    assert not torch.equal(w, before)
    stage.load_state_dict(fp32_state)  # an fp32 checkpoint loads into the FP8 model
    assert torch.equal(w, fp32_state["layers.0.attn.wq_a.weight"])


def test_enable_fp8_min_features_and_argument_check():
    stage = _nano_stage()
    swapped = enable_fp8(stage, min_features=100)
    assert swapped and all(min(stage.get_submodule(n).weight.shape) >= 100 for n in swapped)
    assert "layers.0.attn.wkv" not in swapped  # 192 -> head_dim 64
    with pytest.raises(ValueError, match="min_features"):
        enable_fp8(stage, min_features=0)


def test_megatron_tensor_parallel_layers(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    layers = pytest.importorskip("megatron.core.tensor_parallel.layers")
    from megatron.core.model_parallel_config import ModelParallelConfig

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        group = dist.new_group([0])
        cfg = ModelParallelConfig(use_cpu_initialization=True, params_dtype=torch.float32)
        init = lambda w: nn.init.normal_(w, 0.0, 0.05)  # noqa: E731
        model = nn.Module()
        model.linear_fc1 = layers.ColumnParallelLinear(192, 96, config=cfg, init_method=init, bias=True,
                                                       gather_output=False, tp_group=group)
        model.linear_fc2 = layers.RowParallelLinear(96, 64, config=cfg, init_method=init, bias=False,
                                                    input_is_parallel=True, skip_bias_add=False, tp_group=group)
        model.output_layer = layers.ColumnParallelLinear(64, 32, config=cfg, init_method=init, bias=False,
                                                         gather_output=True, tp_group=group)
        keys = list(model.state_dict())
        assert enable_fp8(model) == ["linear_fc1", "linear_fc2"]
        assert list(model.state_dict()) == keys and enable_fp8(model) == []

        x = torch.randn(5, 2, 192, requires_grad=True)  # [S, B, H]
        y, _ = model.linear_fc1(x)
        z, _ = model.linear_fc2(y)
        fc1, fc2 = model.linear_fc1, model.linear_fc2
        y_ref = fp8_linear(x, fc1.weight, fc1.bias)
        torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(z, fp8_linear(y_ref, fc2.weight), rtol=1e-6, atol=1e-6)
        z.sum().backward()
        # the gradients are those of the same two fp8_linear calls on detached copies of the weights
        w1, b1, w2 = (t.detach().clone().requires_grad_() for t in (fc1.weight, fc1.bias, fc2.weight))
        x_ref = x.detach().clone().requires_grad_()
        fp8_linear(fp8_linear(x_ref, w1, b1), w2).sum().backward()
        for got, want in ((x.grad, x_ref.grad), (fc1.weight.grad, w1.grad), (fc1.bias.grad, b1.grad),
                          (fc2.weight.grad, w2.grad)):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    finally:
        dist.destroy_process_group()


def test_fp8_autocast_context_is_a_no_op_off_cuda_and_refuses_cuda_without_te(monkeypatch):
    assert isinstance(fp8_autocast_context(False), contextlib.nullcontext)
    if not torch.cuda.is_available():
        assert isinstance(fp8_autocast_context(True), contextlib.nullcontext)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "transformer_engine", None)  # import fails as if TE were not installed
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", None)
    assert isinstance(fp8_autocast_context(False), contextlib.nullcontext)
    with pytest.raises(RuntimeError, match="train.fp8: FP8 on CUDA needs Transformer Engine"):
        fp8_autocast_context(True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Transformer Engine FP8 needs CUDA")
def test_te_blockwise_autocast_on_gpu():
    te = pytest.importorskip("transformer_engine.pytorch")
    device = torch.device(torch.cuda.current_device())
    torch.manual_seed(7)
    layer = te.Linear(256, 256, bias=False, params_dtype=torch.float32, device=device)
    x = torch.randn(128, 256, device=device, requires_grad=True)
    with fp8_autocast_context(True):
        y = layer(x)
    y.sum().backward()
    y_ref = F.linear(x.detach(), layer.weight.detach())
    assert not torch.equal(y.detach(), y_ref)  # FP8 was active
    torch.testing.assert_close(y.detach(), y_ref, rtol=0.1, atol=0.1 * y_ref.abs().max().item())
    assert layer.weight.grad is not None
