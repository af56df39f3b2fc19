"""Torch cores of V4 attention: the single-softmax sparse attention and the Lightning Indexer top-k.

``sparse_attention(q, kv, attn_sink, indices, scale)`` is OC's ``sparse_attn`` (spec 3.1, 3.6, 0.1
item 2): for query t and head h,

    o[t, h] = sum_k p_k kv[indices[t, k]],   p_k = exp(z_k) / (sum_k' exp(z_k') + exp(attn_sink[h])),
    z_k = scale * q[t, h] . kv[indices[t, k]],

over the valid slots (``indices >= 0``; -1 slots are masked out), with the sink logit entering the
denominator unscaled and carrying no value. ``kv`` is the concatenation [window KV (T entries) |
compressed entries], so the window and the compressed entries share one softmax. It is a
``torch.autograd.Function`` that works on chunks of 64 queries. When the chunk's queries share their
rows (windows overlap heavily between neighbours; dense mode names all visible compressed entries)
it takes the distinct rows U they reference and runs GEMMs against them, weighting each row by how
many of the query's slots name it, which is exactly the slot-by-slot softmax; when they do not (the
indexer's scattered top-k picks) it gathers each query's K rows. It saves only q, kv, the output and
the log-normaliser and recomputes the probabilities in the backward (the flash-attention recipe).
Memory: O(T * K) indices, O(T * H * D) activations and ``[c, |U|]`` or ``[c, K, D]`` per chunk,
never ``[T, T]``. Everything is computed in fp32 (fp64 for
fp64 inputs) and returned in q's dtype. This is the CPU path of the ``kernels.sparse_attention``
dispatch (Triton on CUDA and under ``TRITON_INTERPRET``); ``kernels.reference`` is the plain reference
both are tested against.

The indexer's top-k on CPU is ``kernels.reference.indexer_topk`` (chunked, visible entries only; ties
to the lower index, the contract of every path: ``kernels.reference.select_topk``).

Shape letters: B batch, T queries, H heads, D head dim, N kv entries, K attended slots, c chunk.
"""

from __future__ import annotations

import torch

__all__ = ["sparse_attention", "range_indices", "gather_rows", "attention_probabilities"]

# elements of the largest transient of one chunk (indexer scores, gathered rows): 1 MiB in fp32, small
# next to a layer's activations even at T = 1k
_CHUNK_ELEMENTS = 1 << 18


def gather_rows(x_BNF: torch.Tensor, idx_BX: torch.Tensor) -> torch.Tensor:
    """``x[b, idx[b, ...]]`` -> ``[B, ..., F]`` for non-negative ``idx`` ``[B, ...]`` (one index_select)."""
    B, N, F = x_BNF.shape
    offset = (torch.arange(B, device=idx_BX.device) * N).view(B, *([1] * (idx_BX.dim() - 1)))
    flat = (idx_BX.long() + offset).reshape(-1)
    return x_BNF.reshape(B * N, F).index_select(0, flat).view(*idx_BX.shape, F)


def _accumulation_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32  # fp32, or fp64 for gradchecks


_QUERY_CHUNK = 64  # queries per chunk: [c, |U|] or [c, K] logits per chunk, never [T, T]
_SHARED_RATIO = 3  # distinct-row GEMMs while |U| <= 3 K, per-query gathers beyond (scattered picks)


