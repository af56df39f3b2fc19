"""FP8 (e4m3) / FP4 (e2m1) numerics of DeepSeek-V4: released weight formats and quantisation-aware training.

Rounding (spec 0.1 item 1; OC ``act_quant`` / ``fp4_act_quant`` with ``scale_fmt="ue8m0"``): a block's
scale is a power of two, ``s = 2^ceil(log2(max(amax, floor) / max_code))`` with max_code 448 (e4m3,
floor 1e-4) or 6 (e2m1, floor 6 * 2^-126); the value is ``round(x / s) * s`` with round-to-nearest-even
onto the format's grid (the block's largest value lands on the grid's top, never beyond it).

Released weights (spec 1, 0.1 item 9; OC ``convert.py``):

- FP8 linears: e4m3 weight ``[out, in]`` and a ue8m0 (``float8_e8m0fnu``) scale ``[ceil(out/128),
  ceil(in/128)]``; value = weight * scale of its 128x128 block.
- FP4 routed experts: e2m1 codes packed two per int8 byte along ``in`` (low nibble = even column) and a
  ue8m0 scale ``[out, in/32]`` per 1x32 tile.
- :func:`fp4_to_fp8`: the converter's lossless FP4 -> FP8 cast. Each 128x128 tile gets the scale
  ``max(its 1x32 scales) / 2^6`` and every element becomes ``code * (its 1x32 scale / tile scale)`` in
  e4m3, exact while a tile's 1x32 scales span at most 2^6 (6 * 2^6 = 384 < 448).

Quantisation-aware training (``ModelConfig.qat``; spec 0.1 items 1 and 7, section 7 "Precision"), all
with straight-through gradients (the backward is the identity):

- :func:`qat_kv`: FP8 rounding of a KV entry's non-RoPE dims in blocks of 64 (window and compressed
  entries; the RoPE dims stay unrounded);
- :func:`qat_indexer`: the Hadamard rotation, then FP4 rounding in blocks of 32, of the indexer's
  queries and compressed keys (the rotation is orthogonal, so scores are unchanged in full precision);
- :func:`qat_expert_weight`: a routed expert's weight rounded to FP4 in 1x32 tiles, then cast to FP8
  by :func:`fp4_to_fp8`'s rule and dequantised: what the released converter feeds the FP8 GEMM.

Shape letters: O out features, I in features, ... any leading dims, C last dim.
"""

from __future__ import annotations

import torch

__all__ = [
    "E4M3_MAX", "E2M1_MAX", "FP8_BLOCK", "FP4_BLOCK", "round_e4m3", "round_e2m1", "pow2_scale",
    "fake_quant_fp8", "fake_quant_fp4", "hadamard", "quantize_fp8_blocks", "dequantize_fp8_blocks",
    "pack_fp4", "unpack_fp4", "fp4_to_fp8", "qat_kv", "qat_indexer", "qat_expert_weight",
]

E4M3_MAX, E2M1_MAX = 448.0, 6.0
FP8_BLOCK, FP4_BLOCK = 128, 32
KV_BLOCK = 64
_FP8_FLOOR, _FP4_FLOOR = 1e-4, 6.0 * 2.0 ** -126
MAX_OFFSET_BITS = 6  # fp4_to_fp8: 6 * 2^6 = 384 < 448
# e2m1 magnitudes by code 0..7 (code 8..15 are the negatives)
_E2M1_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
_E2M1_TABLE = torch.cat((_E2M1_GRID, -_E2M1_GRID))


def round_e4m3(x: torch.Tensor) -> torch.Tensor:
    """x rounded to the nearest e4m3 value (ties to even), as fp32; |x| <= 448 expected."""
    return x.float().to(torch.float8_e4m3fn).float()


def _e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """e2m1 codes (0..15, sign in bit 3) of x, round-to-nearest-even; |x| <= 6 expected."""
    grid = _E2M1_GRID.to(x.device)
    mag = x.float().abs().clamp(max=E2M1_MAX)
    hi = torch.bucketize(mag, grid).clamp(max=7)  # first grid point >= mag
    lo = (hi - 1).clamp(min=0)
    d_lo, d_hi = mag - grid[lo], grid[hi] - mag
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))  # a tie goes to the even mantissa
    code = torch.where(pick_hi, hi, lo)
    return code + 8 * ((x < 0) & (code > 0)).to(code.dtype)


