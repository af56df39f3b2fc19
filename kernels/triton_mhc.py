"""Triton forward and backward of the mHC split: gates and Sinkhorn per token (spec 4; OC ``hc_split_sinkhorn``).

Same semantics, outputs and saved normalisers as :mod:`kernels.torch_mhc` (its torch twin). One program
handles ``BLOCK_T`` tokens; each token's ``[N, N]`` matrix stays in registers through all
``2 iters - 1`` normalisations (unrolled: ``iters`` is a compile-time constant), where the torch twin
runs two small tensor operations per normalisation over all tokens.

* Forward: sigmoid gates, softmax over k + eps, the normalisations; writes pre, post, comb and each
  normaliser ``[T, 2 iters - 1, N]``.
* Backward: walks the normalisations backwards from comb, rebuilding each step's input as output
  times normaliser, then the softmax and sigmoid backwards; writes ``dz [T, (2+N)N]``.

All math is fp32 (the interpreter requires it; the tensors are tiny). N must be a power of two (V4: 4).

Shape letters: T tokens, N streams, M = (2+N)N mixes, I = 2 iters - 1 normalisations.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["mhc_split_forward", "mhc_split_backward", "INTERPRETED"]

INTERPRETED = bool(triton.knobs.runtime.interpret)  # how the @triton.jit below were built
BLOCK_T = 32


@triton.jit
def _split_fwd(z_ptr, pre_ptr, post_ptr, comb_ptr, den_ptr, T, eps,
               N: tl.constexpr, STEPS: tl.constexpr, BLOCK_T: tl.constexpr):
    M: tl.constexpr = (2 + N) * N
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    n = tl.arange(0, N)
    ok = t < T
    ok2 = ok[:, None]
    gate = t[:, None] * M + n[None, :]
    s_pre = tl.sigmoid(tl.load(z_ptr + gate, mask=ok2, other=0.0))
    s_post = tl.sigmoid(tl.load(z_ptr + gate + N, mask=ok2, other=0.0))
    tl.store(pre_ptr + t[:, None] * N + n[None, :], s_pre + eps, mask=ok2)
    tl.store(post_ptr + t[:, None] * N + n[None, :], 2.0 * s_post, mask=ok2)
    jk = n[:, None] * N + n[None, :]  # [N, N] row-major (j, k)
    ok3 = ok[:, None, None]
    x = tl.load(z_ptr + t[:, None, None] * M + 2 * N + jk[None, :, :], mask=ok3, other=0.0)
    e = tl.exp(x - tl.max(x, axis=2)[:, :, None])
    y = e / tl.sum(e, axis=2)[:, :, None] + eps
    for i in tl.static_range(STEPS):
        if i % 2 == 0:  # columns: sum over j
            den = tl.sum(y, axis=1) + eps
            y = y / den[:, None, :]
        else:  # rows: sum over k
            den = tl.sum(y, axis=2) + eps
            y = y / den[:, :, None]
        tl.store(den_ptr + t[:, None] * (STEPS * N) + i * N + n[None, :], den, mask=ok2)
    tl.store(comb_ptr + t[:, None, None] * (N * N) + jk[None, :, :], y, mask=ok3)


@triton.jit
def _split_bwd(dpre_ptr, dpost_ptr, dcomb_ptr, pre_ptr, post_ptr, comb_ptr, den_ptr, dz_ptr, T, eps,
               N: tl.constexpr, STEPS: tl.constexpr, BLOCK_T: tl.constexpr):
    M: tl.constexpr = (2 + N) * N
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    n = tl.arange(0, N)
    ok = t < T
    ok2 = ok[:, None]
    tn = t[:, None] * N + n[None, :]
    s_pre = tl.load(pre_ptr + tn, mask=ok2, other=0.0) - eps
    s_post = tl.load(post_ptr + tn, mask=ok2, other=0.0) * 0.5
    dz_pre = tl.load(dpre_ptr + tn, mask=ok2, other=0.0) * s_pre * (1.0 - s_pre)
    dz_post = tl.load(dpost_ptr + tn, mask=ok2, other=0.0) * 2.0 * s_post * (1.0 - s_post)
    tl.store(dz_ptr + t[:, None] * M + n[None, :], dz_pre, mask=ok2)
    tl.store(dz_ptr + t[:, None] * M + N + n[None, :], dz_post, mask=ok2)
    jk = n[:, None] * N + n[None, :]
    ok3 = ok[:, None, None]
    tnn = t[:, None, None] * (N * N) + jk[None, :, :]
    y = tl.load(comb_ptr + tnn, mask=ok3, other=0.0)
    g = tl.load(dcomb_ptr + tnn, mask=ok3, other=0.0)
    # the Sinkhorn iterations in reverse; a loop variable, since the compiler refuses to reassign a constexpr
    for i in tl.static_range(STEPS - 1, -1, -1):
        den = tl.load(den_ptr + t[:, None] * (STEPS * N) + i * N + n[None, :], mask=ok2, other=1.0)
        if i % 2 == 0:
            g = (g - tl.sum(g * y, axis=1)[:, None, :]) / den[:, None, :]
            y = y * den[:, None, :]
        else:
            g = (g - tl.sum(g * y, axis=2)[:, :, None]) / den[:, :, None]
            y = y * den[:, :, None]
    soft = y - eps
    dz = soft * (g - tl.sum(g * soft, axis=2)[:, :, None])
    tl.store(dz_ptr + t[:, None, None] * M + 2 * N + jk[None, :, :], dz, mask=ok3)


def _check(n: int, z_or_pre: torch.Tensor) -> None:
    if n < 1 or n & (n - 1):
        raise ValueError(f"triton mHC split: hc_mult N={n} must be a power of two")
    if z_or_pre.dtype != torch.float32:
        raise ValueError(f"triton mHC split: fp32 tensors expected, got {z_or_pre.dtype}")


def mhc_split_forward(z: torch.Tensor, n: int, iters: int, eps: float):
    """See :func:`kernels.torch_mhc.mhc_split_forward`."""
    _check(n, z)
    z = z.contiguous()
    T, steps = z.shape[0], 2 * iters - 1
    pre, post = z.new_empty(T, n), z.new_empty(T, n)
    comb, denoms = z.new_empty(T, n, n), z.new_empty(T, steps, n)
    _split_fwd[(triton.cdiv(T, BLOCK_T),)](z, pre, post, comb, denoms, T, eps, N=n, STEPS=steps, BLOCK_T=BLOCK_T)
    return pre, post, comb, denoms


def mhc_split_backward(dpre, dpost, dcomb, pre, post, comb, denoms, eps: float) -> torch.Tensor:
    """See :func:`kernels.torch_mhc.mhc_split_backward`."""
    T, n = pre.shape
    _check(n, pre)
    dz = pre.new_empty(T, (2 + n) * n)
    args = [x.contiguous() for x in (dpre, dpost, dcomb, pre, post, comb, denoms)]
    _split_bwd[(triton.cdiv(T, BLOCK_T),)](*args, dz, T, eps, N=n, STEPS=denoms.shape[1], BLOCK_T=BLOCK_T)
    return dz
