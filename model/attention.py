"""DeepSeek-V4 hybrid attention: SWA, CSA and HCA layers on shared-KV MQA (spec 3; OC ``Attention``).

Per layer (type from ``compress_ratios[layer]``: 0 = SWA only, 4 = CSA, any other m' = HCA; OC ties
the overlap and the indexer to ratio 4):

1. Low-rank query ``wq_a -> q_norm -> wq_b``, then a weightless per-head RMS norm ("query
   normalisation") and RoPE on the last rope_head_dim dims. ``c^Q`` (``qr``) feeds the indexer too.
2. One shared KV head ``wkv -> kv_norm`` (key *and* value) with RoPE: the window entries.
3. CSA/HCA: the compressor's entries (``model/compressor.py``), appended after the T window entries:
   kv = [window KV (T) | compressed slots (N)].
4. Indices per query: the window slots (``model/layout.py``), then the compressed entries: *all*
   visible ones for HCA and for CSA in ``dense``/``indexer_warmup`` mode (passed to the core as one
   slot range per query, except in ``indexer_warmup`` training, whose KL loss reads them as indices),
   the indexer's top-k for CSA in ``sparse`` mode (-1 = none). In ``dense`` mode the indexer is idle
   (no compute, no gradient).
5. One softmax over all of them with the per-head sink (:func:`kernels.sparse_attention`, the kernels dispatch,
   called in exactly one place, :meth:`Attention._core`), then de-rotation of the output's RoPE dims at
   the query position ("position -t"), and the grouped output projection (``wo_a`` per contiguous
   group of heads as an einsum, then ``wo_b``).
6. CSA in ``indexer_warmup``/``sparse`` training forwards: the indexer KL loss (``model/indexer.py``)
   enters the backward through :class:`model.moe.AuxLossInjector` on this layer's output.

Tensor parallelism (``tp``, :mod:`parallel.tensor_parallel`): query heads, their sinks and the output
groups are split over the TP ranks (``wq_b`` and ``wo_a`` column-parallel, ``wo_b`` row-parallel, so the
layer output is summed over ranks); the low-rank query ``wq_a``, the shared KV head and the compressors
are replicated, and the KV entries pass through Megatron's *f* operator so their gradient is the sum
over all heads. The indexer splits its heads the same way (``model/indexer.py``). Requires tp to divide
n_heads, o_groups and index_n_heads (ValueError naming the field).

Memory (training): per token the layer keeps the core's inputs and outputs (q after norm and RoPE,
the kv rows, the output and its log-normaliser, the indices), ``c^Q`` (wq_b's input) and the indexer's
KL terms. Everything else is recomputed in the backward (:func:`_recomputed`): ``c^Q`` from x, the
window KV, the compressors' pooling (``model/compressor.py``), the de-rotation with the output
projection, and the indexer's queries; the per-head query norm's backward works from its output
(:class:`_HeadNormRope`). Collectives and the aux-loss logging stay outside the recomputed steps: a
row-parallel ``wo_b`` is called after its region, ``copy_to_region``/``reduce_from_region`` around them.

Visibility (windows, documents, compressed blocks) is defined in ``model/layout.py``. Precision: fp32
throughout on CPU; with ``cfg.qat`` the KV entries' non-RoPE dims are FP8-rounded (``model/quant.py``).
No ``[T, T]`` tensor is built.

Shape letters: B batch, T tokens, D model dim, L q_lora_rank, H heads, C head_dim, P rope pairs,
W window slots, N compressed slots, X = T + N kv rows, K attended slots, G output groups, R o_lora_rank,
I = H*C/G.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from v4train.model.compressor import Compressor
from v4train.model.config import ModelConfig
from v4train.model.indexer import Indexer, indexer_kl, indexer_recall, indexer_scores
from v4train.model.layout import SequenceContext
from v4train.model.moe import AuxLossInjector
from v4train.model.norm import RMSNorm
from v4train.model.quant import qat_kv
from v4train.model.rope import apply_rope, layer_rope_frequencies, rope_angles
from v4train.kernels import sparse_attention
from v4train.kernels.torch_cores import attention_probabilities
from v4train.parallel import context_parallel
from v4train.parallel.muon import MuonSplit
from v4train.parallel.tensor_parallel import (TensorParallel, column_linear, copy_to_region, mark_sharded,
                                      reduce_from_region, row_linear)

__all__ = ["Attention", "CSA_RATIO", "layer_type"]

CSA_RATIO = 4


def _recomputed(fn, *args: torch.Tensor) -> torch.Tensor:
    """``fn(*args)``, its intermediate activations recomputed in the backward instead of saved.

    Only for cheap steps (projections, norms, RoPE) without collectives or logging: the recomputation
    re-runs ``fn``'s forward (``torch.utils.checkpoint``, non-reentrant), so ``fn`` must be pure; it
    then reproduces the same values.
    """
    if not torch.is_grad_enabled():
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False)


class _HeadNormRope(torch.autograd.Function):
    """y = RoPE(x r), r = (mean_C(x^2) + eps)^-1/2 per head: the weightless query norm, then RoPE.

    Saves y (which the attention core keeps anyway) and r, not x: RoPE is an orthogonal R and the
    norm's Jacobian r (I - x^ x^T / C) (x^ = x r = R^T y) is symmetric, so the input gradient is
    R^T [r (g - y mean(g y))] in the rotated frame, where <x^, R^T g> = <y, g>.
    """

    @staticmethod
    def forward(ctx, x_BTHC, cos_BTP, sin_BTP, eps):
        r_BTH1 = torch.rsqrt(x_BTHC.square().mean(-1, keepdim=True) + eps)
        y_BTHC = apply_rope(x_BTHC * r_BTH1, cos_BTP, sin_BTP)
        ctx.save_for_backward(y_BTHC, r_BTH1, cos_BTP, sin_BTP)
        return y_BTHC

    @staticmethod
    def backward(ctx, grad_BTHC):
        y_BTHC, r_BTH1, cos_BTP, sin_BTP = ctx.saved_tensors
        dz_BTHC = r_BTH1 * (grad_BTHC - y_BTHC * (grad_BTHC * y_BTHC).mean(-1, keepdim=True))
        return apply_rope(dz_BTHC, cos_BTP, sin_BTP, inverse=True), None, None, None


class _IndexerState(NamedTuple):
    """What the indexer's KL loss needs from a forward: the indexer's (detached) c^Q input, keys and head
    weights, the chosen compressed slots, the window width."""

    qr: torch.Tensor
    k: torch.Tensor
    w: torch.Tensor
    slots: torch.Tensor
    n_window: int


def layer_type(ratio: int) -> str:
    """``"swa"``, ``"csa"`` or ``"hca"`` for a compress ratio (spec 3.7)."""
    return "swa" if ratio == 0 else "csa" if ratio == CSA_RATIO else "hca"


class Attention(nn.Module):
    """Attention of global layer ``layer_idx``: ``[B, T, D] -> [B, T, D]`` (module docstring).

    ``aux_log`` collects detached ``indexer_loss`` / ``indexer_recall`` values of training forwards,
    drained by ``V4Stage.pop_aux_metrics``.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int, tp: TensorParallel = TensorParallel()):
        super().__init__()
        self.tp = tp
        # local (this TP rank's) heads and output groups; heads of a group are contiguous, so a rank's
        # heads are exactly its groups' heads
        self.n_heads = tp.split(cfg.n_heads, "n_heads")
        self.o_groups = tp.split(cfg.o_groups, "o_groups")
        self.head_dim, self.window = cfg.head_dim, cfg.window
        self.o_lora_rank, self.eps = cfg.o_lora_rank, cfg.norm_eps
        self.ratio = cfg.compress_ratios[layer_idx]
        self.kind = layer_type(self.ratio)
        self.wq_a = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
        self.wq_b = column_linear(cfg.q_lora_rank, cfg.n_heads * cfg.head_dim, tp, what="n_heads*head_dim")
        self.wkv = nn.Linear(cfg.dim, cfg.head_dim, bias=False)
        self.kv_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        # OC layout: wo_a.weight is [G*R, I], read as G blocks of [R, I] (contiguous head groups); only
        # its weight is used (an einsum), so a column-parallel layer just holds this rank's groups
        self.wo_a = column_linear(cfg.n_heads * cfg.head_dim // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank, tp,
                                  what="o_groups*o_lora_rank")
        # Muon orthogonalises each group's [R, I] block on its own (spec 6, "logically independent")
        self.wo_a.weight.muon_split = MuonSplit(0, (cfg.o_lora_rank,) * cfg.o_groups)
        self.wo_b = row_linear(cfg.o_groups * cfg.o_lora_rank, cfg.dim, tp, what="o_groups*o_lora_rank")
        self.attn_sink = nn.Parameter(torch.zeros(self.n_heads, dtype=torch.float32))
        if tp.active:
            mark_sharded(self.attn_sink, 0)
        if self.ratio:
            self.compressor = Compressor(cfg.dim, cfg.head_dim, self.ratio, overlap=self.kind == "csa",
                                         norm_eps=cfg.norm_eps, qat="kv" if cfg.qat else None)
        if self.kind == "csa":
            self.indexer = Indexer(cfg, self.ratio, tp)
        self.register_buffer("rope_freqs", layer_rope_frequencies(cfg, layer_idx), persistent=False)
        self.qat_rope_dims = cfg.rope_head_dim if cfg.qat else None  # FP8 KV rounding spares the RoPE dims
        self.aux_log: dict[str, list[torch.Tensor]] = {"indexer_loss": [], "indexer_recall": []}
        self.recomputing = False  # True during a recompute's re-run (model/recompute.py): log nothing

    def forward(self, x_BTD: torch.Tensor, ctx: SequenceContext) -> torch.Tensor:
        """x_BTD: the attn_norm output; ``ctx`` carries positions, layouts, mode and the aux scale."""
        if ctx.context_parallel is not None:  # this rank's tokens of a CP-split sequence
            return context_parallel.context_parallel_attention(self, x_BTD, ctx.context_parallel)
        rope_T = rope_angles(ctx.position_ids, self.rope_freqs)
        # 1-2. query (low-rank, per-head RMS norm, RoPE) and the shared window KV entry
        qr_BTL = _recomputed(self._query_latent, x_BTD)
        q_BTHC = self.wq_b(qr_BTL).unflatten(-1, (self.n_heads, self.head_dim))
        q_BTHC = _HeadNormRope.apply(q_BTHC, *rope_T, self.eps)
        kv_BTC = _recomputed(self._window_kv, x_BTD, *rope_T)
        # 3-4. compressed entries and the slots each query attends to
        kv_BXC, idx_BTK, ranges, trained = self._entries_and_slots(x_BTD, qr_BTL, kv_BTC, rope_T, ctx)
        kv_BXC = copy_to_region(kv_BXC, self.tp)  # replicated entries, read by this rank's heads only
        # 5. one softmax over window + compressed entries, de-rotation, grouped output projection; a
        # row-parallel wo_b all-reduces in its forward, so it stays out of the recomputed region
        o_BTHC = self._core(q_BTHC, kv_BXC, idx_BTK, ranges)
        if self.tp.active:
            y_BTD = self.wo_b(_recomputed(self._grouped_projection, o_BTHC, *rope_T))
        else:
            y_BTD = _recomputed(self._output_projection, o_BTHC, *rope_T)
        # 6. the indexer's KL loss rides on the layer output into the backward
        if trained is not None:
            loss = self._indexer_loss(q_BTHC, kv_BXC, idx_BTK, trained, rope_T, ctx.attention_mode)
            y_BTD = AuxLossInjector.apply(y_BTD, loss, ctx.aux_loss_scale)
        return y_BTD

    def _query_latent(self, x_BTD: torch.Tensor) -> torch.Tensor:
        """``c^Q`` ``[B, T, L]`` = q_norm(wq_a x)."""
        return self.q_norm(self.wq_a(x_BTD))

    def _window_kv(self, x_BTD: torch.Tensor, cos_BTP: torch.Tensor, sin_BTP: torch.Tensor) -> torch.Tensor:
        """The window KV entries ``[B, T, C]`` = RoPE(kv_norm(wkv x)) (FP8-rounded non-RoPE dims under QAT)."""
        kv_BTC = apply_rope(self.kv_norm(self.wkv(x_BTD)), cos_BTP, sin_BTP)
        return kv_BTC if self.qat_rope_dims is None else qat_kv(kv_BTC, self.qat_rope_dims)

    def _grouped_projection(self, o_BTHC: torch.Tensor, cos_BTP: torch.Tensor, sin_BTP: torch.Tensor) -> torch.Tensor:
        """De-rotated core output through ``wo_a`` per group: ``[B, T, G*R]`` (wo_b's input)."""
        B, T = o_BTHC.shape[:2]
        o_BTGI = apply_rope(o_BTHC, cos_BTP, sin_BTP, inverse=True).reshape(B, T, self.o_groups, -1)
        wo_a_GRI = self.wo_a.weight.view(self.o_groups, self.o_lora_rank, -1)
        return torch.einsum("btgi,gri->btgr", o_BTGI, wo_a_GRI).flatten(2)

    def _output_projection(self, o_BTHC: torch.Tensor, cos_BTP: torch.Tensor, sin_BTP: torch.Tensor) -> torch.Tensor:
        """The layer output ``[B, T, D]`` = wo_b of :meth:`_grouped_projection` (a local wo_b only)."""
        return self.wo_b(self._grouped_projection(o_BTHC, cos_BTP, sin_BTP))

    def _entries_and_slots(self, x_BTD, qr_BTL, kv_BTC, rope_T, ctx: SequenceContext):
        """``(kv [B, T+N, C], indices [B, T, K] int32, ranges, trained)``: ``ranges`` ``(lo, hi, T)``
        when each query attends all its visible compressed entries (a slot range per query, no index
        list: an HCA layer at 32k would otherwise keep 1k indices per token), else None; ``trained``
        holds the indexer's inputs, keys, weights and chosen slots when this forward trains the
        indexer, else None."""
        T = x_BTD.shape[1]
        idx_BTW = ctx.window_indices(self.window)
        if self.ratio == 0:
            return kv_BTC, idx_BTW, None, None
        layout = ctx.layout(self.ratio)
        rope_N = rope_angles(layout.positions_BN, self.rope_freqs)
        kv_BXC = torch.cat((kv_BTC, self.compressor(x_BTD, layout, *rope_N)), dim=1)
        mode, trained = ctx.attention_mode, None
        sparse = self.kind == "csa" and mode == "sparse"
        train_indexer = self.kind == "csa" and mode != "dense" and self.training and torch.is_grad_enabled()
        if not (sparse or train_indexer):
            return kv_BXC, idx_BTW, (layout.lo_BT, layout.hi_BT, T), None
        # the indexer's KL reads every visible slot outside sparse mode; built only here, since the list is
        # [T, T/m] and the layout caches it for the whole step (T^2/32 int32 for an HCA layer)
        slots_BTK = None if sparse else layout.dense_indices()
        if sparse or train_indexer:
            # the indexer sees detached inputs: only its KL loss trains it (spec 3.3)
            qr_I = qr_BTL.detach()
            k_I, w_I = self.indexer.keys_and_weights(x_BTD.detach(), layout, rope_N)
            if sparse:
                with torch.no_grad():  # the top-k has no gradient; the KL loss recomputes the queries
                    slots_BTK = self.indexer.select(self.indexer.query(qr_I, rope_T), k_I, w_I, layout)
            if train_indexer:
                trained = _IndexerState(qr_I, k_I, w_I, slots_BTK, idx_BTW.shape[-1])
        shifted_BTK = torch.where(slots_BTK >= 0, slots_BTK.to(torch.int32) + T, -1).to(torch.int32)
        return kv_BXC, torch.cat((idx_BTW, shifted_BTK), dim=-1), None, trained

    def _core(self, q_BTHC: torch.Tensor, kv_BXC: torch.Tensor, idx_BTK: torch.Tensor, ranges=None) -> torch.Tensor:
        """The single call of the sparse-attention core (the kernels dispatch replaces it here)."""
        return sparse_attention(q_BTHC, kv_BXC, self.attn_sink, idx_BTK, self.head_dim ** -0.5, ranges)

    def _indexer_loss(self, q_BTHC, kv_BXC, idx_BTK, st: _IndexerState, rope_T, mode: str) -> torch.Tensor:
        # both sums over heads are partial on a TP rank: summed over the ranks (the mass without gradient)
        mass_BTK = reduce_from_region(
            attention_probabilities(q_BTHC.detach(), kv_BXC.detach(), self.attn_sink.detach(), idx_BTK,
                                    self.head_dim ** -0.5, first_slot=st.n_window), self.tp)
        k_BNE = copy_to_region(st.k, self.tp)
        score_BTK = reduce_from_region(
            _recomputed(self._indexer_scores, st.qr, k_BNE, st.w, st.slots, *rope_T), self.tp)
        loss = indexer_kl(score_BTK, mass_BTK, st.slots)
        if self.recomputing:
            return loss
        self.aux_log["indexer_loss"].append(loss.detach())
        if mode == "indexer_warmup":
            recall = indexer_recall(score_BTK.detach(), mass_BTK, st.slots, self.indexer.topk)
            self.aux_log["indexer_recall"].append(recall)
        return loss

    def _indexer_scores(self, qr_BTL, k_BNE, w_BTH, slots_BTK, cos_BTP, sin_BTP) -> torch.Tensor:
        """:func:`indexer_scores` ``[B, T, K]`` of this rank's indexer heads, their queries from c^Q (so
        that, recomputed, they are not saved: c^Q is, by wq_b)."""
        return indexer_scores(self.indexer.query(qr_BTL, (cos_BTP, sin_BTP)), k_BNE, w_BTH, slots_BTK)

    def init_parameter(self, name: str, tensor: torch.Tensor, generator: torch.Generator, std: float) -> None:
        """Initialisation hook used by ``V4Stage.init_weights`` for the one direct parameter,
        ``attn_sink``: sink logits start at 0 (spec 10.2)."""
        tensor.zero_()