def _chunk_plan(idx_BcK: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U [u], col [B, c, K], count [B, c, u])`` for one chunk of queries.

    U: the sorted distinct kv rows the chunk references (over all its batch rows); col: each slot's
    column in U (0 for -1 slots); count: how many slots of query (b, t) name each column. A row named
    twice counts twice, exactly as in the slot-by-slot softmax.
    """
    idx = idx_BcK.long()
    valid = idx >= 0
    U = torch.unique(idx[valid])
    col = torch.searchsorted(U, idx.clamp(min=0).reshape(-1)).view_as(idx).clamp(max=max(U.numel() - 1, 0))
    count = torch.zeros(*idx.shape[:2], U.numel(), dtype=dtype, device=idx.device)
    count.scatter_add_(2, col, valid.to(dtype))
    return U, col, count


def _range_plan(idx_BcK: torch.Tensor, lo_Bc: torch.Tensor, hi_Bc: torch.Tensor, offset: int,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_chunk_plan` of the slots ``idx`` plus, for each query, every row ``offset + j`` with
    ``lo <= j < hi``: the chunk's ranges span one contiguous block of rows, appended to U as columns
    counted 1 where the query's range holds them (no per-query index list is built)."""
    U, col, count = _chunk_plan(idx_BcK, dtype)
    first, stop = int(lo_Bc.min()), int(hi_Bc.max())
    if stop <= first:
        return U, col, count
    rows_n = torch.arange(first, stop, device=lo_Bc.device)
    inside_Bcn = (rows_n >= lo_Bc.unsqueeze(-1)) & (rows_n < hi_Bc.unsqueeze(-1))
    return torch.cat((U, rows_n + offset)), col, torch.cat((count, inside_Bcn.to(dtype)), dim=-1)


def _chunks(idx_BTK: torch.Tensor, dtype: torch.dtype, ranges: tuple | None = None):
    """Yield ``(t0, t1, plan)`` over the queries: ``plan`` is :func:`_chunk_plan`'s triple when the chunk's
    queries share their rows (windows, all visible compressed entries), or None (gather per query).
    With ``ranges`` ``(lo [B, T], hi [B, T], offset)`` every plan is :func:`_range_plan`'s."""
    T, K = idx_BTK.shape[1], idx_BTK.shape[2]
    for t0 in range(0, T, _QUERY_CHUNK):
        t1 = min(t0 + _QUERY_CHUNK, T)
        if ranges is not None:
            lo_BT, hi_BT, offset = ranges
            yield t0, t1, _range_plan(idx_BTK[:, t0:t1], lo_BT[:, t0:t1], hi_BT[:, t0:t1], offset, dtype)
            continue
        plan = _chunk_plan(idx_BTK[:, t0:t1], dtype)
        yield t0, t1, (plan if plan[0].numel() <= _SHARED_RATIO * max(K, 1) else None)


def _shared_logits(q_BcHD: torch.Tensor, kv_BuD: torch.Tensor, count_Bcu: torch.Tensor, scale: float) -> torch.Tensor:
    """``[B, c, H, u]`` scaled logits of the chunk's queries against its distinct rows, -inf where unnamed."""
    B, c, H, D = q_BcHD.shape
    logits = torch.matmul(q_BcHD.reshape(B, c * H, D), kv_BuD.transpose(1, 2)).view(B, c, H, -1) * scale
    return logits.masked_fill((count_Bcu == 0).unsqueeze(2), float("-inf"))


def _gathered_logits(q_BcHD: torch.Tensor, kv_BcKD: torch.Tensor, idx_BcK: torch.Tensor, scale: float) -> torch.Tensor:
    """``[B, c, H, K]`` scaled logits of each query against its own K gathered rows, -inf at -1 slots."""
    logits = torch.matmul(q_BcHD, kv_BcKD.transpose(-1, -2)) * scale
    return logits.masked_fill((idx_BcK < 0).unsqueeze(2), float("-inf"))


