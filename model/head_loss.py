"""The vocabulary head fused with its cross-entropy, in chunks of tokens (last stage; main and MTP losses).

``loss[t] = logsumexp_v(h[t] . W[v]) - h[t] . W[label[t]]`` (0 where ``label == ignore_index``) is
computed ``chunk`` tokens at a time, so the ``[tokens, vocab]`` logits and their gradient never exist
whole: one chunk's ``[c, V / tp]`` block lives at a time (8 MiB by default).

The gradient is computed in the forward, chunk by chunk, while the chunk's probabilities are at hand
(the recipe of Liger-Kernel's fused linear cross-entropy): with ``G = softmax - onehot`` the forward
keeps ``G W`` ``[T, D]`` and ``G^T h`` ``[V / tp, D]`` (the head weight's size) instead of the logits.
G itself is never formed: the softmax's row scale goes onto the ``[c, D]`` operands of the two GEMMs and
the onehot part is a gather / scatter of rows, so each chunk makes four passes over its ``[c, V]`` block
(max, subtract, exp, sum) besides the three GEMMs.
The backward scales them by the loss gradient ``g``; that is exact when ``g`` is the same for every
counted token (a mean or a sum over tokens, which is how the trainer and the MTP loss reduce), so
it is checked, and any other ``g`` recomputes each chunk's logits from the saved log-normalisers.

Under tensor parallelism the head's rows (the vocabulary) are split over the TP ranks, as Megatron's
``vocab_parallel_cross_entropy`` (Shoeybi et al. 2019, §3) splits them: per chunk one all-reduce of
the row maxima (max), of the exponential sums and of the target logits (sums). The input passes
through Megatron's *f* operator, so its gradient (a partial sum over this rank's vocabulary rows) is
summed over the ranks in the backward. All arithmetic is fp32 (spec 0.1 item 8: logits in fp32), with
bf16 inputs too and under ``torch.autocast``, which is switched off inside (it would run the chunk GEMMs
in bf16 next to the fp32 accumulators).

Shape letters: B batch, S sequence, T = B*S tokens, D model dim, V vocabulary (this rank's rows), c chunk.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from v4train.parallel.tensor_parallel import TensorParallel, copy_to_region

__all__ = ["fused_head_loss", "CHUNK_ELEMENTS"]

# logits elements of one chunk: 8 MiB in fp32, a small part of the unfused [T, V] logits plus their
# gradient, and enough tokens per GEMM to keep it efficient
CHUNK_ELEMENTS = 1 << 21


def fused_head_loss(h_BSD: torch.Tensor, weight_VD: torch.Tensor, labels_BS: torch.Tensor, tp: TensorParallel,
                    *, ignore_index: int = -100, chunk_tokens: int | None = None) -> torch.Tensor:
    """Per-token cross-entropy ``[B, S]`` fp32 of the head ``weight_VD`` (this TP rank's ``[V / tp, D]``
    rows, no bias) on ``h_BSD``; 0 where ``labels_BS == ignore_index``.

    Equals ``vocab_cross_entropy(h @ weight.T, labels, tp)`` (module docstring); ``chunk_tokens``
    defaults to ``CHUNK_ELEMENTS / (V / tp)``. Raises ValueError when the shapes disagree.
    """
    B, S, D = h_BSD.shape
    if weight_VD.dim() != 2 or weight_VD.shape[1] != D or labels_BS.shape != (B, S):
        raise ValueError(f"fused_head_loss: h {tuple(h_BSD.shape)}, head weight {tuple(weight_VD.shape)} and "
                         f"labels {tuple(labels_BS.shape)} do not match [B, S, D], [V / tp, D], [B, S]")
    chunk = chunk_tokens or max(1, CHUNK_ELEMENTS // weight_VD.shape[0])
    h_TD = copy_to_region(h_BSD, tp).reshape(B * S, D)
    # Function.apply reports needs_input_grad even under no_grad: decide here whether to form gradients
    want_grad = torch.is_grad_enabled() and (h_TD.requires_grad or weight_VD.requires_grad)
    with _autocast_off(h_TD):
        loss_T = _FusedHeadLoss.apply(h_TD, weight_VD, labels_BS.reshape(B * S), tp, ignore_index, chunk, want_grad)
    return loss_T.view(B, S)


def _autocast_off(x: torch.Tensor):
    """A context with ``torch.autocast`` off on ``x``'s device type (nothing to do where autocast does not exist)."""
    device = x.device.type
    if not torch.amp.is_autocast_available(device):
        return contextlib.nullcontext()
    return torch.autocast(device, enabled=False)


def _all_reduce(x: torch.Tensor, tp: TensorParallel, op) -> torch.Tensor:
    if tp.active:
        dist.all_reduce(x, op=op, group=tp.group)
    return x


