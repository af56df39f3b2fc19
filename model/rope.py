"""Rotary position embedding on the last ``rope_head_dim`` dims, interleaved pairs (spec 3.8).

Pairs are ``(2i, 2i+1)`` of the rotated tail, exactly as OC's ``view_as_complex`` layout; the inverse
rotation (conjugate, "position -t") de-rotates the attention output (spec 3.1). Positions come from
explicit ``position_ids`` so packed documents restart at 0 (our answer to spec 0.1 item 12).

Shape letters: B batch, S sequence, P rotary pairs (rope_head_dim / 2), ... any middle dims.
"""

from __future__ import annotations

import math

import torch

from v4train.model.config import ModelConfig

__all__ = ["rope_frequencies", "layer_rope_frequencies", "rope_angles", "apply_rope"]


def rope_frequencies(
    rope_head_dim: int, theta: float, *, factor: float = 1.0, original_seq_len: int = 0,
    beta_fast: int = 32, beta_slow: int = 1,
) -> torch.Tensor:
    """Per-pair angular frequencies ``[P]`` fp32 (radians per position): theta^(-2i/rope_head_dim).

    With ``original_seq_len > 0`` YaRN blends each frequency towards freq/factor along a linear ramp
    between the correction dims of ``beta_fast`` and ``beta_slow`` (OC ``precompute_freqs_cis``;
    for Flash/Pro: pairs <= 15 unchanged, pairs >= 25 divided by 16, spec 0.1 item 3).
    """
    freqs = 1.0 / (theta ** (torch.arange(0, rope_head_dim, 2, dtype=torch.float32) / rope_head_dim))
    if original_seq_len > 0:
        low, high = _yarn_correction_range(rope_head_dim, theta, original_seq_len, beta_fast, beta_slow)
        if low == high:  # a zero-width ramp would divide by zero; OC widens it the same way
            high += 0.001
        ramp = ((torch.arange(rope_head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        smooth = 1 - ramp
        freqs = freqs / factor * (1 - smooth) + freqs * smooth
    return freqs


def _yarn_correction_range(dim: int, theta: float, original_seq_len: int, beta_fast: int,
                           beta_slow: int) -> tuple[int, int]:
    def correction_dim(num_rotations: float) -> float:
        # the pair index whose wavelength fits num_rotations times into original_seq_len
        return dim * math.log(original_seq_len / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = math.floor(correction_dim(beta_fast))
    high = math.ceil(correction_dim(beta_slow))
    return max(low, 0), min(high, dim - 1)


def layer_rope_frequencies(cfg: ModelConfig, layer_idx: int) -> torch.Tensor:
    """Frequencies ``[P]`` for global layer ``layer_idx``: SWA-only layers (ratio 0) use ``rope_theta``
    without YaRN; compressed layers use ``compress_rope_theta`` with YaRN (spec 3.5, 3.8).

    A compressed layer's window, its compressed entries (RoPE at each block's first token) and its
    indexer all use the same table.
    """
    if cfg.compress_ratios[layer_idx] == 0:
        return rope_frequencies(cfg.rope_head_dim, cfg.rope_theta)
    return rope_frequencies(
        cfg.rope_head_dim, cfg.compress_rope_theta, factor=cfg.rope_factor,
        original_seq_len=cfg.original_seq_len, beta_fast=cfg.beta_fast, beta_slow=cfg.beta_slow,
    )


def rope_angles(position_ids_BS: torch.Tensor, freqs_P: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)``, each ``[B, S, P]`` fp32, of the angles position * freq (positions in tokens)."""
    angles_BSP = position_ids_BS.to(torch.float32).unsqueeze(-1) * freqs_P
    return angles_BSP.cos(), angles_BSP.sin()


def apply_rope(x: torch.Tensor, cos_BSP: torch.Tensor, sin_BSP: torch.Tensor, *, inverse: bool = False) -> torch.Tensor:
    """Rotate the last 2P dims of ``x`` ``[B, S, ..., C]`` by the per-position angles (out of place).

    ``inverse=True`` rotates by the negated angle (OC ``apply_rotary_emb(..., inverse=True)``).
    Returns a tensor of x's shape and dtype; the first C - 2P dims pass through unchanged. The rotation
    is orthogonal, so the backward is the opposite rotation of the gradient: autograd saves only the
    angles (no intermediate products). Angles get no gradient.
    """
    return _Rope.apply(x, cos_BSP, sin_BSP, inverse)


def _rotate(x: torch.Tensor, cos_BSP: torch.Tensor, sin_BSP: torch.Tensor, inverse: bool) -> torch.Tensor:
    n_pairs = cos_BSP.shape[-1]
    view = (*cos_BSP.shape[:2], *([1] * (x.dim() - 3)), n_pairs)
    cos, sin = cos_BSP.view(view), sin_BSP.view(view)
    if inverse:
        sin = -sin
    x_pass, x_rot = x[..., : -2 * n_pairs], x[..., -2 * n_pairs :]
    pairs = x_rot.unflatten(-1, (n_pairs, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)
    return torch.cat((x_pass, rotated.to(x.dtype)), dim=-1)


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos_BSP, sin_BSP, inverse):
        ctx.save_for_backward(cos_BSP, sin_BSP)
        ctx.inverse = inverse
        return _rotate(x, cos_BSP, sin_BSP, inverse)

    @staticmethod
    def backward(ctx, grad):
        cos_BSP, sin_BSP = ctx.saved_tensors
        return _rotate(grad, cos_BSP, sin_BSP, not ctx.inverse), None, None, None
