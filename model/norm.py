"""RMSNorm with a learnable scale, computed in fp32 (spec 0.1 item 8; OC ``RMSNorm``).

The backward is written out (:class:`_RMSNorm`) so autograd keeps only the input and the per-row
1/rms instead of every intermediate product.

Shape letters: ... any leading dims, D normalised dim.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RMSNorm"]


class RMSNorm(nn.Module):
    """y = weight * x / sqrt(mean(x^2) + eps) over the last dim; ``[..., D] -> [..., D]``, x's dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNorm.apply(x, self.weight, self.eps)

    def init_parameter(self, name: str, tensor: torch.Tensor, generator: torch.Generator, std: float) -> None:
        """Initialisation hook used by ``V4Stage.init_weights``: the scale starts at 1."""
        tensor.fill_(1.0)


class _RMSNorm(torch.autograd.Function):
    """y = w * x * r with r = (mean(x^2) + eps)^-1/2 over the last dim; with x^ = x r and g' = g w:
    dx = r (g' - x^ mean(g' x^)), dw = sum over rows of g x^."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 (fp64 stays fp64)
        rstd = torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return (weight * x32 * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        xhat = x.to(rstd.dtype) * rstd
        g32 = grad.to(rstd.dtype)
        dweight = (g32 * xhat).reshape(-1, xhat.shape[-1]).sum(0).to(weight.dtype)
        gw = g32 * weight
        dx = rstd * (gw - xhat * (gw * xhat).mean(-1, keepdim=True))
        return dx.to(x.dtype), dweight, None
