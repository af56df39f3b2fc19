"""Manifold-constrained hyper-connections (mHC): spec section 4, R eqs. 1-8, OC ``Block.hc_pre/hc_post``.

The residual is N = hc_mult streams ``X [B, S, N, D]``. Around each sub-layer:

  read  (hc_pre):  mixes = (vec(X) @ fn^T) * rsqrt(mean(vec(X)^2) + norm_eps)        [B, S, (2+N)N]
                   pre = sigmoid(alpha_pre * mixes[:N] + base[:N]) + hc_eps           A, [B, S, N]
                   post = 2 * sigmoid(alpha_post * mixes[N:2N] + base[N:2N])          C, [B, S, N]
                   comb = Sinkhorn(alpha_res * mixes[2N:] + base[2N:])                [B, S, N, N]
                   x_in = sum_j pre_j X_j                                             [B, S, D]
  write (hc_post): X'_k = post_k F(x_in) + sum_j comb[j, k] X_j    (B_l = comb^T, spec 0.1 item 4)

``fn`` rows are ordered [pre (N), post (N), res (N*N, row-major comb[j, k] = mixes[2N + N j + k])].
The head (``hc_head``) collapses the streams with sigmoid weights + eps and no Sinkhorn.

Initialisation (not disclosed by V4; spec 10.2 suggestion, adopted): alpha = 0.01 (mHC paper App. A.1),
fn ~ N(0, init_std), base_pre = logit(1/N) so the read starts as the stream mean, base_post = 0 so
C = 1, base_res = 4 I so comb starts near the identity (diagonal ~0.95 for N = 4).

Parameter names map to OC's as ``hc_attn.fn`` <-> ``hc_attn_fn`` (likewise base, scale, and ``hc_head``).

Shape letters: B batch, S sequence, N streams, D model dim, M = (2+N)N mixes, X = N+1 write sources.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from v4train import kernels
from v4train.parallel.muon import MuonSplit

__all__ = ["sinkhorn", "split_mixes", "hc_write", "read_reference", "HyperConnection", "HyperHead", "ALPHA_INIT",
           "RES_DIAG_INIT"]

ALPHA_INIT = 0.01
RES_DIAG_INIT = 4.0


def sinkhorn(logits_NN: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Near doubly stochastic matrix from ``[..., N, N]`` logits, as OC's ``hc_split_sinkhorn``.

    softmax over the last dim (k) + eps, column-normalise (sum over j), then (iters - 1) times
    row-normalise and column-normalise, each with +eps in the denominator. Column sums end at 1.
    Autograd runs through :class:`_Sinkhorn`'s closed-form backward (the same derivative as
    differentiating these steps, with a fraction of the small ops).
    """
    return _Sinkhorn.apply(logits_NN, iters, eps)


def _normalisations(iters: int) -> list[int]:
    # the dim summed by each normalisation step: columns (over j, dim -2) first, then rows/columns
    return [-2] + [-1, -2] * (iters - 1)


class _Sinkhorn(torch.autograd.Function):
    """Each step y = x / (sum_dim x + eps) has the backward dx = (dy - sum_dim(dy * y)) / (sum_dim x + eps);
    the softmax's is dz = M * (dM - sum_k dM M). Saves every step's output and normaliser (N*N each)."""

    @staticmethod
    def forward(ctx, logits, iters, eps):
        soft = logits.softmax(dim=-1)
        y = soft + eps
        saved = [soft]
        for dim in _normalisations(iters):
            denom = y.sum(dim=dim, keepdim=True).add_(eps)
            y = y / denom
            saved += [y, denom]
        ctx.save_for_backward(*saved)
        ctx.iters = iters
        return y

    @staticmethod
    def backward(ctx, grad):
        soft, *steps = ctx.saved_tensors
        g = grad
        for i, dim in reversed(list(enumerate(_normalisations(ctx.iters)))):
            y, denom = steps[2 * i], steps[2 * i + 1]
            g = (g - (g * y).sum(dim=dim, keepdim=True)) / denom
        return soft * (g - (g * soft).sum(dim=-1, keepdim=True)), None, None


