"""Token-level KV compressor of CSA and HCA layers (spec 3.2, R eqs. 9-12 and 20-23, OC ``Compressor``).

For each compressed entry (a block of ``ratio`` tokens of one document, ``model/layout.py``):

* HCA (no overlap): C = x W^KV, Z = x W^Z (both d -> c); entry = sum_j softmax_j(Z_j + B_j) * C_j,
  the softmax over the block's token slots j separately for every channel; B = ``ape`` [m, c].
* CSA (``overlap``, OC: ratio == 4): W^KV and W^Z output 2c channels; the first half is the overlap
  series b, the second half the current series a. Entry i pools the a-series of block i with the
  b-series of block i-1 in one joint per-channel softmax over 2m slots. ``ape`` is [m, 2c], added to
  the gate logits before the overlap shift, so block i-1's b-slots use ``ape[:, :c]`` and block i's
  a-slots ``ape[:, c:]`` (spec 0.1 item 5). Entry 0 of a document pads the b-part (Z = -inf, C = 0).

Then RMSNorm (learnable, dim c) and RoPE on the last ``rope_head_dim`` dims at the position of the
block's first token. The compressor reads the attn_norm output (spec 0.1 item 11) and computes in
fp32 ("compression need fp32"). With QAT (``qat``) the main compressor's
entries get FP8 rounding of their non-RoPE dims, the indexer's the Hadamard rotation and FP4 rounding
(``model/quant.py``).

Shape letters: B batch, T tokens, D model dim, N entry slots, M = ratio tokens per block, S = (1 +
overlap) * M slots pooled per entry, C entry dim, P rope pairs.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from v4train.model.layout import CompressedLayout
from v4train.model.norm import RMSNorm
from v4train.model.quant import qat_indexer, qat_kv
from v4train.model.rope import apply_rope
from v4train.parallel.muon import MuonSplit
from v4train.kernels.torch_cores import gather_rows

__all__ = ["Compressor"]


class Compressor(nn.Module):
    """``[B, T, D]`` -> ``[B, N, C]`` compressed entries of one layout (HCA, or CSA when ``overlap``)."""

    def __init__(self, dim: int, head_dim: int, ratio: int, *, overlap: bool, norm_eps: float,
                 qat: str | None = None):
        super().__init__()
        self.head_dim, self.ratio, self.overlap = head_dim, ratio, overlap
        self.qat = qat  # None, "kv" (FP8 non-RoPE dims) or "indexer" (Hadamard + FP4): model/quant.py
        width = (1 + overlap) * head_dim
        self.ape = nn.Parameter(torch.zeros(ratio, width, dtype=torch.float32))
        self.wkv = nn.Linear(dim, width, bias=False)
        self.wgate = nn.Linear(dim, width, bias=False)
        self.norm = RMSNorm(head_dim, norm_eps)
        if overlap:
            # the overlap (b) and current (a) series are two matrices for Muon (spec 6)
            for linear in (self.wkv, self.wgate):
                linear.weight.muon_split = MuonSplit(0, (head_dim, head_dim))

    def forward(self, x_BTD: torch.Tensor, layout: CompressedLayout, cos_BNP: torch.Tensor,
                sin_BNP: torch.Tensor) -> torch.Tensor:
        """``[B, N, C]`` entries in x's dtype; ``cos``/``sin`` ``[B, N, P]`` are the entries' RoPE angles.

        When autograd records, the whole step is recomputed in the backward instead of saved: it would
        keep the gathered ``[B, N, S, C]`` values and their softmax, 2 S = 4 m floats per entry channel
        (256 per token for a CSA layer of head dim 64), while redoing it costs the two projections of x
        and the pooling. Nothing inside communicates or logs, so the recomputation reproduces the same
        values without side effects.
        """
        if layout.n_slots == 0:  # fewer tokens than one block: no compressed entries (spec 0.1 item 11)
            return x_BTD.new_zeros(x_BTD.shape[0], 0, self.head_dim)
        if not torch.is_grad_enabled():
            return self._compress(x_BTD, layout, cos_BNP, sin_BNP)
        return checkpoint(self._compress, x_BTD, layout, cos_BNP, sin_BNP, use_reentrant=False)

    def _compress(self, x_BTD: torch.Tensor, layout: CompressedLayout, cos_BNP: torch.Tensor,
                  sin_BNP: torch.Tensor) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        m, C, N = self.ratio, self.head_dim, layout.n_slots
        x32 = x_BTD.float()
        slots_M = torch.arange(m, device=x_BTD.device)
        # tokens of each entry's own block (unused slots read token T-1; they are never attended)
        own_BNM = (layout.starts_BN.unsqueeze(-1) + slots_M).clamp(max=T - 1)
        if self.overlap:
            # rows of the projections viewed as [B, 2T, C]: row 2t is token t's b-series, 2t+1 its
            # a-series; an entry's slots are block i-1's b-rows, then block i's a-rows (one gather)
            prev_BNM = (layout.starts_BN.unsqueeze(-1) - m + slots_M).clamp(0, T - 1)
            rows_BNS = torch.cat((2 * prev_BNM, 2 * own_BNM + 1), dim=-1)
            ape_SC = torch.cat((self.ape[:, :C], self.ape[:, C:]), dim=0)
        else:
            rows_BNS, ape_SC = own_BNM, self.ape
        kv_BNSC = gather_rows(self.wkv(x32).view(B, -1, C), rows_BNS)
        score_BNSC = gather_rows(self.wgate(x32).view(B, -1, C), rows_BNS) + ape_SC
        if self.overlap:  # entry 0 of a document: no block i-1, its b-slots pad (Z = -inf, C = 0)
            b_slot_S1 = (torch.arange(2 * m, device=x_BTD.device) < m).view(-1, 1)
            pad_BNS1 = (~layout.has_prev_BN).view(B, N, 1, 1) & b_slot_S1
            kv_BNSC = kv_BNSC.masked_fill(pad_BNS1, 0.0)
            score_BNSC = score_BNSC.masked_fill(pad_BNS1, float("-inf"))
        pooled_BNC = (kv_BNSC * score_BNSC.softmax(dim=2)).sum(dim=2)
        entries_BNC = apply_rope(self.norm(pooled_BNC), cos_BNP, sin_BNP)
        if self.qat == "kv":
            entries_BNC = qat_kv(entries_BNC, 2 * cos_BNP.shape[-1])
        elif self.qat == "indexer":
            entries_BNC = qat_indexer(entries_BNC)
        return entries_BNC.to(x_BTD.dtype)

    def init_parameter(self, name: str, tensor: torch.Tensor, generator: torch.Generator, std: float) -> None:
        """Initialisation hook used by ``V4Stage.init_weights`` for ``ape``: 0 (spec 10.2)."""
        tensor.zero_()
