"""Triton Lightning Indexer: scores over the visible compressed entries, then exact top-k (spec 3.3).

Same semantics as :func:`kernels.reference.indexer_topk`. Two kernels per chunk of query rows, with
the scores kept in an fp32 scratch buffer that never leaves the op (at most ``SCRATCH_ELEMS``
elements; long sequences run in row chunks):

1. ``_indexer_scores``: one program per ``BLOCK_T`` tokens. Their ``BLOCK_T * HI`` query rows form the
   M side of one ``[M, DI] x [DI, BLOCK_N]`` product per block of keys; ReLU, then the weighted sum
   over heads; only blocks inside the tile's visible range are computed, only visible cells stored.
2. ``_indexer_select``: one program per token. Exact radix select of the KK-th largest score on an
   order-preserving uint32 key (4 passes of 8 bits, ``tl.histogram``), then one pass that takes every
   score above it plus the first ties in index order, compacted with ``tl.cumsum`` into increasing
   index order; the slots left are ``-1`` / ``-inf``. Rows with at most KK visible entries skip the
   radix passes and take them all. Ties therefore go to the lower index, and -0.0 keys as +0.0: the
   contract of :func:`kernels.reference.select_topk`.

All arithmetic is fp32 (bf16 is only loaded and fed to ``tl.dot``), as the interpreter requires.

Shape letters: B batch, T query tokens, HI indexer heads, DI indexer head dim, NC compressed entries,
KK = min(topk, NC) picks per token, TC rows in one chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from v4train.kernels.reference import IndexerTopK, check_indexer_args, resolve_bounds

__all__ = ["IndexerConfig", "indexer_config", "indexer_topk", "INTERPRETED", "SCRATCH_ELEMS"]

INTERPRETED = bool(triton.knobs.runtime.interpret)  # how the @triton.jit below were built
SCRATCH_ELEMS = 1 << 28  # fp32 score cells per chunk (1 GiB)


@dataclass(frozen=True)
class IndexerConfig:
    """Tile sizes and launch options of the two indexer kernels."""

    BLOCK_T: int
    BLOCK_HI: int
    BLOCK_DI: int
    BLOCK_N: int
    SELECT_BLOCK: int
    num_warps: int


def indexer_config(HI: int, DI: int, dtype: torch.dtype) -> IndexerConfig:
    """About 64 query rows (tokens x heads) per scores program; 1024-wide chunks in the select kernel.

    fp32 inputs (CUDA-core ``ieee`` products) take narrower key blocks on 8 warps: the bf16 tiling
    spills there on sm_90 (``kernels.compile_check``)."""
    BLOCK_HI = triton.next_power_of_2(HI)
    BLOCK_T = max(1, 64 // BLOCK_HI)
    BLOCK_DI = max(16, triton.next_power_of_2(DI))
    wide = dtype == torch.float32
    return IndexerConfig(BLOCK_T, BLOCK_HI, BLOCK_DI, BLOCK_N=32 if wide else 64, SELECT_BLOCK=1024,
                         num_warps=8 if wide else 4)


@triton.jit
def _indexer_scores(
    Q, KI, W, START, END, S, T, t_begin, TC, NC,
    HI: tl.constexpr, DI: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_HI: tl.constexpr,
    BLOCK_DI: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Grid (cdiv(TC, BLOCK_T), B). Q [B,T,HI,DI]; KI [B,NC,DI]; W [B,T,HI]; START/END [B,T] int32;
    S [B,TC,NC] fp32 scratch for rows t_begin .. t_begin+TC-1 (visible cells only)."""
    tb = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_T * BLOCK_HI)
    loc_m = tb * BLOCK_T + offs_m // BLOCK_HI                 # row within the chunk, per query row
    h_m = offs_m % BLOCK_HI
    offs_d = tl.arange(0, BLOCK_DI)
    mask_m = (loc_m < TC) & (h_m < HI)
    tok_m = (b * T + t_begin + loc_m).to(tl.int64)
    q = tl.load(Q + tok_m[:, None] * (HI * DI) + h_m[:, None] * DI + offs_d[None, :],
                mask=mask_m[:, None] & (offs_d[None, :] < DI), other=0.0)
    loc_t = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = loc_t < TC
    tok_t = (b * T + t_begin + loc_t).to(tl.int64)
    offs_h = tl.arange(0, BLOCK_HI)
    w = tl.load(W + tok_t[:, None] * HI + offs_h[None, :], mask=mask_t[:, None] & (offs_h[None, :] < HI),
                other=0.0).to(tl.float32)
    start = tl.load(START + tok_t, mask=mask_t, other=NC)
    end = tl.load(END + tok_t, mask=mask_t, other=0)
    lo = (tl.min(start, 0) // BLOCK_N) * BLOCK_N
    hi = tl.max(end, 0)
    s_rows = S + (b * TC + loc_t)[:, None] * NC
    k_base = KI + b * NC * DI
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k = tl.load(k_base + offs_n.to(tl.int64)[:, None] * DI + offs_d[None, :],
                    mask=(offs_n[:, None] < NC) & (offs_d[None, :] < DI), other=0.0)
        qk = tl.maximum(tl.dot(q, tl.trans(k), input_precision=DOT_PREC), 0.0)   # [M, BLOCK_N]
        qk3 = tl.reshape(qk, [BLOCK_T, BLOCK_HI, BLOCK_N])
        score = tl.sum(qk3 * w[:, :, None], 1)                                   # [BLOCK_T, BLOCK_N]
        vis = (offs_n[None, :] >= start[:, None]) & (offs_n[None, :] < end[:, None]) & mask_t[:, None]
        tl.store(s_rows + offs_n[None, :], score, mask=vis)


@triton.jit
def _order_key(x):
    """fp32 -> uint32 whose unsigned order is the float order (-0 first mapped to +0). Visible scores
    map above 0x007FFFFF, so key 0 is below all of them."""
    x = tl.where(x == 0.0, 0.0, x)
    u = x.to(tl.uint32, bitcast=True)
    return tl.where((u >> 31) == 1, ~u, u | 0x80000000)


@triton.jit
def _radix_pass(srow, start, end, prefix, rem, SHIFT: tl.constexpr, PMASK: tl.constexpr, BLOCK: tl.constexpr):
    """One 8-bit digit of the radix select: among keys whose bits above SHIFT+8 equal prefix's (PMASK),
    find the digit holding the rem-th largest; returns the extended prefix and the rank left inside it."""
    hist = tl.zeros([256], dtype=tl.int32)
    for n0 in range(start, end, BLOCK):
        offs = n0 + tl.arange(0, BLOCK)
        inside = offs < end
        key = _order_key(tl.load(srow + offs, mask=inside, other=0.0))
        match = inside & ((key & PMASK) == prefix)
        digit = ((key >> SHIFT) & 0xFF).to(tl.int32)
        hist += tl.histogram(digit, 256, mask=match)
    bins = tl.arange(0, 256)
    at_or_above = tl.cumsum(hist, 0, reverse=True)
    chosen = tl.max(tl.where(at_or_above >= rem, bins, -1), 0)
    rem = rem - tl.sum(tl.where(bins > chosen, hist, 0), 0)
    return prefix | (chosen.to(tl.uint32) << SHIFT), rem


@triton.jit
def _indexer_select(S, START, END, IDX, VAL, T, t_begin, TC, NC, KK, BLOCK: tl.constexpr):
    """Grid (TC, B). Reads the row's visible scores from S [B,TC,NC]; writes IDX [B,T,KK] int32 and
    VAL [B,T,KK] fp32 for token t_begin + program_id(0)."""
    loc = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    tok = b * T + t_begin + loc
    start = tl.load(START + tok)
    end = tl.load(END + tok)
    srow = S + (b * TC + loc) * NC
    thr = tl.full([], 0, tl.uint32)
    rem = KK
    if end - start > KK:
        thr, rem = _radix_pass(srow, start, end, thr, rem, 24, 0x00000000, BLOCK)
        thr, rem = _radix_pass(srow, start, end, thr, rem, 16, 0xFF000000, BLOCK)
        thr, rem = _radix_pass(srow, start, end, thr, rem, 8, 0xFFFF0000, BLOCK)
        thr, rem = _radix_pass(srow, start, end, thr, rem, 0, 0xFFFFFF00, BLOCK)
    taken = 0
    ties = 0
    out_idx = IDX + tok * KK
    out_val = VAL + tok * KK
    for n0 in range(start, end, BLOCK):
        offs = n0 + tl.arange(0, BLOCK)
        inside = offs < end
        x = tl.load(srow + offs, mask=inside, other=0.0)
        key = _order_key(x)
        tie = inside & (key == thr)
        take = (inside & (key > thr)) | (tie & (ties + tl.cumsum(tie.to(tl.int32), 0) <= rem))
        pos = taken + tl.cumsum(take.to(tl.int32), 0) - 1
        tl.store(out_idx + pos, offs.to(tl.int32), mask=take)
        tl.store(out_val + pos, tl.where(x == 0.0, 0.0, x), mask=take)
        taken += tl.sum(take.to(tl.int32), 0)
        ties += tl.sum(tie.to(tl.int32), 0)
    for n0 in range(taken, KK, BLOCK):
        offs = n0 + tl.arange(0, BLOCK)
        pad = offs < KK
        tl.store(out_idx + offs, tl.full([BLOCK], -1, tl.int32), mask=pad)
        tl.store(out_val + offs, tl.full([BLOCK], float("-inf"), tl.float32), mask=pad)


def indexer_topk(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, ratio: int, topk: int, *,
                 visible_start: torch.Tensor | None = None, visible_end: torch.Tensor | None = None,
                 ) -> IndexerTopK:
    """Triton path of :func:`kernels.reference.indexer_topk` (same arguments, result and errors)."""
    B, T, HI, DI, NC = check_indexer_args(q, k, w, ratio, topk)
    start, end = resolve_bounds(B, T, NC, ratio, visible_start, visible_end, q.device)
    KK = min(topk, NC)
    idx = torch.full((B, T, KK), -1, dtype=torch.int32, device=q.device)
    val = torch.full((B, T, KK), float("-inf"), dtype=torch.float32, device=q.device)
    if B * T * KK == 0:
        return IndexerTopK(idx, val)
    cfg = indexer_config(HI, DI, q.dtype)
    q, k, w = q.detach().contiguous(), k.detach().contiguous(), w.detach().contiguous()
    rows = max(1, min(T, SCRATCH_ELEMS // (B * NC)))
    scratch = torch.empty(B * rows * NC, dtype=torch.float32, device=q.device)
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    for t0 in range(0, T, rows):
        tc = min(rows, T - t0)
        _indexer_scores[(triton.cdiv(tc, cfg.BLOCK_T), B)](
            q, k, w, start, end, scratch, T, t0, tc, NC,
            HI=HI, DI=DI, BLOCK_T=cfg.BLOCK_T, BLOCK_HI=cfg.BLOCK_HI, BLOCK_DI=cfg.BLOCK_DI,
            BLOCK_N=cfg.BLOCK_N, DOT_PREC=prec, num_warps=cfg.num_warps,
        )
        _indexer_select[(tc, B)](scratch, start, end, idx, val, T, t0, tc, NC, KK,
                                 BLOCK=cfg.SELECT_BLOCK, num_warps=4)
    return IndexerTopK(idx, val)
