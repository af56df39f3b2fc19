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
    pre_TN = torch.sigmoid(z_TM[:, :n]).add_(eps)
    post_TN = torch.sigmoid(z_TM[:, n:2 * n]).mul_(2.0)
    y_TNN = z_TM[:, 2 * n:].unflatten(-1, (n, n)).softmax(dim=-1).add_(eps)
    dims = normalisation_dims(iters)
    denoms_TIN = y_TNN.new_empty(z_TM.shape[0], len(dims), n)
    for i, dim in enumerate(dims):
        denom = y_TNN.sum(dim=dim, keepdim=True).add_(eps)
        y_TNN.div_(denom)
        denoms_TIN[:, i] = denom.flatten(1)
    return pre_TN, post_TN, y_TNN, denoms_TIN


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
    y_TNN, g_TNN = comb_TNN.clone(), dcomb_TNN
    for i in reversed(range(len(dims))):
        dim = dims[i]
        denom = denoms_TIN[:, i].unsqueeze(dim)  # [T, 1, N] for column sums, [T, N, 1] for row sums
        g_TNN = (g_TNN - (g_TNN * y_TNN).sum(dim=dim, keepdim=True)) / denom
        y_TNN.mul_(denom)  # this step's input
    soft_TNN = y_TNN.sub_(eps)
    dz_TM[:, 2 * n:] = (soft_TNN * (g_TNN - (g_TNN * soft_TNN).sum(dim=-1, keepdim=True))).flatten(1)
    return dz_TM
