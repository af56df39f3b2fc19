"""Multi-Token Prediction, depth D (V4: D = 1) (spec 5.3; OC ``MTPBlock``; V3 token alignment).

MTP block k (0-based) on the main model's final 4-stream state H^0 (before the main hc_head):

  x = e_proj(enorm(Emb(t[i+1+k]))) broadcast to the N streams + h_proj(hnorm(H^k))   (per stream)
  H^{k+1} = Block(x)                      a full V4 layer; SWA (last compress_ratios entries), learned routing
  logits = Head(norm(hc_head(H^{k+1})))    its own hc_head and final norm, the *shared* head
  loss_k = CE(logits[i], t[i+2+k])          mean over valid positions

Emb and Head are the main model's (with pipeline parallelism the last stage holds a copy of the
embedding under the same name, see ``V4Stage.shared_embedding_parameters``). The MTP loss is
``mtp_loss_weight * mean_k loss_k``; the weight follows :func:`mtp_loss_weight` (0.3, then 0.1 once
the learning-rate decay starts, spec 1 / 5.3), set per step by the trainer.

Targets come from ``labels`` (= input ids shifted left by one): block k embeds labels shifted left by
k and predicts labels shifted left by k+1; a position is valid when both are real tokens (not -100
and inside the sequence). Positions and document masking are those of the main sequence.

Shape letters: B batch, S sequence, N hc streams, D model dim.
"""

from __future__ import annotations

import torch
from torch import nn

from v4train.model.block import Block
from v4train.model.config import ModelConfig
from v4train.model.layout import SequenceContext
from v4train.model.mhc import HyperHead
from v4train.model.norm import RMSNorm
from v4train.parallel.tensor_parallel import TensorParallel

__all__ = ["MTPBlock", "mtp_loss_weight", "shift_left", "IGNORE_INDEX"]

IGNORE_INDEX = -100


def mtp_loss_weight(lr_decay_started: bool, *, initial: float = 0.3, after_decay: float = 0.1) -> float:
    """MTP loss weight of spec 1 / 5.3: ``initial`` (0.3) until the LR decay starts, then ``after_decay`` (0.1)."""
    return after_decay if lr_decay_started else initial


def shift_left(ids_BS: torch.Tensor, by: int, fill: int = IGNORE_INDEX) -> torch.Tensor:
    """``ids`` moved ``by`` positions to the left, the vacated tail filled with ``fill``."""
    if by == 0:
        return ids_BS
    tail = ids_BS.new_full((ids_BS.shape[0], min(by, ids_BS.shape[1])), fill)
    return torch.cat((ids_BS[:, by:], tail), dim=1)


class MTPBlock(Block):
    """One MTP module: a :class:`Block` plus ``e_proj``, ``h_proj``, ``enorm``, ``hnorm``, ``hc_head``, ``norm``
    (OC names), keyed ``mtp.<k>`` in the stage."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, tp: TensorParallel = TensorParallel(), experts=None):
        super().__init__(cfg, layer_idx, tp, experts)
        self.e_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.h_proj = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.enorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.hc_head = HyperHead(cfg.dim, cfg.hc_mult, hc_eps=cfg.hc_eps, norm_eps=cfg.norm_eps)

    def forward(self, H_BSND: torch.Tensor, emb_BSD: torch.Tensor, ctx: SequenceContext,
                token_ids_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(H^{k+1} [B, S, N, D], head input [B, S, D])`` from the previous streams and Emb(t[i+1+k])."""
        x_BSND = self.e_proj(self.enorm(emb_BSD)).unsqueeze(2) + self.h_proj(self.hnorm(H_BSND))
        H_BSND = super().forward(x_BSND, ctx, token_ids_BS)
        return H_BSND, self.norm(self.hc_head(H_BSND))
