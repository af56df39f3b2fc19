"""Lightning Indexer of CSA layers and its KL training loss (spec 3.3, 0.1 items 6-7; OC ``Indexer``).

Keys: a compressor with the CSA overlap structure (ratio m) and head dim c^I reads the attn_norm output
x: K^I = Compressor(x) (RMSNorm, then RoPE on the last rope_head_dim dims at the block start).
Queries share the main low-rank latent: q^I = c^Q W^IUQ (n^I heads of c^I), RoPE on the last
rope_head_dim dims with the layer's compressed-RoPE table, *no* per-head RMS norm (spec 0.1 item 7).
Head weights w^I = x W^w * c^I^-1/2 * n^I^-1/2 (OC ``weights_proj`` times its scale). Score:
I[t, s] = sum_h w^I[t, h] ReLU(q^I[t, h] . K^I[s]) over visible entries; top-k by
:func:`kernels.indexer_topk` (the kernels dispatch). The Hadamard rotation and FP4 fake-quant are omitted: the
rotation is orthogonal on both q and k, so in full precision it changes nothing.

Training (V3.2 DSA recipe adapted to compressed entries, spec 3.3 and 11.1 - inherited, not restated
for V4): the target p[t, :] is the main attention's probability mass on each compressed entry,
summed over heads and L1-normalised over the entries considered; the loss is KL(p || softmax(I)).
``indexer_warmup`` mode: the attention is dense and the KL runs over every visible entry. ``sparse``
mode: the KL runs over the selected top-k set. In both the indexer's inputs (x and c^Q) are detached,
so this loss trains only the indexer and the LM loss never reaches it.

Shape letters: B batch, T tokens, D model dim, L q_lora_rank, H indexer heads, E indexer head dim,
N compressed slots, K slots per query, P rope pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.compressor import Compressor
from model.config import ModelConfig
from model.layout import CompressedLayout
from model.rope import apply_rope
import kernels
from kernels.torch_cores import gather_rows
from parallel.tensor_parallel import TensorParallel, column_linear, gather_heads

__all__ = ["Indexer", "indexer_scores", "indexer_kl"]


class Indexer(nn.Module):
    """Indexer of one CSA layer: ``wq_b [H*E, L]``, ``weights_proj [H, D]``, ``compressor`` (overlap).

    Under tensor parallelism ``wq_b`` and ``weights_proj`` are column-parallel (this rank's H/tp heads);
    :meth:`select` gathers every rank's heads first, so the top-k is the whole model's and identical on
    every rank; the KL scores are summed over ranks by the caller (``model/attention.py``).
    """

    def __init__(self, cfg: ModelConfig, ratio: int, tp: TensorParallel = TensorParallel()):
        super().__init__()
        self.tp = tp
        self.n_heads = tp.split(cfg.index_n_heads, "index_n_heads")
        self.head_dim, self.topk = cfg.index_head_dim, cfg.index_topk
        self.wq_b = column_linear(cfg.q_lora_rank, cfg.index_n_heads * cfg.index_head_dim, tp,
                                  what="index_n_heads*index_head_dim")
        self.weights_proj = column_linear(cfg.dim, cfg.index_n_heads, tp, what="index_n_heads")
        self.compressor = Compressor(cfg.dim, cfg.index_head_dim, ratio, overlap=True, norm_eps=cfg.norm_eps)
        self.weight_scale = cfg.index_head_dim ** -0.5 * cfg.index_n_heads ** -0.5

    def project(self, x_BTD: torch.Tensor, qr_BTL: torch.Tensor, rope_T: tuple[torch.Tensor, torch.Tensor],
                layout: CompressedLayout, rope_N: tuple[torch.Tensor, torch.Tensor],
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(q [B, T, H, E], k [B, N, E], w [B, T, H])`` from detached-or-not inputs (caller decides)."""
        q_BTHE = self.wq_b(qr_BTL).unflatten(-1, (self.n_heads, self.head_dim))
        q_BTHE = apply_rope(q_BTHE, *rope_T)
        k_BNE = self.compressor(x_BTD, layout, *rope_N)
        w_BTH = self.weights_proj(x_BTD).float() * self.weight_scale
        return q_BTHE, k_BNE, w_BTH

    def select(self, q_BTHE: torch.Tensor, k_BNE: torch.Tensor, w_BTH: torch.Tensor,
               layout: CompressedLayout) -> torch.Tensor:
        """Top-k visible compressed slots per query ``[B, T, min(topk, N)]`` int64, -1 = none (in increasing
        slot order; ties to the lower slot), through the kernels dispatch (Triton on CUDA)."""
        q_BTHE, w_BTH = gather_heads(q_BTHE, self.tp, dim=2), gather_heads(w_BTH, self.tp, dim=2)
        picks = kernels.indexer_topk(q_BTHE, k_BNE, w_BTH, 1, self.topk,
                                     visible_start=layout.lo_BT, visible_end=layout.hi_BT)
        return picks.indices.long()


def indexer_scores(q_BTHE: torch.Tensor, k_BNE: torch.Tensor, w_BTH: torch.Tensor, slots_BTK: torch.Tensor) -> torch.Tensor:
    """Differentiable I[t, slot] ``[B, T, K]`` fp32 at the given slots (-1 slots score -inf).

    Saves q, k, w and the slots only; the backward gathers the keys again (no ``[B, T, K, E]`` kept).
    """
    return _IndexerScores.apply(q_BTHE.float(), k_BNE.float(), w_BTH.float(), slots_BTK)


class _IndexerScores(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_BTHE, k_BNE, w_BTH, slots_BTK):
        k_BTKE = gather_rows(k_BNE, slots_BTK.clamp(min=0))
        relu_BTHK = torch.matmul(q_BTHE, k_BTKE.transpose(-1, -2)).relu_()
        score_BTK = torch.matmul(w_BTH.unsqueeze(2), relu_BTHK).squeeze(2)
        ctx.save_for_backward(q_BTHE, k_BNE, w_BTH, slots_BTK)
        return score_BTK.masked_fill(slots_BTK < 0, float("-inf"))

    @staticmethod
    def backward(ctx, grad_BTK):
        q_BTHE, k_BNE, w_BTH, slots_BTK = ctx.saved_tensors
        B, N, E = k_BNE.shape
        slots = slots_BTK.clamp(min=0)
        k_BTKE = gather_rows(k_BNE, slots)
        dots_BTHK = torch.matmul(q_BTHE, k_BTKE.transpose(-1, -2))
        grad_BT1K = grad_BTK.masked_fill(slots_BTK < 0, 0.0).unsqueeze(2)
        dw_BTH = (dots_BTHK.relu() * grad_BT1K).sum(-1)
        ddots_BTHK = (grad_BT1K * w_BTH.unsqueeze(-1)).masked_fill_(dots_BTHK <= 0, 0.0)
        dq_BTHE = torch.matmul(ddots_BTHK, k_BTKE)
        dk_BTKE = torch.matmul(ddots_BTHK.transpose(-1, -2), q_BTHE)
        flat = (slots + torch.arange(B, device=slots.device).view(B, 1, 1) * N).reshape(-1)
        dk_BNE = torch.zeros_like(k_BNE).view(B * N, E).index_add_(0, flat, dk_BTKE.reshape(-1, E)).view(B, N, E)
        return dq_BTHE, dk_BNE, dw_BTH, None


def indexer_kl(score_BTK: torch.Tensor, mass_BTK: torch.Tensor, slots_BTK: torch.Tensor) -> torch.Tensor:
    """Mean over queries of KL(p || softmax(I)) on the slots of each query (0-d fp32, differentiable).

    ``mass`` is the main attention's (head-summed) probability on each slot; p is it L1-normalised
    over the query's valid slots. Queries with no valid slot or no mass are left out.
    """
    valid_BTK = slots_BTK >= 0
    mass_BTK = mass_BTK.masked_fill(~valid_BTK, 0.0)
    total_BT1 = mass_BTK.sum(-1, keepdim=True)
    rows_BT = total_BT1.squeeze(-1) > 0
    if not rows_BT.any():
        return score_BTK.sum() * 0.0
    p_RK = (mass_BTK / total_BT1.clamp(min=1e-30))[rows_BT]
    logq_RK = F.log_softmax(score_BTK[rows_BT], dim=-1)
    logp_RK = torch.where(p_RK > 0, p_RK.clamp(min=1e-30).log(), 0.0)
    kl_RK = torch.where(p_RK > 0, p_RK * (logp_RK - logq_RK), 0.0)
    return kl_RK.sum(-1).mean()


@torch.no_grad()
def indexer_recall(score_BTK: torch.Tensor, mass_BTK: torch.Tensor, slots_BTK: torch.Tensor, topk: int) -> torch.Tensor:
    """Mean share of the target mass that the indexer's top-k (among the given slots) would keep."""
    valid_BTK = slots_BTK >= 0
    mass_BTK = mass_BTK.masked_fill(~valid_BTK, 0.0)
    total_BT = mass_BTK.sum(-1)
    rows_BT = total_BT > 0
    if not rows_BT.any() or score_BTK.shape[-1] == 0:
        return torch.ones(())
    pick_BTK = score_BTK.topk(min(topk, score_BTK.shape[-1]), dim=-1).indices
    kept_BT = mass_BTK.gather(-1, pick_BTK).sum(-1)
    return (kept_BT[rows_BT] / total_BT[rows_BT]).mean()
