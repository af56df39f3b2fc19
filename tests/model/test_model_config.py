"""ModelConfig: presets (spec 1, 10.1), validation messages, dict round trip; RoPE tables (spec 3.8)."""

import json

import pytest
import torch

from v4train.model.config import PRESET_NAMES, ModelConfig
from v4train.model.rope import apply_rope, layer_rope_frequencies, rope_angles, rope_frequencies


def test_presets_round_trip_through_json():
    assert PRESET_NAMES == ("nano", "small", "flash", "pro")
    for name in PRESET_NAMES:
        cfg = ModelConfig.preset(name)
        assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_flash_and_pro_official_values():
    flash = ModelConfig.preset("flash")
    assert (flash.dim, flash.n_layers, flash.n_heads, flash.head_dim, flash.q_lora_rank) == (4096, 43, 64, 512, 1024)
    assert (flash.o_groups, flash.o_lora_rank, flash.index_topk, flash.moe_inter_dim) == (8, 1024, 512, 2048)
    assert (flash.n_routed_experts, flash.n_activated_experts, flash.route_scale) == (256, 6, 1.5)
    # Flash: SWA at layers 0-1, 21 CSA, 20 HCA, MTP SWA (spec 3.7)
    ratios = flash.compress_ratios
    assert ratios[:2] == (0, 0) and ratios[-2:] == (4, 0)
    assert (ratios.count(4), ratios.count(128), ratios.count(0)) == (21, 20, 3)
    pro = ModelConfig.preset("pro")
    assert (pro.dim, pro.n_layers, pro.n_heads, pro.q_lora_rank, pro.o_groups) == (7168, 61, 128, 1536, 16)
    assert (pro.n_routed_experts, pro.moe_inter_dim, pro.route_scale, pro.index_topk) == (384, 3072, 2.5, 1024)
    assert (pro.compress_ratios.count(4), pro.compress_ratios.count(128), len(pro.compress_ratios)) == (30, 31, 62)
    for cfg in (flash, pro):
        shared = (cfg.vocab_size, cfg.window, cfg.rope_head_dim, cfg.n_hash_layers, cfg.swiglu_limit)
        assert shared == (129280, 128, 64, 3, 10.0)
        assert (cfg.hc_mult, cfg.hc_sinkhorn_iters, cfg.hc_eps) == (4, 20, 1e-6)
        assert (cfg.compress_rope_theta, cfg.rope_factor, cfg.original_seq_len) == (160000.0, 16.0, 65536)


def test_nano_matches_spec_10_1():
    nano = ModelConfig.preset("nano")
    assert nano.compress_ratios == (0, 4, 32, 4, 0)
    assert (nano.dim, nano.n_heads, nano.head_dim, nano.rope_head_dim, nano.window) == (192, 4, 64, 16, 32)
    assert (nano.n_routed_experts, nano.n_activated_experts, nano.n_shared_experts, nano.n_hash_layers) == (8, 2, 1, 1)


@pytest.mark.parametrize("overrides, field", [
    (dict(o_groups=3), "o_groups"),
    (dict(rope_head_dim=15), "rope_head_dim"),
    (dict(rope_head_dim=128), "rope_head_dim"),
    (dict(n_activated_experts=9), "n_activated_experts"),
    (dict(n_layers=6), "compress_ratios"),
    (dict(compress_ratios=(0, 4, -1, 4, 0)), "compress_ratios"),
    (dict(n_hash_layers=5), "n_hash_layers"),
    (dict(dim=0), "dim"),
    (dict(window=2.5), "window"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(n_heads=True), "n_heads"),
])
def test_validation_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}\b"):
        ModelConfig.preset("nano", **overrides)


def test_unknown_keys_and_presets_are_named():
    with pytest.raises(ValueError, match="bogus_field"):
        ModelConfig.preset("nano", bogus_field=1)
    with pytest.raises(ValueError, match="'huge'.*nano, small, flash, pro"):
        ModelConfig.preset("huge")
    d = ModelConfig.preset("nano").to_dict()
    del d["dim"]
    with pytest.raises(ValueError, match="missing field.*dim"):
        ModelConfig.from_dict(d)


def test_list_override_from_yaml_is_accepted():
    cfg = ModelConfig.preset("nano", n_layers=2, compress_ratios=[0, 0, 0])
    assert cfg.compress_ratios == (0, 0, 0) and cfg.n_layers == 2


def test_yarn_ramp_matches_spec_0_1_item_3():
    cfg = ModelConfig.preset("flash")
    plain = rope_frequencies(64, 160000.0)
    yarn = layer_rope_frequencies(cfg, 2)  # a CSA layer
    torch.testing.assert_close(yarn[:16], plain[:16], rtol=0, atol=0)
    torch.testing.assert_close(yarn[25:], plain[25:] / 16, rtol=1e-6, atol=0)
    smooth_20 = 1 - (20 - 15) / (25 - 15)
    torch.testing.assert_close(yarn[20], plain[20] / 16 * (1 - smooth_20) + plain[20] * smooth_20)
    # SWA layers: theta 10000, no YaRN
    torch.testing.assert_close(layer_rope_frequencies(cfg, 0), 1.0 / 10000.0 ** (torch.arange(0, 64, 2) / 64.0))


def test_rope_rotates_interleaved_pairs_of_the_tail():
    freqs = torch.tensor([0.5, 0.25])
    position_ids = torch.tensor([[3]])
    cos, sin = rope_angles(position_ids, freqs)
    x = torch.tensor([[[7.0, -1.0, 1.0, 0.0, 0.0, 2.0]]])  # [B=1, S=1, C=6], tail pairs (1,0), (0,2)
    y = apply_rope(x, cos, sin)
    a0, a1 = torch.tensor(1.5), torch.tensor(0.75)
    expected = torch.tensor([[[7.0, -1.0, a0.cos(), a0.sin(), -2 * a1.sin(), 2 * a1.cos()]]])
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(apply_rope(y, cos, sin, inverse=True), x)


def test_rope_backward_is_the_opposite_rotation():
    freqs = rope_frequencies(8, 10000.0)
    cos, sin = rope_angles(torch.tensor([[0, 5, 9]]), freqs)
    x = torch.randn(1, 3, 2, 12, dtype=torch.float64, requires_grad=True)
    for inverse in (False, True):
        def rotate(t, inverse=inverse):
            return apply_rope(t, cos.double(), sin.double(), inverse=inverse)

        assert torch.autograd.gradcheck(rotate, (x,))


def test_rmsnorm_backward_matches_autograd_of_the_formula():
    from v4train.model.norm import RMSNorm, _RMSNorm

    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    w = torch.linspace(0.5, 2.0, 6, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda t, v: _RMSNorm.apply(t, v, 1e-6), (x, w))
    norm = RMSNorm(6, 1e-6).double()
    with torch.no_grad():
        norm.weight.copy_(w)
    torch.testing.assert_close(norm(x), torch.nn.functional.rms_norm(x, (6,), w, 1e-6))
