"""Lightning Indexer of CSA layers and its KL training loss (spec 3.3, 0.1 items 6-7; OC ``Indexer``).

Keys: a compressor with the CSA overlap structure (ratio m) and head dim c^I reads the attn_norm output
x: K^I = Compressor(x) (RMSNorm, then RoPE on the last rope_head_dim dims at the block start).
Queries share the main low-rank latent: q^I = c^Q W^IUQ (n^I heads of c^I), RoPE on the last
rope_head_dim dims with the layer's compressed-RoPE table, *no* per-head RMS norm (spec 0.1 item 7).
Head weights w^I = x W^w * c^I^-1/2 * n^I^-1/2 (OC ``weights_proj`` times its scale). Score:
I[t, s] = sum_h w^I[t, h] ReLU(q^I[t, h] . K^I[s]) over visible entries; top-k by
:func:`kernels.indexer_topk` (the kernels dispatch). The Hadamard rotation and FP4 rounding of q and k run
only with QAT (``cfg.qat``, ``model/quant.py``): the rotation is orthogonal on both, so in full precision
it changes nothing.

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

from v4train.model.compressor import Compressor
from v4train.model.config import ModelConfig
from v4train.model.layout import CompressedLayout
from v4train.model.quant import qat_indexer
from v4train.model.rope import apply_rope
from v4train import kernels
from v4train.kernels.reference import select_topk
from v4train.kernels.torch_cores import gather_rows
from v4train.parallel.tensor_parallel import TensorParallel, column_linear, gather_heads

__all__ = ["Indexer", "indexer_scores", "indexer_kl", "indexer_recall"]


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
        self.compressor = Compressor(cfg.dim, cfg.index_head_dim, ratio, overlap=True, norm_eps=cfg.norm_eps,
                                     qat="indexer" if cfg.qat else None)
        self.qat = cfg.qat
        self.weight_scale = cfg.index_head_dim ** -0.5 * cfg.index_n_heads ** -0.5

    def project(self, x_BTD: torch.Tensor, qr_BTL: torch.Tensor, rope_T: tuple[torch.Tensor, torch.Tensor],
                layout: CompressedLayout, rope_N: tuple[torch.Tensor, torch.Tensor],
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(q [B, T, H, E], k [B, N, E], w [B, T, H])`` from detached-or-not inputs (caller decides):
        :meth:`query` and :meth:`keys_and_weights` in one call."""
        return (self.query(qr_BTL, rope_T), *self.keys_and_weights(x_BTD, layout, rope_N))

    def query(self, qr_BTL: torch.Tensor, rope_T: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Queries ``q^I`` ``[B, T, H, E]`` = RoPE(c^Q W^IUQ) of this rank's heads (Hadamard + FP4 under QAT,
        as its keys: the rotation cancels in q . k)."""
        q_BTHE = apply_rope(self.wq_b(qr_BTL).unflatten(-1, (self.n_heads, self.head_dim)), *rope_T)
        return qat_indexer(q_BTHE) if self.qat else q_BTHE

    def keys_and_weights(self, x_BTD: torch.Tensor, layout: CompressedLayout,
                         rope_N: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k [B, N, E], w [B, T, H])``: the compressed keys and this rank's head weights (scale folded in)."""
        return self.compressor(x_BTD, layout, *rope_N), self.weights_proj(x_BTD).float() * self.weight_scale

    def select(self, q_BTHE: torch.Tensor, k_BNE: torch.Tensor, w_BTH: torch.Tensor,
               layout: CompressedLayout) -> torch.Tensor:
        """Top-k visible compressed slots per query ``[B, T, min(topk, N)]`` int64, -1 = none (in increasing
        slot order; ties to the lower slot), through the kernels dispatch (Triton on CUDA)."""
        q_BTHE, w_BTH = gather_heads(q_BTHE, self.tp, dim=2), gather_heads(w_BTH, self.tp, dim=2)
        picks = kernels.indexer_topk(q_BTHE, k_BNE, w_BTH, 1, self.topk,
                                     visible_start=layout.lo_BT, visible_end=layout.hi_BT)
        return picks.indices.long()


def indexer_scores(q_BTHE: torch.Tensor, k_BNE: torch.Tensor, w_BTH: torch.Tensor,
                   slots_BTK: torch.Tensor) -> torch.Tensor:
    """Differentiable I[t, slot] ``[B, T, K]`` fp32 at the given slots (-1 slots score -inf).

    Saves q, k, w and the slots only; forward and backward gather the keys in chunks of queries
    (``[B, c, K, E]`` at most ``_CHUNK_ELEMENTS``), never all ``[B, T, K, E]`` at once.
    """
    return _IndexerScores.apply(q_BTHE.float(), k_BNE.float(), w_BTH.float(), slots_BTK)


# elements of the largest transient of one query chunk (gathered keys, their gradient): 256 KiB fp32
_CHUNK_ELEMENTS = 1 << 16


