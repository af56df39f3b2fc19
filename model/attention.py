"""DeepSeek-V4 attention, first cut: sliding-window shared-KV MQA (spec 3.1, 3.5; OC ``Attention``).

Structure per layer: low-rank query (wq_a -> q_norm -> wq_b) with a weightless per-head RMS norm; one
shared KV head (wkv -> kv_norm) that is both key and value; partial RoPE on the last rope_head_dim dims;
one softmax per head over the window plus a per-head sink logit that enters only the denominator
(unscaled, spec 0.1 item 2); output de-rotation; grouped output projection (wo_a per group as an
einsum, then wo_b). CSA/HCA compressed entries and the indexer come in a later issue; every layer is
SWA here whatever its compress ratio.

Visibility (contracts): key j is visible to query t iff t - window < j <= t and
position_ids[t] - position_ids[j] == t - j, i.e. same packed document. No [S, S] tensor is built: the
window is unfolded into ``[B, S, C, W]`` views.

Shape letters: B batch, S sequence, D model dim, L q_lora_rank, H heads, C head_dim, P rope pairs,
W window slots, G output groups, R o_lora_rank, I = H*C/G per-group input.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.norm import RMSNorm
from model.rope import apply_rope, layer_rope_frequencies, rope_angles

__all__ = ["Attention", "window_attention"]


class Attention(nn.Module):
    """Sliding-window attention of global layer ``layer_idx``: ``[B, S, D] -> [B, S, D]`` (spec 3.1)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.n_heads, self.head_dim, self.window = cfg.n_heads, cfg.head_dim, cfg.window
        self.o_groups, self.o_lora_rank, self.eps = cfg.o_groups, cfg.o_lora_rank, cfg.norm_eps
        self.wq_a = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
        self.wq_b = nn.Linear(cfg.q_lora_rank, cfg.n_heads * cfg.head_dim, bias=False)
        self.wkv = nn.Linear(cfg.dim, cfg.head_dim, bias=False)
        self.kv_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        # OC layout: wo_a.weight is [G*R, I], read as G blocks of [R, I] (contiguous head groups)
        self.wo_a = nn.Linear(cfg.n_heads * cfg.head_dim // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank, bias=False)
        self.wo_b = nn.Linear(cfg.o_groups * cfg.o_lora_rank, cfg.dim, bias=False)
        self.attn_sink = nn.Parameter(torch.zeros(cfg.n_heads, dtype=torch.float32))
        self.register_buffer("rope_freqs", layer_rope_frequencies(cfg, layer_idx), persistent=False)

    def forward(self, x_BSD: torch.Tensor, position_ids_BS: torch.Tensor) -> torch.Tensor:
        """x_BSD: the attn_norm output; position_ids_BS: int64 positions (restarting per document)."""
        B, S, _ = x_BSD.shape
        cos_BSP, sin_BSP = rope_angles(position_ids_BS, self.rope_freqs)
        # 1. low-rank query, per-head weightless RMS norm ("query normalisation"), RoPE
        q_BSHC = self.wq_b(self.q_norm(self.wq_a(x_BSD))).unflatten(-1, (self.n_heads, self.head_dim))
        q_BSHC = q_BSHC * torch.rsqrt(q_BSHC.square().mean(-1, keepdim=True) + self.eps)
        q_BSHC = apply_rope(q_BSHC, cos_BSP, sin_BSP)
        # 2. single shared KV head, used as key and value
        kv_BSC = apply_rope(self.kv_norm(self.wkv(x_BSD)), cos_BSP, sin_BSP)
        # 3. windowed softmax with sink, then undo the value rotation at the query position
        o_BSHC = window_attention(q_BSHC, kv_BSC, self.attn_sink, position_ids_BS,
                                  window=self.window, scale=self.head_dim ** -0.5)
        o_BSHC = apply_rope(o_BSHC, cos_BSP, sin_BSP, inverse=True)
        # 4. grouped output projection
        o_BSGI = o_BSHC.reshape(B, S, self.o_groups, -1)
        wo_a_GRI = self.wo_a.weight.view(self.o_groups, self.o_lora_rank, -1)
        o_BSGR = torch.einsum("bsgi,gri->bsgr", o_BSGI, wo_a_GRI)
        return self.wo_b(o_BSGR.flatten(2))

    def init_parameter(self, name: str, tensor: torch.Tensor, generator: torch.Generator, std: float) -> None:
        """Initialisation hook used by ``V4Stage.init_weights`` for the one direct parameter,
        ``attn_sink``: sink logits start at 0 (spec 10.2)."""
        tensor.zero_()


def window_attention(
    q_BSHC: torch.Tensor, kv_BSC: torch.Tensor, sink_H: torch.Tensor, position_ids_BS: torch.Tensor,
    *, window: int, scale: float,
) -> torch.Tensor:
    """Softmax(scale * q.k) over the visible window entries with a sink in the denominator, times kv.

    Returns ``[B, S, H, C]`` in q's dtype; logits and softmax in fp32. Masked slots are -inf; the
    query itself is always visible, so no row is empty. Source: R eq. 27, OC ``sparse_attn``.
    """
    B, S, H, _ = q_BSHC.shape
    W = min(window, S)
    # slot w of query t holds key j = t - (W - 1) + w; left padding stands in for j < 0
    kv_win_BSCW = F.pad(kv_BSC, (0, 0, W - 1, 0)).unfold(1, W, 1)
    pos_win_BSW = F.pad(position_ids_BS, (W - 1, 0)).unfold(1, W, 1)
    offset_W = torch.arange(W - 1, -1, -1, device=q_BSHC.device)  # t - j per slot
    t_S = torch.arange(S, device=q_BSHC.device)
    visible_BSW = ((position_ids_BS.unsqueeze(-1) - pos_win_BSW) == offset_W) & (t_S.unsqueeze(-1) >= offset_W)

    logits_BSHW = torch.matmul(q_BSHC.float(), kv_win_BSCW.float()) * scale
    logits_BSHW = logits_BSHW.masked_fill(~visible_BSW.unsqueeze(2), float("-inf"))
    sink_BSH1 = sink_H.float().view(1, 1, H, 1).expand(B, S, H, 1)
    probs_BSHW = torch.cat((logits_BSHW, sink_BSH1), dim=-1).softmax(dim=-1)[..., :W]
    o_BSHC = torch.matmul(probs_BSHW, kv_win_BSCW.float().transpose(-1, -2))
    return o_BSHC.to(q_BSHC.dtype)