def _e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    return _E2M1_TABLE.to(codes.device)[codes.long()]


def round_e2m1(x: torch.Tensor) -> torch.Tensor:
    """x rounded to the nearest e2m1 value (ties to even), as fp32; |x| <= 6 expected."""
    return _e2m1_values(_e2m1_codes(x))


def pow2_scale(amax: torch.Tensor, max_code: float) -> torch.Tensor:
    """The ue8m0 block scale 2^ceil(log2(max(amax, floor) / max_code)) (fp32), floor per format (spec 0.1
    item 1): 1e-4 for e4m3 (max_code 448), 6 * 2^-126 for e2m1 (max_code 6)."""
    floor = _FP8_FLOOR if max_code == E4M3_MAX else _FP4_FLOOR
    return torch.exp2(torch.ceil(torch.log2(amax.float().clamp(min=floor) / max_code)))


def _blockwise(x: torch.Tensor, block: int, max_code: float, rounder) -> torch.Tensor:
    if x.shape[-1] % block:
        raise ValueError(f"last dim {x.shape[-1]} is not a multiple of the {block}-element quantisation block")
    blocks = x.float().unflatten(-1, (-1, block))
    scale = pow2_scale(blocks.abs().amax(-1, keepdim=True), max_code)
    return (rounder((blocks / scale).clamp(-max_code, max_code)) * scale).flatten(-2).to(x.dtype)


def fake_quant_fp8(x: torch.Tensor, block: int) -> torch.Tensor:
    """``[..., C]`` rounded to e4m3 with a power-of-two scale per ``block`` elements of the last dim."""
    return _blockwise(x, block, E4M3_MAX, round_e4m3)


def fake_quant_fp4(x: torch.Tensor, block: int = FP4_BLOCK) -> torch.Tensor:
    """``[..., C]`` rounded to e2m1 with a power-of-two scale per ``block`` elements of the last dim."""
    return _blockwise(x, block, E2M1_MAX, round_e2m1)


def _hadamard_matrix(n: int, device, dtype) -> torch.Tensor:
    if n & (n - 1):
        raise ValueError(f"the Hadamard rotation needs a power-of-two dim, got {n}")
    h = torch.ones(1, 1, device=device, dtype=dtype)
    while h.shape[0] < n:  # Sylvester: [[H, H], [H, -H]]
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h * n ** -0.5


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """The normalised Walsh-Hadamard transform of the last dim (OC ``rotate_activation``); orthogonal
    and symmetric, so it is its own inverse."""
    return x @ _hadamard_matrix(x.shape[-1], x.device, x.dtype)


# ------------------------------------------------------------------ released storage formats
def quantize_fp8_blocks(w_OI: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(e4m3 weight [O, I], ue8m0 scale [ceil(O/128), ceil(I/128)])`` of a weight, one power-of-two
    scale per 128x128 block (edge blocks partial)."""
    n_out, n_in = w_OI.shape
    b = FP8_BLOCK
    pad = torch.zeros(-(-n_out // b) * b, -(-n_in // b) * b, dtype=torch.float32, device=w_OI.device)
    pad[:n_out, :n_in] = w_OI.float()
    tiles = pad.view(pad.shape[0] // b, b, pad.shape[1] // b, b)
    scale = pow2_scale(tiles.abs().amax(dim=(1, 3)), E4M3_MAX)
    q = (tiles / scale[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).view_as(pad)[:n_out, :n_in]
    return q.to(torch.float8_e4m3fn), scale.to(torch.float8_e8m0fnu)


def dequantize_fp8_blocks(q_OI: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fp32 ``[O, I]`` of an e4m3 weight and its 128x128 block scale (exact: e4m3 x 2^k is an fp32)."""
    n_out, n_in = q_OI.shape
    s = scale.float().repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)[:n_out, :n_in]
    return q_OI.float() * s