class _FusedHeadLoss(torch.autograd.Function):
    """Forward: per chunk logits, log-normaliser, loss and (when a gradient is wanted) ``G W``, ``G^T h``.
    Backward: those scaled by the uniform loss gradient, or per-chunk recomputation (module docstring)."""

    @staticmethod
    def forward(ctx, h_TD, weight_VD, labels_T, tp: TensorParallel, ignore_index: int, chunk: int, want_grad: bool):
        T, V = h_TD.shape[0], weight_VD.shape[0]
        h32, w32 = h_TD.float(), weight_VD.float()
        # this rank's label column, -1 where the label is ignored or another rank's row
        local_T = labels_T - tp.rank * V
        local_T = torch.where((labels_T != ignore_index) & (local_T >= 0) & (local_T < V), local_T, -1)
        loss_T, lse_T = h32.new_empty(T), h32.new_empty(T)
        gw_TD = torch.empty_like(h32) if want_grad else None
        gth_VD = torch.zeros_like(w32) if want_grad else None
        for t0 in range(0, T, chunk):
            t1 = min(t0 + chunk, T)
            logits_cV = h32[t0:t1] @ w32.t()
            col_c = local_T[t0:t1]
            target_c = torch.where(col_c >= 0, logits_cV.gather(1, col_c.clamp(min=0).unsqueeze(1)).squeeze(1), 0.0)
            top_c = _all_reduce(logits_cV.amax(-1), tp, dist.ReduceOp.MAX)
            probs_cV = logits_cV.sub_(top_c.unsqueeze(1)).exp_()  # in place: one [c, V] buffer per chunk
            sum_c = _all_reduce(probs_cV.sum(-1), tp, dist.ReduceOp.SUM)
            target_c = _all_reduce(target_c, tp, dist.ReduceOp.SUM)
            lse_T[t0:t1] = top_c + sum_c.log()
            loss_T[t0:t1] = lse_T[t0:t1] - target_c
            if want_grad:
                _add_chunk_gradients(gw_TD[t0:t1], gth_VD, probs_cV, sum_c, h32[t0:t1], w32, col_c,
                                     labels_T[t0:t1] == ignore_index)
        loss_T.masked_fill_(labels_T == ignore_index, 0.0)
        ctx.save_for_backward(h32, w32, labels_T, local_T, lse_T, gw_TD, gth_VD)
        ctx.ignore_index, ctx.chunk, ctx.dtypes = ignore_index, chunk, (h_TD.dtype, weight_VD.dtype)
        return loss_T

    @staticmethod
    def backward(ctx, grad_T):
        with _autocast_off(grad_T):  # a backward called inside an autocast region runs under it
            return _FusedHeadLoss._backward(ctx, grad_T)

    @staticmethod
    def _backward(ctx, grad_T):
        h32, w32, labels_T, local_T, lse_T, gw_TD, gth_VD = ctx.saved_tensors
        counted_T = labels_T != ctx.ignore_index
        g_counted = grad_T[counted_T]
        if g_counted.numel() == 0 or bool((g_counted == g_counted[0]).all()):
            # one gradient for every counted token: scale what the forward computed
            g = g_counted[0] if g_counted.numel() else grad_T.new_zeros(())
            dh_TD, dw_VD = gw_TD * g, gth_VD * g
        else:
            dh_TD, dw_VD = torch.empty_like(h32), torch.zeros_like(w32)
            for t0 in range(0, h32.shape[0], ctx.chunk):
                t1 = min(t0 + ctx.chunk, h32.shape[0])
                probs_cV = (h32[t0:t1] @ w32.t()).sub_(lse_T[t0:t1].unsqueeze(1)).exp_()
                _softmax_minus_onehot_(probs_cV, local_T[t0:t1], ~counted_T[t0:t1])
                probs_cV.mul_(grad_T[t0:t1].unsqueeze(1))
                dh_TD[t0:t1] = probs_cV @ w32
                dw_VD.addmm_(probs_cV.t(), h32[t0:t1])
        h_dtype, w_dtype = ctx.dtypes
        return dh_TD.to(h_dtype), dw_VD.to(w_dtype), None, None, None, None, None


def _add_chunk_gradients(gw_cD: torch.Tensor, gth_VD: torch.Tensor, exp_cV: torch.Tensor, sum_c: torch.Tensor,
                         h_cD: torch.Tensor, w_VD: torch.Tensor, col_c: torch.Tensor, ignored_c: torch.Tensor) -> None:
    """``gw = G W`` (into ``gw``) and ``gth += G^T h`` for one chunk, with ``G = exp / sum - onehot(col)`` (0 on
    ignored rows), without forming G: the row scale ``1 / sum`` goes onto the ``[c, D]`` operands and the onehot
    part is a gather / scatter of ``c`` rows of W and h, so no pass over the ``[c, V]`` block beyond the two GEMMs.
    """
    inv_c1 = sum_c.reciprocal().masked_fill_(ignored_c, 0.0).unsqueeze(1)
    torch.mm(exp_cV, w_VD, out=gw_cD).mul_(inv_c1)
    gth_VD.addmm_(exp_cV.t(), h_cD * inv_c1)
    rows = (col_c >= 0).nonzero().squeeze(1)  # label on this rank (ignored rows have col -1)
    gw_cD.index_add_(0, rows, w_VD.index_select(0, col_c[rows]), alpha=-1.0)
    gth_VD.index_add_(0, col_c[rows], h_cD.index_select(0, rows), alpha=-1.0)


def _softmax_minus_onehot_(probs_cV: torch.Tensor, col_c: torch.Tensor, ignored_c: torch.Tensor) -> torch.Tensor:
    """In place: ``probs - onehot(col)`` (rows whose label is on this rank), 0 on ignored rows."""
    rows = (col_c >= 0).nonzero().squeeze(1)
    probs_cV[rows, col_c[rows]] -= 1.0
    return probs_cV.masked_fill_(ignored_c.unsqueeze(1), 0.0)