class _SparseAttention(torch.autograd.Function):
    """Chunks of ``_QUERY_CHUNK`` queries, each computed one of two exact ways (same softmax):

    * shared: the softmax runs over the distinct rows U the chunk references, each weighted by how many
      of the query's slots name it, so every product is a GEMM against U (windows overlap heavily);
    * gathered: each query's K rows are gathered (``[B, c, K, D]``) and multiplied with its heads
      (top-k picks scattered over many rows, where U would be mostly masked columns).

    Each chunk runs in its own function (:func:`_chunk_forward`, :func:`_chunk_backward`), so its
    transients are freed before the next chunk's are made.
    """

    @staticmethod
    def forward(ctx, q_BTHD, kv_BND, sink_H, idx_BTK, scale, lo_BT=None, hi_BT=None, offset=0):
        B, T, H, D = q_BTHD.shape
        acc = _accumulation_dtype(q_BTHD)
        q32, kv32, sink32 = q_BTHD.to(acc).contiguous(), kv_BND.to(acc).contiguous(), sink_H.to(acc)
        out_BTHD = q32.new_empty(B, T, H, D)
        lse_BTH = q32.new_empty(B, T, H)
        ranges = None if lo_BT is None else (lo_BT, hi_BT, offset)
        for t0, t1, plan in _chunks(idx_BTK, q32.dtype, ranges):
            _chunk_forward(q32[:, t0:t1], kv32, sink32.view(1, 1, H), idx_BTK[:, t0:t1], plan, scale,
                           out_BTHD[:, t0:t1], lse_BTH[:, t0:t1])
        ctx.save_for_backward(q32, kv32, sink32, idx_BTK, out_BTHD, lse_BTH, lo_BT, hi_BT)
        ctx.scale, ctx.offset, ctx.dtypes = scale, offset, (q_BTHD.dtype, kv_BND.dtype, sink_H.dtype)
        return out_BTHD.to(q_BTHD.dtype)

    @staticmethod
    def backward(ctx, dout_BTHD):
        q32, kv32, sink32, idx_BTK, out_BTHD, lse_BTH, lo_BT, hi_BT = ctx.saved_tensors
        dout32 = dout_BTHD.to(q32.dtype)
        dq = torch.empty_like(q32)
        dkv = torch.zeros_like(kv32)
        delta_BTH = torch.empty_like(lse_BTH)
        ranges = None if lo_BT is None else (lo_BT, hi_BT, ctx.offset)
        for t0, t1, plan in _chunks(idx_BTK, q32.dtype, ranges):
            # sum_k p_k dP_k, the softmax backward's row term, per chunk (no [B, T, H, D] product)
            delta_BTH[:, t0:t1] = (dout32[:, t0:t1] * out_BTHD[:, t0:t1]).sum(-1)
            _chunk_backward(q32[:, t0:t1], dout32[:, t0:t1], lse_BTH[:, t0:t1], delta_BTH[:, t0:t1], kv32,
                            idx_BTK[:, t0:t1], plan, ctx.scale, dq[:, t0:t1], dkv)
        # d out / d sink = -p_sink * out  =>  dL/dsink_h = -sum_{b,t} p_sink * delta
        dsink = -(torch.exp(sink32 - lse_BTH) * delta_BTH).sum(dim=(0, 1))
        q_dtype, kv_dtype, sink_dtype = ctx.dtypes
        return dq.to(q_dtype), dkv.to(kv_dtype), dsink.to(sink_dtype), None, None, None, None, None


def _chunk_forward(q_BcHD, kv_BND, sink_11H, idx_BcK, plan, scale, out_BcHD, lse_BcH) -> None:
    """One chunk of :class:`_SparseAttention`'s forward: writes its output and log-normaliser."""
    if plan is None:
        idx_BcK = idx_BcK.long()
        rows_BcXD = gather_rows(kv_BND, idx_BcK.clamp(min=0))
        logits = _gathered_logits(q_BcHD, rows_BcXD, idx_BcK, scale)
        weight = None
    else:
        U, _, count_Bcu = plan
        if U.numel() == 0:  # no query of the chunk attends anything: output 0, only the sink
            out_BcHD.zero_()
            lse_BcH.copy_(sink_11H.expand_as(lse_BcH))
            return
        rows_BcXD = kv_BND[:, U].unsqueeze(1)  # [B, 1, u, D], shared by the chunk's queries
        logits = _shared_logits(q_BcHD, rows_BcXD.squeeze(1), count_Bcu, scale)
        weight = count_Bcu.unsqueeze(2)
    top_BcH = torch.maximum(logits.amax(-1), sink_11H)
    p = torch.exp(logits - top_BcH.unsqueeze(-1))
    if weight is not None:
        p = p * weight
    denom_BcH = p.sum(-1) + torch.exp(sink_11H - top_BcH)
    p = p / denom_BcH.unsqueeze(-1)
    out_BcHD.copy_(torch.matmul(p, rows_BcXD))
    lse_BcH.copy_(top_BcH + denom_BcH.log())


