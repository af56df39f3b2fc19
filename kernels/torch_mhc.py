"""Torch twin of the mHC split kernels: the per-token gates and the Sinkhorn normalisation (OC ``hc_split_sinkhorn``).

From the scaled mixes ``z [T, (2+N)N]`` of one hyper-connection (spec 4, R eqs. 4-8):

    pre  = sigmoid(z[:N]) + eps                                   [T, N]
    post = 2 sigmoid(z[N:2N])                                     [T, N]
    comb = Sinkhorn(z[2N:] as [N, N])                             [T, N, N]

Sinkhorn as OC: softmax over the last dim (k) + eps, then ``2 iters - 1`` normalisations, columns
(sum over j) first and then rows and columns alternately, each ``y / (sum + eps)``. The forward keeps
only the normalisers ``denoms [T, 2 iters - 1, N]``: going backwards, each step's input is its output
times its normaliser (a product, no cancellation), so the backward rebuilds every step from ``comb``
instead of saving ``2 iters`` copies of it. Each step ``y = x / (sum_dim x + eps)`` has the backward
``dx = (dy - sum_dim(dy y)) / (sum_dim x + eps)``, the softmax's ``dz = M (dM - sum_k dM M)``.

The normalisations run token-last, on ``[N, N, T]`` (``[j, k, t]``): every operation then works on
contiguous runs of T tokens (vectorised), where the token-first ``[T, N, N]`` layout reduces and
broadcasts over runs of 4 (about 5x slower per operation on CPU). Two transposing copies (in, out) and
in-place updates into preallocated buffers keep it at two operations per normalisation forward and
four backward. ``denoms`` is returned as a ``[T, I, N]`` view of the token-last ``[I, N, T]`` buffer.

:func:`mhc_split_forward` / :func:`mhc_split_backward` are the CPU path of the ``kernels.mhc_split_*``
dispatch; ``kernels.triton_mhc`` is the GPU pair they are tested against. fp32 (fp64 kept for checks).

Shape letters: T tokens, N streams, M = (2+N)N mixes, I = 2 iters - 1 normalisations.
"""

from __future__ import annotations

import torch

__all__ = ["mhc_split_forward", "mhc_split_backward", "normalisation_dims"]


def normalisation_dims(iters: int) -> list[int]:
    """The dim each Sinkhorn normalisation sums over: columns (over j, dim -2) first, then rows/columns."""
    return [-2] + [-1, -2] * (iters - 1)


def mhc_split_forward(z_TM: torch.Tensor, n: int, iters: int, eps: float
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(pre [T, N], post [T, N], comb [T, N, N], denoms [T, I, N])`` from the scaled mixes (module docstring)."""
    T = z_TM.shape[0]
    pre_TN = torch.sigmoid(z_TM[:, :n]).add_(eps)
    post_TN = torch.sigmoid(z_TM[:, n:2 * n]).mul_(2.0)
    soft_TNN = z_TM[:, 2 * n:].unflatten(-1, (n, n)).softmax(dim=-1).add_(eps)
    y_NNT = soft_TNN.permute(1, 2, 0).contiguous()
    dims = normalisation_dims(iters)
    denoms_INT = y_NNT.new_empty(len(dims), n, T)
    for i, dim in enumerate(dims):
        den_NT = torch.sum(y_NNT, dim=_token_last(dim), out=denoms_INT[i]).add_(eps)
        y_NNT.div_(den_NT.unsqueeze(_token_last(dim)))
    return pre_TN, post_TN, y_NNT.permute(2, 0, 1).contiguous(), denoms_INT.permute(2, 0, 1)


def _token_last(dim: int) -> int:
    """The ``[N, N, T]`` dim of the token-first ``[T, N, N]`` dim ``-2`` (j) or ``-1`` (k)."""
    return 0 if dim == -2 else 1


def mhc_split_backward(dpre_TN: torch.Tensor, dpost_TN: torch.Tensor, dcomb_TNN: torch.Tensor, pre_TN: torch.Tensor,
                       post_TN: torch.Tensor, comb_TNN: torch.Tensor, denoms_TIN: torch.Tensor, eps: float
                       ) -> torch.Tensor:
    """``dz [T, M]`` from the gradients of pre, post and comb and the forward's outputs and normalisers."""
    T, n = pre_TN.shape
    dims = normalisation_dims((denoms_TIN.shape[1] + 1) // 2)
    s_pre, s_post = pre_TN - eps, post_TN * 0.5
    dz_TM = torch.empty(T, (2 + n) * n, dtype=pre_TN.dtype, device=pre_TN.device)
    dz_TM[:, :n] = dpre_TN * s_pre * (1.0 - s_pre)
    dz_TM[:, n:2 * n] = dpost_TN * 2.0 * s_post * (1.0 - s_post)
    denoms_INT = denoms_TIN.permute(1, 2, 0)  # the forward's own buffer (contiguous) when it comes from it
    y_NNT = comb_TNN.permute(1, 2, 0).contiguous()
    g_NNT = dcomb_TNN.permute(1, 2, 0).contiguous()
    gy_NNT = torch.empty_like(g_NNT)
    for i in reversed(range(len(dims))):
        d = _token_last(dims[i])
        den_11T = denoms_INT[i].unsqueeze(d)  # [1, N, T] for column sums, [N, 1, T] for row sums
        g_NNT.sub_(torch.mul(g_NNT, y_NNT, out=gy_NNT).sum(dim=d, keepdim=True)).div_(den_11T)
        y_NNT.mul_(den_11T)  # this step's input
    soft_NNT = y_NNT.sub_(eps)
    g_NNT.sub_(torch.mul(g_NNT, soft_NNT, out=gy_NNT).sum(dim=1, keepdim=True)).mul_(soft_NNT)
    dz_TM[:, 2 * n:] = g_NNT.permute(2, 0, 1).flatten(1)
    return dz_TM
