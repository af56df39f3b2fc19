"""RMSNorm with a learnable scale, computed in fp32 (spec 0.1 item 8; OC ``RMSNorm``).

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
        x32 = x.float()
        return (self.weight * x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def init_parameter(self, name: str, tensor: torch.Tensor, generator: torch.Generator, std: float) -> None:
        """Initialisation hook used by ``V4Stage.init_weights``: the scale starts at 1."""
        tensor.fill_(1.0)
