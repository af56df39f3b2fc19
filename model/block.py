"""One DeepSeek-V4 layer on the mHC residual (spec section 2; OC ``Block``).

  X = hc_write(attn(attn_norm(hc_attn.read(X))), X)       attention: SWA / CSA / HCA (spec 3)
  X = hc_write(moe(ffn_norm(hc_ffn.read(X)), tokens), X)  DeepSeekMoE, hash or learned routing (spec 5)

Activation recompute (``recompute``: none / selective / full, :mod:`model.recompute`): ``selective``
re-runs each sub-layer (norm + attention, norm + MoE) in the backward from its input; ``full`` re-runs
the whole block from its input streams. Routing is replayed, never re-decided.

Shape letters: B batch, S sequence, N hc streams, D model dim.
"""

from __future__ import annotations

import torch
from torch import nn

from v4train.model.attention import Attention
from v4train.model.config import ModelConfig
from v4train.model.layout import SequenceContext
from v4train.model.mhc import HyperConnection, hc_write
from v4train.model.moe import MoE
from v4train.model.norm import RMSNorm
from v4train.model.recompute import check_recompute_mode, recompute_region
from v4train.parallel.tensor_parallel import TensorParallel

__all__ = ["Block"]


class Block(nn.Module):
    """One V4 layer of global index ``layer_idx``: ``[B, S, N, D] -> [B, S, N, D]``; ``tp`` and
    ``experts`` as in :class:`model.moe.MoE` (the mHC, norms and residual streams are replicated).
    ``recompute`` (attribute, default "none") is the activation-recompute mode (module docstring)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, tp: TensorParallel = TensorParallel(), experts=None):
        super().__init__()
        hc = dict(sinkhorn_iters=cfg.hc_sinkhorn_iters, hc_eps=cfg.hc_eps, norm_eps=cfg.norm_eps)
        self.hc_attn = HyperConnection(cfg.dim, cfg.hc_mult, **hc)
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, layer_idx, tp)
        self.hc_ffn = HyperConnection(cfg.dim, cfg.hc_mult, **hc)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = MoE(cfg, layer_idx, tp, experts)
        self._recompute = "none"

    @property
    def recompute(self) -> str:
        return self._recompute

    @recompute.setter
    def recompute(self, mode: str) -> None:
        self._recompute = check_recompute_mode(mode)

    def forward(self, X_BSND: torch.Tensor, ctx: SequenceContext,
                token_ids_BS: torch.Tensor | None = None) -> torch.Tensor:
        """``token_ids_BS`` (hash routing) defaults to ``ctx.input_ids``."""
        tokens_BS = ctx.input_ids if token_ids_BS is None else token_ids_BS
        if self._recompute == "full":
            return recompute_region(self, lambda X: self._layer(X, ctx, tokens_BS), X_BSND)
        return self._layer(X_BSND, ctx, tokens_BS)

    def _layer(self, X_BSND: torch.Tensor, ctx: SequenceContext, tokens_BS: torch.Tensor) -> torch.Tensor:
        selective = self._recompute == "selective"
        x_BSD, post, comb = self.hc_attn.read(X_BSND)
        attn = lambda x: self.attn(self.attn_norm(x), ctx)  # noqa: E731
        a_BSD = recompute_region(self.attn, attn, x_BSD) if selective else attn(x_BSD)
        X_BSND = hc_write(a_BSD, X_BSND, post, comb)
        x_BSD, post, comb = self.hc_ffn.read(X_BSND)
        cp = ctx.context_parallel.cp if ctx.context_parallel is not None else None
        ffn = lambda x: self.ffn(self.ffn_norm(x), tokens_BS, ctx.aux_loss_scale, cp)  # noqa: E731
        y_BSD = recompute_region(self.ffn, ffn, x_BSD) if selective else ffn(x_BSD)
        return hc_write(y_BSD, X_BSND, post, comb)
