"""Pure-torch references for the V4 sparse-attention and Lightning-Indexer kernels (spec 3.1, 3.3, 3.6).

These are the semantics the Triton kernels in ``kernels.triton_attention`` / ``kernels.triton_indexer``
must reproduce, and the path every non-CUDA tensor takes through ``kernels`` (the dispatch). All math
is fp32 whatever the input dtype (fp64 for fp64 inputs, which only the reference takes: gradcheck);
outputs return in the input dtype. No ``[T, T]`` tensor is built:
attention gathers the ``K`` selected entries per token, and the indexer scores ``[T, NC]`` only in
chunks of at most ``_CHUNK_ROWS`` query rows and ``_CHUNK_ELEMS`` elements, each against just the
columns its queries can see.

Shape letters: B batch, T query tokens, H attention heads, D head dim (the KV entry width), N KV entries
(window entries and compressed entries concatenated), K entries selected per token, HI indexer heads,
DI indexer head dim, NC compressed entries.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["IndexerTopK", "sparse_attention", "indexer_topk", "select_topk", "causal_bounds", "document_bounds"]

# Bounds on one indexer chunk: query rows, and fp32 elements of its [rows, HI, NC] scores (8 MiB). This
# is the CPU path of the model (the dispatch), so its transients must stay small next to the layer's
# activations, which grow with T: at most 256 rows keep them below 256 HI / ratio floats per token.
_CHUNK_ROWS = 256
_CHUNK_ELEMS = 1 << 21


class IndexerTopK(NamedTuple):
    """Result of :func:`indexer_topk`.

    indices: ``[B, T, KK]`` int32, the selected compressed entries of each token in increasing order,
        then ``-1`` for the slots left when fewer than ``KK`` entries are visible.
    scores: ``[B, T, KK]`` fp32 (fp64 for fp64 inputs), the index score I[t, s] of each pick, ``-inf``
        where the index is ``-1``.
        Not differentiable (top-k is not); a loss on the scores recomputes them from the picks.
    """

    indices: torch.Tensor
    scores: torch.Tensor


def sparse_attention(
    q: torch.Tensor, kv: torch.Tensor, attn_sink: torch.Tensor, indices: torch.Tensor, scale: float,
) -> torch.Tensor:
    """Shared-KV MQA over a per-token list of KV entries with an attention sink (spec 3.1, R eq. 27).

    For token t and head h, with J = {j : indices[b, t, j] in [0, N)}:
        z_j = scale * q[b, t, h] . kv[b, indices[b, t, j]]
        o[b, t, h] = sum_j exp(z_j) kv[b, indices[b, t, j]] / (sum_j exp(z_j) + exp(attn_sink[h]))
    The sink enters only the denominator, unscaled, and has no value (spec 0.1 item 2). An entry
    listed twice counts twice. A row with no valid entry returns 0.

    Args:
        q: ``[B, T, H, D]`` queries, fp32, bf16 or fp16 (fp64: reference only).
        kv: ``[B, N, D]`` the single shared KV head, used as key and value; same dtype as q.
        attn_sink: ``[H]`` fp32 sink logits (finite).
        indices: ``[B, T, K]`` integer entries of kv per token; ``-1`` (any value outside ``[0, N)``)
            means none.
        scale: softmax scale on q.k (V4: head_dim ** -0.5).

    Returns:
        ``[B, T, H, D]`` in q's dtype; logits, softmax and P.V in fp32. Differentiable in q, kv, attn_sink.

    Raises:
        ValueError: on mismatched shapes or dtypes; on the Triton path also for D > 512 or fp64.
    """
    B, T, H, D, N, K = check_attention_args(q, kv, attn_sink, indices, allow_fp64=True)
    cd = _math_dtype(q)
    valid_BTK = (indices >= 0) & (indices < N)
    safe_BTK = torch.where(valid_BTK, indices, torch.zeros_like(indices)).long()
    kv_BTKD = kv.to(cd).gather(1, safe_BTK.view(B, T * K, 1).expand(B, T * K, D)).view(B, T, K, D)
    logits_BTHK = torch.einsum("bthd,btkd->bthk", q.to(cd), kv_BTKD) * scale
    logits_BTHK = logits_BTHK.masked_fill(~valid_BTK.unsqueeze(2), float("-inf"))
    sink_BTH1 = attn_sink.to(cd).view(1, 1, H, 1).expand(B, T, H, 1)
    probs_BTHK = torch.cat((logits_BTHK, sink_BTH1), dim=-1).softmax(dim=-1)[..., :K]
    return torch.einsum("bthk,btkd->bthd", probs_BTHK, kv_BTKD).to(q.dtype)


def indexer_topk(
    q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, ratio: int, topk: int, *,
    visible_start: torch.Tensor | None = None, visible_end: torch.Tensor | None = None,
) -> IndexerTopK:
    """Lightning Indexer scores over the visible compressed entries, fused with top-k (spec 3.3, R eqs. 13-19).

    I[b, t, s] = sum_h w[b, t, h] * ReLU(q[b, t, h] . k[b, s]), for s visible to t. With no bounds
    given, s is visible iff (s + 1) * ratio <= t + 1 (OC ``get_compress_topk_idxs``; spec 3.2): the
    compressed block is complete including token t. ``visible_start``/``visible_end`` replace that
    rule by an explicit per-token range ``[start, end)`` (e.g. from :func:`document_bounds` for packed
    documents); a missing one defaults to 0 / the causal end.

    KK = min(topk, NC) picks per token, one k for the whole batch (spec 0.1 item 6). Each row takes its
    KK largest visible scores; ties go to the lower index, with -0.0 equal to +0.0 (:func:`select_topk`:
    a stated contract shared by every path, where the official code leaves it unspecified); fewer than
    KK visible entries leave ``-1`` slots. The picks come back in increasing index order. Scores are
    fp32 (OC quantises them to bf16, which only this reference's callers may choose to emulate); w is
    applied as given (OC's DI ** -0.5 * HI ** -0.5 factor belongs in w).

    Args:
        q: ``[B, T, HI, DI]`` indexer queries, fp32, bf16 or fp16 (fp64: reference only, fp64 scores).
        k: ``[B, NC, DI]`` compressed indexer keys, same dtype as q.
        w: ``[B, T, HI]`` per-head weights (any float dtype; used in fp32).
        ratio: compression ratio m (tokens per compressed entry), >= 1.
        topk: index_topk, >= 1.
        visible_start, visible_end: optional ``[B, T]`` integer bounds (clamped to ``[0, NC]``); with
            both given, ``ratio`` is not used.

    Returns:
        :class:`IndexerTopK` (indices ``[B, T, KK]`` int32, scores ``[B, T, KK]`` fp32). No gradient.

    Raises:
        ValueError: on mismatched shapes or dtypes, ratio < 1 or topk < 1.
    """
    B, T, HI, DI, NC = check_indexer_args(q, k, w, ratio, topk, allow_fp64=True)
    cd = _math_dtype(q)
    start_BT, end_BT = resolve_bounds(B, T, NC, ratio, visible_start, visible_end, q.device)
    KK = min(topk, NC)
    idx_out = torch.full((B, T, KK), -1, dtype=torch.int32, device=q.device)
    score_out = torch.full((B, T, KK), float("-inf"), dtype=cd, device=q.device)
    if KK == 0 or T == 0:
        return IndexerTopK(idx_out, score_out)
    rows = min(_CHUNK_ROWS, max(1, _CHUNK_ELEMS // max(1, B * HI * NC)))
    s_S = torch.arange(NC, device=q.device)
    with torch.no_grad():
        kT_BES = k.to(cd).transpose(1, 2).contiguous()
        for t0 in range(0, T, rows):
            t1 = min(T, t0 + rows)
            start_Bc1, end_Bc1 = start_BT[:, t0:t1, None], end_BT[:, t0:t1, None]
            # only the columns some query of the chunk sees (a causal chunk sees a prefix), KK at least
            s1 = max(int(end_Bc1.max()), min(NC, int(start_Bc1.min()) + KK))
            s0 = min(int(start_Bc1.min()), s1 - KK)
            score_BTS = _chunk_scores(q[:, t0:t1].to(cd), kT_BES[:, :, s0:s1], w[:, t0:t1].to(cd))
            vis_BTS = (s_S[s0:s1] >= start_Bc1) & (s_S[s0:s1] < end_Bc1)
            idx_BTK, score_out[:, t0:t1] = select_topk(score_BTS, vis_BTS, KK)
            idx_out[:, t0:t1] = torch.where(idx_BTK >= 0, idx_BTK + s0, -1)
    return IndexerTopK(idx_out, score_out)


def _chunk_scores(q_BTHE: torch.Tensor, kT_BES: torch.Tensor, w_BTH: torch.Tensor) -> torch.Tensor:
    """I[b, t, s] ``[B, T, S]`` of a chunk of queries against the S keys of ``kT`` ``[B, DI, S]``: one GEMM
    per batch row for every (t, h), then the head-weighted sum of the ReLUs as a batched product."""
    B, T, HI, DI = q_BTHE.shape
    qk_BTHS = torch.matmul(q_BTHE.reshape(B, T * HI, DI), kT_BES).view(B, T, HI, -1).relu_()
    return torch.matmul(w_BTH.unsqueeze(2), qk_BTHS).squeeze(2)


def select_topk(score_BTS: torch.Tensor, vis_BTS: torch.Tensor, KK: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-KK visible entries per row, ties to the lower index, returned in increasing index order.

    The tie rule is this project's contract (the official code leaves the order of equal scores
    unspecified): among equal scores the lower index is taken, and -0.0 equals +0.0 (every head's ReLU
    can be 0, so exact-zero ties are common). It is the rule of every top-k path: this reference, the
    Triton select kernel, and the indexer's recall metric.

    One top-k settles every row whose KK-th largest value does not also occur outside its picks (which
    of equal values torch's top-k takes is unspecified); the rare rows where it does take the lowest
    indices of that tie explicitly (:func:`_lowest_ties`). Overwrites ``score_BTS`` (pass a scratch).

    Args:
        score_BTS: ``[B, T, S]`` float scores (any finite or -inf values; overwritten).
        vis_BTS: ``[B, T, S]`` bool, which entries each row may pick.
        KK: picks per row, 1 <= KK <= S.

    Returns:
        ``(indices [B, T, KK] int32, scores [B, T, KK])``: the picks in increasing index order, then
        ``-1`` / ``-inf`` where fewer than KK entries are visible.
    """
    NS = score_BTS.shape[-1]
    masked_BTS = score_BTS.add_(0.0).masked_fill_(~vis_BTS, float("-inf"))  # x + 0 = x, and -0 + 0 = +0
    val_BTK, pick_BTK = masked_BTS.topk(KK, dim=-1)
    kth_BT1 = val_BTK[..., -1:]
    # a finite KK-th value with visible equals left out; at -inf every visible entry is already picked
    tied_BT = (masked_BTS == kth_BT1).sum(-1) > (val_BTK == kth_BT1).sum(-1)
    tied_BT &= kth_BT1.squeeze(-1) > float("-inf")
    if tied_BT.any():
        rows = tied_BT.nonzero(as_tuple=True)
        pick_BTK[rows] = _lowest_ties(masked_BTS[rows], kth_BT1[rows], KK)
    # increasing index order, then the -1 slots (invisible picks, where fewer than KK are visible)
    took_BTK = vis_BTS.gather(-1, pick_BTK)
    order_BTK = torch.where(took_BTK, pick_BTK, NS).sort(dim=-1).values
    took_BTK = order_BTK < NS
    idx_BTK = torch.where(took_BTK, order_BTK, -1).to(torch.int32)
    val_BTK = torch.where(took_BTK, masked_BTS.gather(-1, order_BTK.clamp(max=NS - 1)), float("-inf"))
    return idx_BTK, val_BTK


def _lowest_ties(masked_RS: torch.Tensor, kth_R1: torch.Tensor, KK: int) -> torch.Tensor:
    """``[R, KK]`` increasing indices of each row's KK largest entries, ties at the finite KK-th value
    ``kth`` to the lower index (every row holds at least KK entries >= kth)."""
    take_RS = masked_RS > kth_R1
    tie_RS = masked_RS == kth_R1
    take_RS |= tie_RS & (tie_RS.cumsum(-1) <= KK - take_RS.sum(-1, keepdim=True))
    return take_RS.nonzero()[:, 1].view(-1, KK)


def causal_bounds(B: int, T: int, NC: int, ratio: int, device: torch.device | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The default visibility as explicit bounds: start 0, end min((t + 1) // ratio, NC); ``[B, T]`` int32 each."""
    end_T = ((torch.arange(T, device=device) + 1) // ratio).clamp(max=NC).to(torch.int32)
    return torch.zeros(B, T, dtype=torch.int32, device=device), end_T.expand(B, T).contiguous()


def document_bounds(position_ids: torch.Tensor, ratio: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token visible range of compressed entries for packed documents (spec 3.2 "Packed documents").

    A document is a maximal run of tokens whose position ids go up by one (a restart, e.g. to 0,
    begins a new one). Each document is compressed on its own from its first token in the row, its
    trailing remainder shorter than ``ratio`` dropped, and the documents' entries are concatenated
    in order; this is the layout the bounds address. Token t of a document whose entries start at
    ``c0`` and which sits ``p`` tokens after the document's first token sees ``[c0, c0 + (p+1)//ratio)``.

    Args:
        position_ids: ``[B, T]`` integer positions.
        ratio: compression ratio m >= 1.

    Returns:
        (visible_start, visible_end), ``[B, T]`` int32 each. A row holds sum over its documents of
        len // ratio compressed entries; pass k with at least that many (NC >= the row's total).

    Raises:
        ValueError: ratio < 1.
    """
    if ratio < 1:
        raise ValueError(f"ratio must be >= 1, got {ratio}")
    B, T = position_ids.shape
    t_T = torch.arange(T, device=position_ids.device)
    new_doc_BT = torch.ones(B, T, dtype=torch.bool, device=position_ids.device)
    new_doc_BT[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    doc_BT = new_doc_BT.long().cumsum(-1) - 1                       # document number in the row
    first_BT = torch.where(new_doc_BT, t_T, torch.zeros_like(t_T)).cummax(-1).values  # first token of doc
    offset_BT = t_T - first_BT
    # entries of each document (len // ratio), exclusive prefix sum over documents -> c0
    doc_len_BT = torch.zeros(B, T, dtype=torch.long, device=position_ids.device)
    doc_len_BT.scatter_add_(1, doc_BT, torch.ones_like(doc_BT))
    entries_BT = doc_len_BT // ratio
    c0_BT = (entries_BT.cumsum(-1) - entries_BT).gather(1, doc_BT)
    start_BT = c0_BT.to(torch.int32)
    return start_BT, (c0_BT + (offset_BT + 1) // ratio).to(torch.int32)


def resolve_bounds(B: int, T: int, NC: int, ratio: int, start: torch.Tensor | None, end: torch.Tensor | None,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, T]`` int32 (start, end), filled with :func:`causal_bounds` where not given and clamped to [0, NC]."""
    start_d, end_d = causal_bounds(B, T, NC, ratio, device)
    for name, given in (("visible_start", start), ("visible_end", end)):
        if given is not None and tuple(given.shape) != (B, T):
            raise ValueError(f"{name} must be [B, T] = {[B, T]}, got {list(given.shape)}")
    start_BT = start_d if start is None else start.to(device=device, dtype=torch.int32).clamp(0, NC)
    end_BT = end_d if end is None else end.to(device=device, dtype=torch.int32).clamp(0, NC)
    return start_BT.contiguous(), end_BT.contiguous()


def _math_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _float_dtypes(allow_fp64: bool) -> tuple[torch.dtype, ...]:
    return (torch.float32, torch.bfloat16, torch.float16) + ((torch.float64,) if allow_fp64 else ())


def check_attention_args(q, kv, attn_sink, indices, allow_fp64: bool = False) -> tuple[int, int, int, int, int, int]:
    """Validate :func:`sparse_attention` inputs; returns (B, T, H, D, N, K)."""
    if q.dim() != 4 or kv.dim() != 3 or indices.dim() != 3 or attn_sink.dim() != 1:
        raise ValueError(f"expected q [B,T,H,D], kv [B,N,D], attn_sink [H], indices [B,T,K]; got "
                         f"{list(q.shape)}, {list(kv.shape)}, {list(attn_sink.shape)}, {list(indices.shape)}")
    B, T, H, D = q.shape
    N, K = kv.shape[1], indices.shape[2]
    if kv.shape[0] != B or kv.shape[2] != D or tuple(indices.shape[:2]) != (B, T) or attn_sink.shape[0] != H:
        raise ValueError(f"shape mismatch: q {list(q.shape)}, kv {list(kv.shape)}, attn_sink "
                         f"{list(attn_sink.shape)}, indices {list(indices.shape)}")
    if q.dtype != kv.dtype or q.dtype not in _float_dtypes(allow_fp64):
        raise ValueError(f"q and kv must share one float dtype ({_names(allow_fp64)}), got {q.dtype} and {kv.dtype}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"indices must be int32 (or int64), got {indices.dtype}")
    return B, T, H, D, N, K


def check_indexer_args(q, k, w, ratio: int, topk: int, allow_fp64: bool = False) -> tuple[int, int, int, int, int]:
    """Validate :func:`indexer_topk` inputs; returns (B, T, HI, DI, NC)."""
    if q.dim() != 4 or k.dim() != 3 or w.dim() != 3:
        raise ValueError(f"expected q [B,T,HI,DI], k [B,NC,DI], w [B,T,HI]; got "
                         f"{list(q.shape)}, {list(k.shape)}, {list(w.shape)}")
    B, T, HI, DI = q.shape
    if k.shape[0] != B or k.shape[2] != DI or tuple(w.shape) != (B, T, HI):
        raise ValueError(f"shape mismatch: q {list(q.shape)}, k {list(k.shape)}, w {list(w.shape)}")
    if q.dtype != k.dtype or q.dtype not in _float_dtypes(allow_fp64):
        raise ValueError(f"q and k must share one float dtype ({_names(allow_fp64)}), got {q.dtype} and {k.dtype}")
    if ratio < 1 or topk < 1:
        raise ValueError(f"ratio and topk must be >= 1, got ratio={ratio}, topk={topk}")
    return B, T, HI, DI, k.shape[1]


def _names(allow_fp64: bool) -> str:
    return "fp32/bf16/fp16" + ("/fp64" if allow_fp64 else "")