def pack_fp4(w_OI: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(int8 [O, I/2] packed e2m1 codes, low nibble first, ue8m0 scale [O, I/32])`` of a weight."""
    blocks = w_OI.float().unflatten(-1, (-1, FP4_BLOCK))
    scale = pow2_scale(blocks.abs().amax(-1, keepdim=True), E2M1_MAX)
    codes = _e2m1_codes((blocks / scale).clamp(-E2M1_MAX, E2M1_MAX)).flatten(-2).to(torch.uint8)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    return packed.view(torch.int8), scale.squeeze(-1).to(torch.float8_e8m0fnu)


def unpack_fp4(packed_OH: torch.Tensor, scale_OB: torch.Tensor) -> torch.Tensor:
    """fp32 ``[O, 2H]`` of packed e2m1 codes and their 1x32 scales (exact)."""
    u = packed_OH.view(torch.uint8).long()
    codes = torch.stack((u & 0x0F, u >> 4), dim=-1).flatten(-2)
    return _e2m1_values(codes) * scale_OB.float().repeat_interleave(FP4_BLOCK, -1)


def fp4_to_fp8(packed_OH: torch.Tensor, scale_OB: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The released converter's FP4 -> FP8 cast: ``(e4m3 [O, I], ue8m0 scale [O/128, I/128])``.

    Raises ValueError unless O and I are multiples of 128 (the converter's tiles).
    """
    n_out, n_in = packed_OH.shape[0], 2 * packed_OH.shape[1]
    b = FP8_BLOCK
    if n_out % b or n_in % b:
        raise ValueError(f"fp4_to_fp8: a [{n_out}, {n_in}] weight does not tile into 128x128 blocks")
    u = packed_OH.view(torch.uint8).long()
    codes = _e2m1_values(torch.stack((u & 0x0F, u >> 4), dim=-1).flatten(-2))
    tiles = codes.view(n_out // b, b, n_in // b, b).transpose(1, 2)  # [bo, bi, 128, 128]
    sub = scale_OB.float().view(n_out // b, b, n_in // b, -1).transpose(1, 2)  # [bo, bi, 128, 4]
    tile_scale = sub.amax(dim=(-1, -2), keepdim=True) / 2 ** MAX_OFFSET_BITS
    offset = (sub / tile_scale).repeat_interleave(FP4_BLOCK, -1)
    q = (tiles * offset).transpose(1, 2).reshape(n_out, n_in)
    return q.to(torch.float8_e4m3fn), tile_scale.view(n_out // b, n_in // b).to(torch.float8_e8m0fnu)


# ------------------------------------------------------------------ quantisation-aware training
class _StraightThrough(torch.autograd.Function):
    """y = quantised(x) in the forward, dy/dx = identity in the backward."""

    @staticmethod
    def forward(ctx, x, fn):
        return fn(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def qat_kv(kv: torch.Tensor, rope_head_dim: int) -> torch.Tensor:
    """``[..., C]`` KV entries with the first C - rope_head_dim dims FP8-rounded per 64 (straight-through)."""
    nope = kv.shape[-1] - rope_head_dim
    rounded = _StraightThrough.apply(kv[..., :nope], lambda t: fake_quant_fp8(t, KV_BLOCK))
    return torch.cat((rounded, kv[..., nope:]), dim=-1)


def qat_indexer(x: torch.Tensor) -> torch.Tensor:
    """Indexer queries or keys ``[..., E]``: Hadamard-rotated, then FP4-rounded per 32 (straight-through
    through the rounding; the rotation is differentiated exactly)."""
    return _StraightThrough.apply(hadamard(x), fake_quant_fp4)


def _expert_fp8(w: torch.Tensor) -> torch.Tensor:
    """FP4 (1x32) then the converter's FP8 cast, dequantised; weights not tiling into 128x128 blocks
    (small test models) keep the FP4 values, which the cast would represent exactly."""
    packed, scale = pack_fp4(w)
    n_out, n_in = w.shape
    if n_out % FP8_BLOCK or n_in % FP8_BLOCK:
        return unpack_fp4(packed, scale).to(w.dtype)
    return dequantize_fp8_blocks(*fp4_to_fp8(packed, scale)).to(w.dtype)


def qat_expert_weight(w_OI: torch.Tensor) -> torch.Tensor:
    """A routed expert's weight as inference computes with it (module docstring), straight-through."""
    return _StraightThrough.apply(w_OI, _expert_fp8)
