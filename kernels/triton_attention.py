"""Triton forward and backward for V4 sparse attention with a sink (spec 3.1, 3.6; OC ``sparse_attn``).

Same semantics as :func:`kernels.reference.sparse_attention`. One program handles one token and a block
of ``BLOCK_H`` heads: the heads share the token's index list, so each gathered block of ``BLOCK_K`` KV
entries feeds one ``[BLOCK_H, D] x [D, BLOCK_K]`` product (the single shared KV head makes the heads
the M dimension of the tensor-core tiles, as in FlashMLA-style decoding kernels).

* Forward: online softmax in base 2 with the sink as the initial running max (m = sink, l = 1,
  acc = 0), so the sink is in the denominator from the start and a row with no valid entry ends at
  acc / l = 0. Stores O and the base-2 log-sum-exp (sink included) for the backward.
* Backward: recomputes P from the LSE; dQ accumulates in registers; dKV (key and value parts summed,
  since kv is both) goes to an fp32 buffer with ``tl.atomic_add``, so the summation order, and the
  last bits of dKV, vary from run to run on a GPU (V4 itself uses per-SM buffers, spec 9). dSink per
  (token, head) is ``-exp(sink - lse) * rowsum(dO * O)``, written out and summed by torch.
* Precision: fp32 accumulation everywhere; bf16 inputs feed the tensor cores (P and dS cast to the
  input dtype before their products, as OC casts P to bf16); fp32 inputs use ``input_precision="ieee"``
  so a GPU reproduces the fp32 reference (CUDA cores: slow, meant for checks). All element-wise math
  is fp32, which the interpreter requires (notes 1.1, bug 2).

Shape letters: B batch, T tokens, H heads, D head dim, N KV entries, K selected entries per token.
Block names: BLOCK_H heads, BLOCK_K entries, BLOCK_D = next power of two >= D (D <= 512).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from v4train.kernels.reference import check_attention_args

__all__ = ["AttentionConfig", "attention_config", "sparse_attention", "INTERPRETED", "MAX_HEAD_DIM"]

INTERPRETED = bool(triton.knobs.runtime.interpret)  # how the @triton.jit below were built
MAX_HEAD_DIM = 512
_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class AttentionConfig:
    """Launch parameters of one kernel: tile sizes and the CUDA launch options."""

    BLOCK_H: int
    BLOCK_K: int
    BLOCK_D: int
    num_warps: int
    num_stages: int
    heads_fastest: bool = False  # launch order: a token's head blocks back to back (they share its KV gather)


def attention_config(H: int, D: int, dtype: torch.dtype, backward: bool = False) -> AttentionConfig:
    """Tile sizes for head count H and head dim D: about 8K fp32 accumulator elements per program.

    BLOCK_H is at least 16 (the smallest tensor-core M); heads past H are masked. Chosen so the
    sm_90 compile of every forward kernel has no register spill (checked by ``kernels.compile_check``).
    """
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head dim D={D} outside [1, {MAX_HEAD_DIM}]")
    BLOCK_D = max(16, triton.next_power_of_2(D))
    BLOCK_H = max(16, min(triton.next_power_of_2(H), 64, 8192 // BLOCK_D))
    wide = dtype == torch.float32
    if backward:
        BLOCK_K = 16 if BLOCK_D >= 256 or wide else 32
        return AttentionConfig(BLOCK_H, BLOCK_K, BLOCK_D, num_warps=8 if BLOCK_D >= 256 else 4, num_stages=1)
    BLOCK_K = 32 if BLOCK_D >= 256 or wide else 64
    return AttentionConfig(BLOCK_H, BLOCK_K, BLOCK_D, num_warps=4 if BLOCK_D <= 128 else 8, num_stages=2)


@triton.jit
def _program(T, H: tl.constexpr, BLOCK_H: tl.constexpr, HEADS_FASTEST: tl.constexpr):
    """(token, head block) of this program. Axis 0 enumerates T * HB programs (HB = cdiv(H, BLOCK_H)): the
    grid's x axis is the only one that holds 64k+ tokens. ``HEADS_FASTEST`` runs a token's head blocks next
    to each other, so their identical KV gathers meet in L2; otherwise consecutive tokens (whose windows
    overlap) run next to each other."""
    HB: tl.constexpr = (H + BLOCK_H - 1) // BLOCK_H
    pid = tl.program_id(0).to(tl.int64)
    if HEADS_FASTEST:
        return pid // HB, (pid % HB).to(tl.int32)
    return pid % T, (pid // T).to(tl.int32)


@triton.jit
def _sparse_attn_fwd(
    Q, KV, SINK, IDX, O, LSE, T, N, K, scale_log2e,
    H: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr, HEADS_FASTEST: tl.constexpr,
):
    """Grid (T * cdiv(H, BLOCK_H), B), see :func:`_program`. Q, O [B,T,H,D]; KV [B,N,D]; SINK [H] fp32;
    IDX [B,T,K] int32; LSE [B,T,H] fp32 (base 2, sink included)."""
    t, hb = _program(T, H, BLOCK_H, HEADS_FASTEST)
    b = tl.program_id(1).to(tl.int64)
    row = b * T + t
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask_h = offs_h < H
    mask_d = offs_d < D
    mask_hd = mask_h[:, None] & mask_d[None, :]
    q = tl.load(Q + row * (H * D) + offs_h[:, None] * D + offs_d[None, :], mask=mask_hd, other=0.0)
    m_i = tl.load(SINK + offs_h, mask=mask_h, other=0.0).to(tl.float32) * 1.4426950408889634
    l_i = tl.full([BLOCK_H], 1.0, tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    kv_base = KV + b * N * D
    idx_base = IDX + row * K
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        idx = tl.load(idx_base + offs_k, mask=offs_k < K, other=-1)
        valid = (idx >= 0) & (idx < N)
        kv = tl.load(kv_base + idx.to(tl.int64)[:, None] * D + offs_d[None, :],
                     mask=valid[:, None] & mask_d[None, :], other=0.0)
        s = tl.dot(q, tl.trans(kv), input_precision=DOT_PREC) * scale_log2e
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(kv.dtype), kv, input_precision=DOT_PREC)
        m_i = m_new
    o = acc / l_i[:, None]
    tl.store(O + row * (H * D) + offs_h[:, None] * D + offs_d[None, :], o.to(O.dtype.element_ty), mask=mask_hd)
    tl.store(LSE + row * H + offs_h, m_i + tl.log2(l_i), mask=mask_h)


@triton.jit
def _sparse_attn_bwd(
    Q, KV, SINK, IDX, O, DO, LSE, DQ, DKV, DSINK, T, N, K, scale, scale_log2e,
    H: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr, HEADS_FASTEST: tl.constexpr,
):
    """Grid (T * cdiv(H, BLOCK_H), B), see :func:`_program`. DQ [B,T,H,D] (q dtype); DKV [B,N,D] fp32,
    accumulated with atomics; DSINK [B,T,H] fp32 per-token sink gradients (summed over B, T by the caller)."""
    t, hb = _program(T, H, BLOCK_H, HEADS_FASTEST)
    b = tl.program_id(1).to(tl.int64)
    row = b * T + t
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask_h = offs_h < H
    mask_d = offs_d < D
    mask_hd = mask_h[:, None] & mask_d[None, :]
    hd_offs = row * (H * D) + offs_h[:, None] * D + offs_d[None, :]
    q = tl.load(Q + hd_offs, mask=mask_hd, other=0.0)
    do = tl.load(DO + hd_offs, mask=mask_hd, other=0.0)
    o = tl.load(O + hd_offs, mask=mask_hd, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)                 # rowsum(dO * O), [BLOCK_H]
    lse = tl.load(LSE + row * H + offs_h, mask=mask_h, other=0.0)
    sink2 = tl.load(SINK + offs_h, mask=mask_h, other=0.0).to(tl.float32) * 1.4426950408889634
    tl.store(DSINK + row * H + offs_h, -tl.exp2(sink2 - lse) * delta, mask=mask_h)
    dq = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    kv_base = KV + b * N * D
    dkv_base = DKV + b * N * D
    idx_base = IDX + row * K
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        idx = tl.load(idx_base + offs_k, mask=offs_k < K, other=-1)
        valid = (idx >= 0) & (idx < N)
        kv_offs = idx.to(tl.int64)[:, None] * D + offs_d[None, :]
        mask_kd = valid[:, None] & mask_d[None, :]
        kv = tl.load(kv_base + kv_offs, mask=mask_kd, other=0.0)
        s = tl.dot(q, tl.trans(kv), input_precision=DOT_PREC) * scale_log2e
        p = tl.exp2(s - lse[:, None])
        p = tl.where(valid[None, :] & mask_h[:, None], p, 0.0)
        dp = tl.dot(do, tl.trans(kv), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])                                        # dL/dz, z = scale * q.k
        dq += tl.dot(ds.to(kv.dtype), kv, input_precision=DOT_PREC)
        dkv = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)
        dkv += tl.dot(tl.trans((ds * scale).to(q.dtype)), q, input_precision=DOT_PREC)
        tl.atomic_add(dkv_base + kv_offs, dkv, mask=mask_kd)
    tl.store(DQ + hd_offs, (dq * scale).to(DQ.dtype.element_ty), mask=mask_hd)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


class _SparseAttention(torch.autograd.Function):
    """Autograd wrapper: forward and backward kernels; gradients for q, kv and attn_sink."""

    @staticmethod
    def forward(ctx, q, kv, attn_sink, indices, scale, fwd_config, bwd_config):
        B, T, H, D, N, K = check_attention_args(q, kv, attn_sink, indices)
        q, kv = q.contiguous(), kv.contiguous()
        sink = attn_sink.detach().float().contiguous()
        idx = indices.to(torch.int32).contiguous()
        o = torch.empty_like(q)
        lse = torch.empty(B, T, H, dtype=torch.float32, device=q.device)
        if B * T > 0:
            cfg = fwd_config or attention_config(H, D, q.dtype)
            _sparse_attn_fwd[(T * triton.cdiv(H, cfg.BLOCK_H), B)](
                q, kv, sink, idx, o, lse, T, N, K, float(scale) * _LOG2E,
                H=H, D=D, BLOCK_H=cfg.BLOCK_H, BLOCK_K=cfg.BLOCK_K, BLOCK_D=cfg.BLOCK_D,
                DOT_PREC=_dot_precision(q.dtype), HEADS_FASTEST=cfg.heads_fastest,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
        ctx.save_for_backward(q, kv, sink, idx, o, lse)
        ctx.scale = float(scale)
        ctx.sink_dtype = attn_sink.dtype
        ctx.bwd_config = bwd_config
        return o

    @staticmethod
    def backward(ctx, do):
        q, kv, sink, idx, o, lse = ctx.saved_tensors
        B, T, H, D = q.shape
        N, K = kv.shape[1], idx.shape[2]
        do = do.to(q.dtype).contiguous()
        dq = torch.empty_like(q)
        dkv = torch.zeros(B, N, D, dtype=torch.float32, device=q.device)
        dsink = torch.empty(B, T, H, dtype=torch.float32, device=q.device)
        if B * T > 0:
            cfg = ctx.bwd_config or attention_config(H, D, q.dtype, backward=True)
            _sparse_attn_bwd[(T * triton.cdiv(H, cfg.BLOCK_H), B)](
                q, kv, sink, idx, o, do, lse, dq, dkv, dsink, T, N, K, ctx.scale, ctx.scale * _LOG2E,
                H=H, D=D, BLOCK_H=cfg.BLOCK_H, BLOCK_K=cfg.BLOCK_K, BLOCK_D=cfg.BLOCK_D,
                DOT_PREC=_dot_precision(q.dtype), HEADS_FASTEST=cfg.heads_fastest,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )
        return dq, dkv.to(kv.dtype), dsink.sum((0, 1)).to(ctx.sink_dtype), None, None, None, None


def sparse_attention(q: torch.Tensor, kv: torch.Tensor, attn_sink: torch.Tensor, indices: torch.Tensor,
                     scale: float, *, fwd_config: AttentionConfig | None = None,
                     bwd_config: AttentionConfig | None = None) -> torch.Tensor:
    """Triton path of :func:`kernels.reference.sparse_attention` (same arguments, result and errors).

    ``fwd_config`` / ``bwd_config`` replace :func:`attention_config`'s launch parameters (the tuning sweep
    ``benchmarks/sparse_attention_configs.py`` compares them); None keeps the defaults.
    """
    return _SparseAttention.apply(q, kv, attn_sink, indices, scale, fwd_config, bwd_config)