def _query_chunks(slots_BTK: torch.Tensor, k_BNE: torch.Tensor):
    """``(t0, t1)`` query ranges whose gathered keys ``[B, t1 - t0, K, E]`` stay within the chunk budget."""
    B, T, K = slots_BTK.shape
    c = max(1, _CHUNK_ELEMENTS // max(1, B * K * k_BNE.shape[-1]))
    return ((t0, min(t0 + c, T)) for t0 in range(0, T, c))


class _IndexerScores(torch.autograd.Function):
    """Chunks of queries, each in its own function so that its transients are freed before the next's."""

    @staticmethod
    def forward(ctx, q_BTHE, k_BNE, w_BTH, slots_BTK):
        score_BTK = q_BTHE.new_empty(slots_BTK.shape)
        for t0, t1 in _query_chunks(slots_BTK, k_BNE):
            score_BTK[:, t0:t1] = _chunk_scores(q_BTHE[:, t0:t1], k_BNE, w_BTH[:, t0:t1], slots_BTK[:, t0:t1])
        ctx.save_for_backward(q_BTHE, k_BNE, w_BTH, slots_BTK)
        return score_BTK.masked_fill_(slots_BTK < 0, float("-inf"))

    @staticmethod
    def backward(ctx, grad_BTK):
        q_BTHE, k_BNE, w_BTH, slots_BTK = ctx.saved_tensors
        dq_BTHE, dw_BTH, dk_BNE = torch.empty_like(q_BTHE), torch.empty_like(w_BTH), torch.zeros_like(k_BNE)
        for t0, t1 in _query_chunks(slots_BTK, k_BNE):
            _chunk_scores_backward(q_BTHE[:, t0:t1], k_BNE, w_BTH[:, t0:t1], slots_BTK[:, t0:t1], grad_BTK[:, t0:t1],
                                   dq_BTHE[:, t0:t1], dw_BTH[:, t0:t1], dk_BNE)
        return dq_BTHE, dk_BNE, dw_BTH, None


def _chunk_scores(q_BcHE, k_BNE, w_BcH, slots_BcK) -> torch.Tensor:
    """Scores ``[B, c, K]`` of one query chunk (invalid slots not yet masked)."""
    k_BcKE = gather_rows(k_BNE, slots_BcK.clamp(min=0))
    relu_BcHK = torch.matmul(q_BcHE, k_BcKE.transpose(-1, -2)).relu_()
    return torch.matmul(w_BcH.unsqueeze(2), relu_BcHK).squeeze(2)


def _chunk_scores_backward(q_BcHE, k_BNE, w_BcH, slots_BcK, grad_BcK, dq_BcHE, dw_BcH, dk_BNE) -> None:
    """One query chunk of the scores' backward: writes its dq and dw, adds its share to dk."""
    B, N, E = k_BNE.shape
    slots = slots_BcK.clamp(min=0)
    k_BcKE = gather_rows(k_BNE, slots)
    dots_BcHK = torch.matmul(q_BcHE, k_BcKE.transpose(-1, -2))
    grad_Bc1K = grad_BcK.masked_fill(slots_BcK < 0, 0.0).unsqueeze(2)
    dw_BcH.copy_((dots_BcHK.relu() * grad_Bc1K).sum(-1))
    ddots_BcHK = (grad_Bc1K * w_BcH.unsqueeze(-1)).masked_fill_(dots_BcHK <= 0, 0.0)
    dq_BcHE.copy_(torch.matmul(ddots_BcHK, k_BcKE))
    dk_BcKE = torch.matmul(ddots_BcHK.transpose(-1, -2), q_BcHE)
    flat = (slots + torch.arange(B, device=slots.device).view(B, 1, 1) * N).reshape(-1)
    dk_BNE.view(B * N, E).index_add_(0, flat, dk_BcKE.reshape(-1, E))


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
    """Mean share of the target mass that the indexer's top-k (among the given slots) would keep.

    The top-k breaks ties toward the lower slot (:func:`kernels.reference.select_topk`), as the
    selection of ``sparse`` mode does, so the metric is the mass that mode would attend to."""
    valid_BTK = slots_BTK >= 0
    mass_BTK = mass_BTK.masked_fill(~valid_BTK, 0.0)
    total_BT = mass_BTK.sum(-1)
    rows_BT = total_BT > 0
    if not rows_BT.any() or score_BTK.shape[-1] == 0:
        return torch.ones((), device=score_BTK.device)
    pick_BTK, _ = select_topk(score_BTK.clone(), valid_BTK, min(topk, score_BTK.shape[-1]))
    kept_BT = torch.where(pick_BTK >= 0, mass_BTK.gather(-1, pick_BTK.long().clamp(min=0)), 0.0).sum(-1)
    return (kept_BT[rows_BT] / total_BT[rows_BT]).mean()