def _chunk_backward(q_BcHD, do_BcHD, lse_BcH, delta_BcH, kv_BND, idx_BcK, plan, scale, dq_BcHD, dkv_BND) -> None:
    """One chunk of :class:`_SparseAttention`'s backward: writes its dq, adds its share to dkv."""
    B, c, H, D = q_BcHD.shape
    lse_BcH1 = lse_BcH.unsqueeze(-1)
    if plan is None:
        idx_BcK = idx_BcK.long()
        rows_BcKD = gather_rows(kv_BND, idx_BcK.clamp(min=0))
        p_BcHK = torch.exp(_gathered_logits(q_BcHD, rows_BcKD, idx_BcK, scale) - lse_BcH1)
        dp_BcHK = torch.matmul(do_BcHD, rows_BcKD.transpose(-1, -2))
        ds_BcHK = p_BcHK * (dp_BcHK - delta_BcH.unsqueeze(-1))
        dq_BcHD.copy_(torch.matmul(ds_BcHK, rows_BcKD) * scale)
        del rows_BcKD  # one [B, c, K, D] buffer at a time: the rows' gradient comes next
        # one batched product for both terms: [p | ds*scale]^T [dO ; q] -> [B, c, K, D]
        lhs_Bc2HK = torch.cat((p_BcHK, ds_BcHK * scale), dim=2).transpose(-1, -2).contiguous()
        drows_BcKD = torch.matmul(lhs_Bc2HK, torch.cat((do_BcHD, q_BcHD), dim=2))
        N = kv_BND.shape[1]
        flat = (idx_BcK.clamp(min=0) + torch.arange(B, device=idx_BcK.device).view(B, 1, 1) * N).reshape(-1)
        dkv_BND.view(B * N, D).index_add_(0, flat, drows_BcKD.reshape(-1, D))  # -1 slots add exact zeros
        return
    U, _, count_Bcu = plan
    u = U.numel()
    if u == 0:
        dq_BcHD.zero_()
        return
    kv_BuD = kv_BND[:, U]
    logits_BcHu = _shared_logits(q_BcHD, kv_BuD, count_Bcu, scale)
    p_BcHu = torch.exp(logits_BcHu - lse_BcH1) * count_Bcu.unsqueeze(2)
    dp_BXu = torch.matmul(do_BcHD.reshape(B, c * H, D), kv_BuD.transpose(1, 2))
    ds_BXu = p_BcHu.view(B, c * H, u) * (dp_BXu - delta_BcH.reshape(B, c * H, 1))
    dq_BcHD.copy_(torch.matmul(ds_BXu, kv_BuD).view(B, c, H, D) * scale)
    lhs_B2Xu = torch.cat((p_BcHu.view(B, c * H, u), ds_BXu * scale), dim=1)
    rhs_B2XD = torch.cat((do_BcHD.reshape(B, c * H, D), q_BcHD.reshape(B, c * H, D)), dim=1)
    dkv_BND.index_add_(1, U, torch.matmul(lhs_B2Xu.transpose(1, 2), rhs_B2XD))


