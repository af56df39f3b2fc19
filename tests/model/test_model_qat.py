"""Quantisation-aware training (``model.qat``) against a straightforward reimplementation of the official
inference code's quantised path (spec 0.1 items 1 and 7; OC ``Attention`` / ``Compressor`` / ``Indexer`` with
``act_quant(kv[..., :-rd], 64, "ue8m0")``, ``rotate_activation`` and ``fp4_act_quant(x, 32)``; OC
``convert.py``'s FP4 -> FP8 cast). The reference below is written from those descriptions, in the official
code's own layout (complex RoPE, an index gather per query, the overlap transform), not with v4train's
modules; only the weights are shared.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from v4train.model.attention import Attention
from v4train.model.config import ModelConfig
from v4train.model.layout import SequenceContext
from v4train.model.quant import pack_fp4, qat_expert_weight, qat_indexer, qat_kv, round_e2m1, unpack_fp4
from v4train.model.rope import layer_rope_frequencies

S, RD = 48, 8


def qat_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=64, dim=64, n_layers=2, mtp_depth=0, compress_ratios=(4, 4), n_heads=2, head_dim=72,
                rope_head_dim=RD, q_lora_rank=32, o_groups=2, o_lora_rank=16, window=8, index_n_heads=16,
                index_head_dim=32, index_topk=3, n_routed_experts=4, n_activated_experts=2, moe_inter_dim=64,
                n_hash_layers=0, qat=True)
    return ModelConfig.preset("nano", **{**base, **overrides})


# ------------------------------------------------------------------ reference quantisers (OC, ue8m0 scales)
def act_quant_ref(x: torch.Tensor, block: int) -> torch.Tensor:
    xb = x.unflatten(-1, (-1, block))
    amax = xb.abs().amax(-1, keepdim=True).clamp(min=1e-4)
    scale = 2.0 ** torch.ceil(torch.log2(amax / 448.0))
    return ((xb / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale).flatten(-2)


def e2m1_ref(v: torch.Tensor) -> torch.Tensor:
    """e2m1 by its definition: 1 mantissa bit, exponent >= 0 (step 0.5 below 2), max 6, ties to even."""
    a = v.abs().clamp(max=6.0)
    step = torch.where(a < 2, torch.full_like(a, 0.5), 2.0 ** (torch.floor(torch.log2(a.clamp(min=2))) - 1))
    return torch.sign(v) * (torch.round(a / step) * step).clamp(max=6.0)


def fp4_quant_ref(x: torch.Tensor, block: int = 32) -> torch.Tensor:
    xb = x.unflatten(-1, (-1, block))
    amax = xb.abs().amax(-1, keepdim=True).clamp(min=6 * 2.0 ** -126)
    scale = 2.0 ** torch.ceil(torch.log2(amax / 6.0))
    return (e2m1_ref(xb / scale) * scale).flatten(-2)


def rotate_ref(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[-1]
    h = torch.tensor([[(-1) ** bin(i & j).count("1") for j in range(n)] for i in range(n)], dtype=x.dtype)
    return x @ h / math.sqrt(n)


# ------------------------------------------------------------------ reference CSA attention layer (OC, prefill)
def rms(x, w, eps=1e-6):
    return w * x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


def rope_ref(x, freqs, positions, inverse=False):
    """OC apply_rotary_emb on the last RD dims: interleaved pairs as complex numbers."""
    angles = positions.float()[:, None] * freqs[None]
    cis = torch.polar(torch.ones_like(angles), -angles if inverse else angles)
    shape = (len(positions),) + (1,) * (x.dim() - 2) + (RD // 2,)
    rot = torch.view_as_real(torch.view_as_complex(x[..., -RD:].unflatten(-1, (-1, 2)).contiguous()) * cis.view(shape))
    return torch.cat((x[..., :-RD], rot.flatten(-2)), -1)


def compress_ref(x, wkv, wgate, ape, norm_w, head_dim, freqs, rotate):
    ratio = 4
    n = x.shape[0] // ratio
    kv = (x @ wkv.t())[: n * ratio].view(n, ratio, 2 * head_dim)
    score = (x @ wgate.t())[: n * ratio].view(n, ratio, 2 * head_dim) + ape
    new_kv = kv.new_zeros(n, 2 * ratio, head_dim)
    new_score = score.new_full((n, 2 * ratio, head_dim), float("-inf"))
    new_kv[:, ratio:], new_score[:, ratio:] = kv[:, :, head_dim:], score[:, :, head_dim:]
    new_kv[1:, :ratio], new_score[1:, :ratio] = kv[:-1, :, :head_dim], score[:-1, :, :head_dim]
    out = rope_ref(rms((new_kv * new_score.softmax(dim=1)).sum(1), norm_w), freqs, torch.arange(n) * ratio)
    if rotate:
        return fp4_quant_ref(rotate_ref(out))
    return torch.cat((act_quant_ref(out[:, :-RD], 64), out[:, -RD:]), -1)


def attention_ref(p: dict, cfg: ModelConfig, x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    H, C, win = cfg.n_heads, cfg.head_dim, cfg.window
    pos = torch.arange(S)
    qr = rms(x @ p["wq_a.weight"].t(), p["q_norm.weight"])
    q = (qr @ p["wq_b.weight"].t()).view(S, H, C)
    q = rope_ref(q * torch.rsqrt(q.square().mean(-1, keepdim=True) + 1e-6), freqs, pos)
    kv = rope_ref(rms(x @ p["wkv.weight"].t(), p["kv_norm.weight"]), freqs, pos)
    kv = torch.cat((act_quant_ref(kv[:, :-RD], 64), kv[:, -RD:]), -1)
    ckv = compress_ref(x, p["compressor.wkv.weight"], p["compressor.wgate.weight"], p["compressor.ape"],
                       p["compressor.norm.weight"], C, freqs, rotate=False)
    # indexer
    E, HI = cfg.index_head_dim, cfg.index_n_heads
    k_i = compress_ref(x, p["indexer.compressor.wkv.weight"], p["indexer.compressor.wgate.weight"],
                       p["indexer.compressor.ape"], p["indexer.compressor.norm.weight"], E, freqs, rotate=True)
    q_i = fp4_quant_ref(rotate_ref(rope_ref((qr @ p["indexer.wq_b.weight"].t()).view(S, HI, E), freqs, pos)))
    weights = (x @ p["indexer.weights_proj.weight"].t()) * E ** -0.5 * HI ** -0.5
    score = (torch.einsum("she,ne->shn", q_i, k_i).relu() * weights[:, :, None]).sum(1)
    n = ckv.shape[0]
    visible = torch.arange(n)[None] < ((pos + 1) // 4)[:, None]
    top = score.masked_fill(~visible, float("-inf")).topk(min(cfg.index_topk, n), dim=-1).indices
    top = torch.where(top >= ((pos + 1) // 4)[:, None], -1, top + S)
    window = (pos[:, None] - win + 1).clamp(min=0) + torch.arange(win)[None]
    window = torch.where(window > pos[:, None], -1, window)
    idx = torch.cat((window, top), -1)
    # sparse attention with the sink (spec 0.1 item 2)
    rows = torch.cat((kv, ckv))[idx.clamp(min=0)]                        # [S, K, C]
    logits = torch.einsum("shc,skc->shk", q, rows) * C ** -0.5
    logits = logits.masked_fill((idx < 0)[:, None], float("-inf"))
    m = logits.amax(-1, keepdim=True)
    e = (logits - m).exp()
    prob = e / (e.sum(-1, keepdim=True) + (p["attn_sink"][None, :, None] - m).exp())
    o = rope_ref(torch.einsum("shk,skc->shc", prob, rows), freqs, pos, inverse=True)
    G, R = cfg.o_groups, cfg.o_lora_rank
    o = torch.einsum("sgi,gri->sgr", o.reshape(S, G, -1), p["wo_a.weight"].view(G, R, -1)).flatten(1)
    return o @ p["wo_b.weight"].t()


def test_qat_attention_matches_the_official_quantised_path():
    cfg = qat_config()
    torch.manual_seed(0)
    attn = Attention(cfg, layer_idx=0)
    with torch.no_grad():
        for q in attn.parameters():
            q.copy_(torch.randn(q.shape) * 0.3)
    attn.eval()
    x = torch.randn(1, S, cfg.dim)
    pos = torch.arange(S).unsqueeze(0)
    with torch.no_grad():
        ours = attn(x, SequenceContext(pos, torch.zeros_like(pos), attention_mode="sparse"))[0]
        params = {k: v.detach() for k, v in attn.named_parameters()}
        ref = attention_ref(params, cfg, x[0], layer_rope_frequencies(cfg, 0))
        off = Attention(qat_config(qat=False), layer_idx=0)
        off.load_state_dict(attn.state_dict())
        unquantised = off(x, SequenceContext(pos, torch.zeros_like(pos), attention_mode="sparse"))[0]
    assert (ours - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert (unquantised - ref).abs().max() > 1e-3 * ref.abs().max()  # the rounding matters at this scale


def test_rounding_grids_and_straight_through_gradients():
    ties = torch.arange(0, 6.25, 0.125)
    assert torch.equal(round_e2m1(ties), e2m1_ref(ties)) and torch.equal(round_e2m1(-ties), e2m1_ref(-ties))
    x = torch.randn(3, 4, 72, requires_grad=True)
    y = qat_kv(x, RD)
    assert torch.equal(y[..., -RD:], x[..., -RD:])
    assert torch.equal(y[..., :-RD], act_quant_ref(x.detach()[..., :-RD], 64))
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # straight-through rounding
    k = torch.randn(5, 32, requires_grad=True)
    assert torch.equal(qat_indexer(k), fp4_quant_ref(rotate_ref(k.detach())))
    qat_indexer(k).sum().backward()
    torch.testing.assert_close(k.grad, rotate_ref(torch.ones(5, 32)))  # d(x H)/dx through the rotation
    assert not ModelConfig.preset("nano").qat  # off by default


def convert_ref(w_fp4_values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """OC convert.py's cast_e2m1fn_to_e4m3fn on logical values (codes x 1x32 scales), dequantised."""
    out_dim, in_dim = w_fp4_values.shape
    codes = w_fp4_values / scales.repeat_interleave(32, -1)
    codes = codes.view(out_dim // 128, 128, in_dim // 128, 128).transpose(1, 2)
    sub = scales.view(out_dim // 128, 128, in_dim // 128, -1).transpose(1, 2).flatten(2)
    tile = sub.amax(-1, keepdim=True) / 2 ** 6
    offset = (sub / tile).unflatten(-1, (128, -1)).repeat_interleave(32, -1)
    fp8 = (codes * offset).to(torch.float8_e4m3fn).float()
    return (fp8 * tile.unsqueeze(-1)).transpose(1, 2).reshape(out_dim, in_dim)


@pytest.mark.parametrize("spread", [1.0, 1e4])
def test_qat_expert_weight_is_the_released_fp4_to_fp8_cast(spread):
    """FP4 in 1x32 tiles, then the converter's FP8 tile scale (max 1x32 scale / 2^6): lossless while a
    128x128 tile's 1x32 scales span at most 2^6; with a wider spread the small tiles lose bits, as they do
    in the released converter."""
    torch.manual_seed(1)
    w = torch.randn(128, 256)
    w[:, :32] /= spread
    w.requires_grad_(True)
    q = qat_expert_weight(w)
    packed, scale = pack_fp4(w.detach())
    fp4 = unpack_fp4(packed, scale)
    assert torch.equal(fp4, fp4_quant_ref(w.detach()))
    assert torch.equal(q, convert_ref(fp4, scale.float()))
    assert torch.equal(q, fp4) == (spread == 1.0)
    q.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_qat_config_checks_the_quantisation_blocks():
    with pytest.raises(ValueError, match="ModelConfig.qat needs head_dim - rope_head_dim"):
        qat_config(head_dim=64)
    with pytest.raises(ValueError, match="index_head_dim"):
        qat_config(index_head_dim=48)


def test_qat_moe_forward_uses_the_cast_weights():
    from v4train.model.moe import SwiGLU

    torch.manual_seed(2)
    expert = SwiGLU(64, 64, 10.0, qat=True)
    x = torch.randn(5, 64)
    w1, w2, w3 = (qat_expert_weight(getattr(expert, n).weight) for n in ("w1", "w2", "w3"))
    expected = F.linear(F.silu(F.linear(x, w1).clamp(max=10)) * F.linear(x, w3).clamp(-10, 10), w2)
    torch.testing.assert_close(expert(x), expected, rtol=0, atol=0)