def split_mixes(
    mixes_BSM: torch.Tensor, scale_3: torch.Tensor, base_M: torch.Tensor, n: int, iters: int, eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(pre [.., N], post [.., N], comb [.., N, N])`` from the raw mixes (R eqs. 4-8; all fp32)."""
    pre = torch.sigmoid(mixes_BSM[..., :n] * scale_3[0] + base_M[:n]) + eps
    post = 2 * torch.sigmoid(mixes_BSM[..., n : 2 * n] * scale_3[1] + base_M[n : 2 * n])
    res_logits = mixes_BSM[..., 2 * n :] * scale_3[2] + base_M[2 * n :]
    comb = sinkhorn(res_logits.unflatten(-1, (n, n)), iters, eps)
    return pre, post, comb


def hc_write(y_BSD: torch.Tensor, X_BSND: torch.Tensor, post_BSN: torch.Tensor,
             comb_BSNN: torch.Tensor) -> torch.Tensor:
    """mHC write and mix: ``X'_k = post_k y + sum_j comb[j, k] X_j`` -> ``[B, S, N, D]`` in X's dtype (OC ``hc_post``).

    Computed in fp32 (:class:`_FusedWrite`, fp64 when every input is) and rounded once to X's dtype.
    """
    B, S, N, D = X_BSND.shape
    out_TND = _FusedWrite.apply(y_BSD.reshape(B * S, D), X_BSND.reshape(B * S, N, D), post_BSN.reshape(B * S, N),
                                comb_BSNN.reshape(B * S, N, N))
    return out_TND.view(B, S, N, D)


def _compute_dtype(x: torch.Tensor, fp32_tensor: torch.Tensor) -> torch.dtype:
    """fp32 for bf16 / fp32 streams (spec 0.1 item 9: mHC in fp32); fp64 when both are fp64 (gradient checks)."""
    return torch.promote_types(torch.promote_types(x.dtype, fp32_tensor.dtype), torch.float32)


def _mix(w_TNN: torch.Tensor, src_TND: torch.Tensor, out_TND: torch.Tensor | None = None) -> torch.Tensor:
    """``out[t, k] (+)= sum_j w[t, j, k] src[t, j]`` (into ``out`` when given, else a new tensor): N broadcast
    multiply-adds over ``[T, N, D]``, about twice as fast on CPU as T batched ``[N, N] x [N, D]`` GEMMs."""
    if out_TND is None:
        out_TND = w_TNN[:, 0].unsqueeze(-1) * src_TND[:, 0].unsqueeze(1)
        first = 1
    else:
        first = 0
    for j in range(first, src_TND.shape[1]):
        out_TND.addcmul_(w_TNN[:, j].unsqueeze(-1), src_TND[:, j].unsqueeze(1))
    return out_TND


class _FusedWrite(torch.autograd.Function):
    """hc_post with a hand-written backward, in fp32 (fp64 for fp64 inputs). Forward per token
    ``out = post y^T + comb^T X``; backward, with ``g = dout [T, N, D]``: ``dy = post^T g``,
    ``dpost_k = <g_k, y>``, ``dX = comb g``, ``dcomb[j, k] = <X_j, g_k>``. Saves y and X in their own
    dtypes (the caller holds X anyway)."""

    @staticmethod
    def forward(ctx, y_TD, X_TND, post_TN, comb_TNN):
        ct = _compute_dtype(X_TND, comb_TNN)
        out_TND = post_TN.to(ct).unsqueeze(-1) * y_TD.to(ct).unsqueeze(1)
        _mix(comb_TNN.to(ct), X_TND.to(ct), out_TND)
        ctx.save_for_backward(y_TD, X_TND, post_TN, comb_TNN)
        return out_TND.to(X_TND.dtype)

    @staticmethod
    def backward(ctx, g_TND):
        y_TD, X_TND, post_TN, comb_TNN = ctx.saved_tensors
        ct = _compute_dtype(X_TND, comb_TNN)
        g32, y32, X32 = g_TND.to(ct).contiguous(), y_TD.to(ct), X_TND.to(ct)  # an expanded g takes bmm's slow path
        post32, comb32 = post_TN.to(ct), comb_TNN.to(ct)
        dy_TD = torch.bmm(post32.unsqueeze(1), g32).squeeze(1)
        dpost_TN = (g32 * y32.unsqueeze(1)).sum(-1)
        dcomb_TNN = torch.bmm(X32, g32.transpose(1, 2))
        dX_TND = _mix(comb32.transpose(1, 2), g32)
        return (dy_TD.to(y_TD.dtype), dX_TND.to(X_TND.dtype), dpost_TN.to(post_TN.dtype),
                dcomb_TNN.to(comb_TNN.dtype))


def read_reference(X_BSND: torch.Tensor, fn_MF: torch.Tensor, scale_3: torch.Tensor, base_M: torch.Tensor, n: int,
                   iters: int, hc_eps: float, norm_eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hc_pre step by step through autograd (R eqs. 1-8): the reference :class:`_FusedRead` is tested against."""
    mixes_BSM = _mixes(X_BSND, fn_MF, norm_eps)
    pre_BSN, post_BSN, comb_BSNN = split_mixes(mixes_BSM, scale_3, base_M, n, iters, hc_eps)
    x_BSD = (pre_BSN.unsqueeze(-1) * X_BSND.float()).sum(dim=2).to(X_BSND.dtype)
    return x_BSD, post_BSN, comb_BSNN


class _FusedRead(torch.autograd.Function):
    """hc_pre as a few batched operations with a hand-written backward (the read is a fifth of a nano
    step's operator count otherwise): one GEMM for the mixes, the gates and Sinkhorn in one kernel
    (``kernels.mhc_split_forward``: Triton on GPU, :mod:`kernels.torch_mhc` on CPU), one batched
    product for x_in. Saves the streams (already held by the caller), the mixes, the RMS factor, the
    gates and the Sinkhorn normalisers ``[T, 2 iters - 1, N]``. Returns ``[T, D]``, ``[T, N]``, ``[T, N, N]``.

    Backward, with F = N*D and s the scale per mix: dpre = X dx, dz = split backward, dmixes = s dz,
    draw = r dmixes, dr = <dmixes, mixes> / r, dfn = draw^T X, dX = draw fn - dr r^3 X / F + pre dx.
    """

    @staticmethod
    def forward(ctx, X_BSND, fn_MF, scale_3, base_M, n, iters, hc_eps, norm_eps):
        B, S, N, D = X_BSND.shape
        X_TND = X_BSND.reshape(B * S, N, D).to(_compute_dtype(X_BSND, fn_MF))
        X_TF = X_TND.view(B * S, N * D)
        r_T1 = torch.rsqrt(torch.linalg.vector_norm(X_TF, dim=-1, keepdim=True).square_().div_(N * D).add_(norm_eps))
        mixes_TM = (X_TF @ fn_MF.t()).mul_(r_T1)
        scale_M = _per_mix(scale_3, n)
        pre_TN, post_TN, comb_TNN, denoms = kernels.mhc_split_forward(torch.addcmul(base_M, mixes_TM, scale_M),
                                                                      n, iters, hc_eps)
        x_TD = torch.bmm(pre_TN.unsqueeze(1), X_TND).squeeze(1)
        ctx.save_for_backward(X_TND, fn_MF, scale_M, r_T1, mixes_TM, pre_TN, post_TN, comb_TNN, denoms)
        ctx.n, ctx.hc_eps, ctx.dtype = n, hc_eps, X_BSND.dtype
        ctx.shape = X_BSND.shape
        return x_TD.to(X_BSND.dtype), post_TN, comb_TNN

    @staticmethod
    def backward(ctx, dx_TD, dpost_TN, dcomb_TNN):
        X_TND, fn_MF, scale_M, r_T1, mixes_TM, pre_TN, post_TN, comb_TNN, denoms = ctx.saved_tensors
        T, N, D = X_TND.shape
        n = ctx.n
        dx_TD = dx_TD.to(X_TND.dtype)
        dpre_TN = (X_TND * dx_TD.unsqueeze(1)).sum(-1)  # faster than T [N, D] x [D, 1] products on CPU
        dz_TM = kernels.mhc_split_backward(dpre_TN, dpost_TN, dcomb_TNN, pre_TN, post_TN, comb_TNN, denoms,
                                           ctx.hc_eps)
        dscale_M = (dz_TM * mixes_TM).sum(0)
        dscale_3 = torch.stack((dscale_M[:n].sum(), dscale_M[n:2 * n].sum(), dscale_M[2 * n:].sum()))
        dbase_M = dz_TM.sum(0)
        dmixes_TM = dz_TM.mul_(scale_M)
        coef_T1 = (dmixes_TM * mixes_TM).sum(-1, keepdim=True).mul_(-r_T1.square() / (N * D))  # -dr r^3 / F
        draw_TM = dmixes_TM.mul_(r_T1)
        X_TF = X_TND.view(T, N * D)
        dfn_MF = draw_TM.t() @ X_TF
        dX_TF = torch.addmm(X_TF * coef_T1, draw_TM, fn_MF)
        dX_TF.view(T, N, D).addcmul_(pre_TN.unsqueeze(-1), dx_TD.unsqueeze(1))
        return dX_TF.view(ctx.shape).to(ctx.dtype), dfn_MF, dscale_3, dbase_M, None, None, None, None


def _per_mix(scale_3: torch.Tensor, n: int) -> torch.Tensor:
    """``[M]``: alpha_pre for the N pre mixes, alpha_post for the N post mixes, alpha_res for the N*N res mixes."""
    return torch.cat((scale_3[0].expand(n), scale_3[1].expand(n), scale_3[2].expand(n * n)))


def _mixes(X_BSND: torch.Tensor, fn_MF: torch.Tensor, norm_eps: float) -> torch.Tensor:
    # weightless RMS of the flattened streams only scales the mixes; the read uses the raw streams
    flat_BSF = X_BSND.flatten(2).float()
    rsqrt_BS1 = torch.rsqrt(flat_BSF.square().mean(-1, keepdim=True) + norm_eps)
    return (flat_BSF @ fn_MF.t()) * rsqrt_BS1


class HyperConnection(nn.Module):
    """The mHC parameters around one sub-layer (``fn [M, N*D]``, ``base [M]``, ``scale [3]``, fp32)."""

    def __init__(self, dim: int, n: int, *, sinkhorn_iters: int, hc_eps: float, norm_eps: float):
        super().__init__()
        self.n, self.sinkhorn_iters, self.hc_eps, self.norm_eps = n, sinkhorn_iters, hc_eps, norm_eps
        mix = (2 + n) * n
        self.fn = nn.Parameter(torch.zeros(mix, n * dim, dtype=torch.float32))
        self.fn.muon_split = MuonSplit(0, (n, n, n * n))  # pre, post, res: three matrices for Muon (spec 6)
        self.base = nn.Parameter(torch.zeros(mix, dtype=torch.float32))
        self.scale = nn.Parameter(torch.zeros(3, dtype=torch.float32))

    def read(self, X_BSND: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hc_pre: ``(x_in [B, S, D], post [B, S, N], comb [B, S, N, N])`` from the streams, fused
        (:class:`_FusedRead`); equals :func:`read_reference`."""
        B, S = X_BSND.shape[:2]
        x_TD, post_TN, comb_TNN = _FusedRead.apply(X_BSND, self.fn, self.scale, self.base, self.n,
                                                   self.sinkhorn_iters, self.hc_eps, self.norm_eps)
        return x_TD.view(B, S, -1), post_TN.view(B, S, -1), comb_TNN.view(B, S, self.n, self.n)

    def init_parameter(self, name: str, tensor: torch.Tensor, generator: torch.Generator, std: float) -> None:
        """Initialisation hook used by ``V4Stage.init_weights`` (module docstring, "Initialisation")."""
        if not _init_fn_or_scale(name, tensor, generator, std):
            n = self.n
            base = torch.zeros_like(tensor)
            base[:n] = _logit_uniform(n)
            base[2 * n :] = (RES_DIAG_INIT * torch.eye(n)).flatten()
            tensor.copy_(base)


def _logit_uniform(n: int) -> float:
    """logit(1/n) = log(1/(n-1)): the pre-activation whose sigmoid weighs each of n streams 1/n."""
    return math.log(1.0 / (n - 1)) if n > 1 else 0.0


def _init_fn_or_scale(name: str, tensor: torch.Tensor, generator: torch.Generator, std: float) -> bool:
    """Shared init of ``fn`` (N(0, std)) and ``scale`` (alpha); False for any other parameter."""
    if name == "fn":
        tensor.copy_(torch.empty(tensor.shape, dtype=tensor.dtype).normal_(0.0, std, generator=generator))
    elif name == "scale":
        tensor.fill_(ALPHA_INIT)
    else:
        return False
    return True


class HyperHead(nn.Module):
    """hc_head: ``[B, S, N, D] -> [B, S, D]`` with weights sigmoid(alpha * mixes + base) + hc_eps (spec 4.1)."""

    def __init__(self, dim: int, n: int, *, hc_eps: float, norm_eps: float):
        super().__init__()
        self.n, self.hc_eps, self.norm_eps = n, hc_eps, norm_eps
        self.fn = nn.Parameter(torch.zeros(n, n * dim, dtype=torch.float32))
        self.base = nn.Parameter(torch.zeros(n, dtype=torch.float32))
        self.scale = nn.Parameter(torch.zeros(1, dtype=torch.float32))

    def forward(self, X_BSND: torch.Tensor) -> torch.Tensor:
        mixes_BSN = _mixes(X_BSND, self.fn, self.norm_eps)
        weights_BSN = torch.sigmoid(mixes_BSN * self.scale + self.base) + self.hc_eps
        return (weights_BSN.unsqueeze(-1) * X_BSND.float()).sum(dim=2).to(X_BSND.dtype)

    def init_parameter(self, name: str, tensor: torch.Tensor, generator: torch.Generator, std: float) -> None:
        """Initialisation hook: fn ~ N(0, std), alpha = 0.01, base = logit(1/N) (read starts as the mean)."""
        if not _init_fn_or_scale(name, tensor, generator, std):
            tensor.fill_(_logit_uniform(self.n))