def sparse_attention(q: torch.Tensor, kv: torch.Tensor, attn_sink: torch.Tensor, indices: torch.Tensor,
                     scale: float, ranges: tuple[torch.Tensor, torch.Tensor, int] | None = None) -> torch.Tensor:
    """Single-softmax attention of q ``[B, T, H, D]`` over the kv ``[B, N, D]`` rows named by
    ``indices`` ``[B, T, K]`` (int32 or int64, -1 = none) with a per-head sink ``[H]`` -> ``[B, T, H, D]``.

    ``ranges`` ``(lo [B, T], hi [B, T], offset)`` adds, for each query, the rows ``offset + j`` for
    ``lo <= j < hi`` to its slots (a contiguous run, e.g. every visible compressed entry, without a
    ``[B, T, hi - lo]`` index tensor): the same softmax as :func:`range_indices` appended to ``indices``.
    A row with no valid slot returns zeros. Differentiable in q, kv and attn_sink (module docstring).
    """
    if q.dim() != 4 or kv.dim() != 3 or indices.dim() != 3 or indices.shape[:2] != q.shape[:2]:
        raise ValueError(f"sparse_attention: shapes q {tuple(q.shape)}, kv {tuple(kv.shape)}, "
                         f"indices {tuple(indices.shape)} do not match [B,T,H,D], [B,N,D], [B,T,K]")
    if ranges is None:
        return _SparseAttention.apply(q, kv, attn_sink, indices, scale)
    lo_BT, hi_BT, offset = ranges
    if lo_BT.shape != q.shape[:2] or hi_BT.shape != q.shape[:2]:
        raise ValueError(f"sparse_attention: ranges lo {tuple(lo_BT.shape)} / hi {tuple(hi_BT.shape)} do not "
                         f"match the queries [B, T] = {tuple(q.shape[:2])}")
    return _SparseAttention.apply(q, kv, attn_sink, indices, scale, lo_BT, hi_BT, offset)


def range_indices(lo_BT: torch.Tensor, hi_BT: torch.Tensor, offset: int) -> torch.Tensor:
    """``[B, T, max(hi - lo)]`` int32 rows ``offset + j`` for ``lo <= j < hi``, -1 padded: the index form of
    :func:`sparse_attention`'s ``ranges`` (for cores that take indices only)."""
    width = int((hi_BT - lo_BT).max()) if lo_BT.numel() else 0
    slot_BTK = lo_BT.unsqueeze(-1) + torch.arange(width, device=lo_BT.device)
    return torch.where(slot_BTK < hi_BT.unsqueeze(-1), slot_BTK + offset, -1).to(torch.int32)


@torch.no_grad()
def attention_probabilities(q: torch.Tensor, kv: torch.Tensor, attn_sink: torch.Tensor, indices: torch.Tensor,
                            scale: float, first_slot: int) -> torch.Tensor:
    """Head-summed attention probabilities ``[B, T, K - first_slot]`` fp32 of the slots
    ``indices[..., first_slot:]`` under the same softmax as :func:`sparse_attention` (no gradient; -1
    slots get 0). Used for the indexer's KL target: the main attention's mass on each compressed entry.
    Forward only, so it gathers each query's K rows (``[B, c, K, D]`` per chunk) instead of planning
    distinct rows.
    """
    B, T, H, D = q.shape
    K = indices.shape[-1]
    acc = _accumulation_dtype(q)
    q32, kv32, sink_11H1 = q.to(acc), kv.to(acc), attn_sink.to(acc).view(1, 1, H, 1)
    out_BTK = q32.new_zeros(B, T, K - first_slot)
    c = max(1, _CHUNK_ELEMENTS // max(1, B * K * D))
    for t0 in range(0, T, c):
        idx = indices[:, t0:t0 + c].long()
        valid_Bc1K = (idx >= 0).unsqueeze(2)
        kv_BcKD = gather_rows(kv32, idx.clamp(min=0))
        logits_BcHK = torch.matmul(q32[:, t0:t0 + c], kv_BcKD.transpose(-1, -2)) * scale
        logits_BcHK = logits_BcHK.masked_fill(~valid_Bc1K, float("-inf"))
        top_BcH1 = torch.maximum(logits_BcHK.amax(-1, keepdim=True), sink_11H1)
        e_BcHK = torch.exp(logits_BcHK - top_BcH1)
        p_BcHK = e_BcHK / (e_BcHK.sum(-1, keepdim=True) + torch.exp(sink_11H1 - top_BcH1))
        out_BTK[:, t0:t0 + c] = p_BcHK[..., first_slot:].sum(2)
    return out_BTK
