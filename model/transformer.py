"""DeepSeek-V4 transformer block and pipeline stage (spec section 2; OC ``Block``, ``Transformer``).

  tokens -> embed -> repeat to N streams                                    (first stage)
  per layer:  X = hc_write(attn(attn_norm(hc_attn.read(X))), X)             (spec 2, 3.1, 4)
              X = hc_write(moe(ffn_norm(hc_ffn.read(X)), tokens), X)        (spec 5.1)
  hc_head -> norm -> head -> per-token cross-entropy (fp32)                  (last stage)

A ``V4Stage`` is one pipeline stage; with pp_size = 1 it is the whole model. Layers live in a
ModuleDict keyed by the global layer index, so parameter names (``layers.3.attn.wq_a.weight``) are the
same in every pipeline layout, and ``init_weights(seed)`` seeds every parameter from (seed, name): any
split of the model starts from bit-identical weights.

Not in this first cut: MTP (``cfg.mtp_depth`` is kept but no MTP block is built; issue 3) and the
CSA/HCA compressed attention branches (every layer is sliding-window attention).

Shape letters: B batch, S sequence, N hc streams, D model dim, V vocab.
"""

from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F
from torch import nn

from model.attention import Attention
from model.config import ModelConfig
from model.mhc import HyperConnection, HyperHead, hc_write
from model.moe import MoE, Router
from model.norm import RMSNorm

__all__ = ["Block", "V4Stage", "stage_layer_ranges"]


def stage_layer_ranges(n_layers: int, pp_size: int) -> list[range]:
    """Contiguous, balanced global layer ranges per pipeline stage; earlier stages take the remainder
    (the last stage also runs the output head). Raises ValueError unless 1 <= pp_size <= n_layers."""
    if not 1 <= pp_size <= n_layers:
        raise ValueError(f"pp_size {pp_size} must be between 1 and n_layers ({n_layers}): each stage needs a layer")
    base, extra = divmod(n_layers, pp_size)
    ranges, start = [], 0
    for rank in range(pp_size):
        stop = start + base + (1 if rank < extra else 0)
        ranges.append(range(start, stop))
        start = stop
    return ranges


class Block(nn.Module):
    """One V4 layer on the N-stream residual: ``[B, S, N, D] -> [B, S, N, D]`` (spec 2)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        hc = dict(sinkhorn_iters=cfg.hc_sinkhorn_iters, hc_eps=cfg.hc_eps, norm_eps=cfg.norm_eps)
        self.hc_attn = HyperConnection(cfg.dim, cfg.hc_mult, **hc)
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg, layer_idx)
        self.hc_ffn = HyperConnection(cfg.dim, cfg.hc_mult, **hc)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn = MoE(cfg, layer_idx)

    def forward(self, X_BSND: torch.Tensor, position_ids_BS: torch.Tensor, input_ids_BS: torch.Tensor,
                aux_loss_scale: float) -> torch.Tensor:
        x_BSD, post, comb = self.hc_attn.read(X_BSND)
        X_BSND = hc_write(self.attn(self.attn_norm(x_BSD), position_ids_BS), X_BSND, post, comb)
        x_BSD, post, comb = self.hc_ffn.read(X_BSND)
        y_BSD = self.ffn(self.ffn_norm(x_BSD), input_ids_BS, aux_loss_scale)
        return hc_write(y_BSD, X_BSND, post, comb)


class V4Stage(nn.Module):
    """Pipeline stage ``pp_rank`` of ``pp_size`` (contracts, ``model/``).

    First stage: ``embed``. Last stage: ``hc_head``, ``norm``, ``head`` (untied). Between stages the
    streams travel as ``[S, B, N*D]`` fp32 (Megatron's p2p layout) through :meth:`set_input_tensor`.
    ``aux_loss_scale`` (default 1.0, read at forward time) scales the MoE balance-loss gradient; the
    caller sets it to 1/num_microbatches. Raises ValueError for a bad pp_rank/pp_size.
    """

    def __init__(self, cfg: ModelConfig, *, pp_rank: int, pp_size: int):
        super().__init__()
        ranges = stage_layer_ranges(cfg.n_layers, pp_size)
        if not 0 <= pp_rank < pp_size:
            raise ValueError(f"pp_rank {pp_rank} is outside 0..{pp_size - 1}")
        self.cfg, self.pp_rank, self.pp_size = cfg, pp_rank, pp_size
        self.layer_range = ranges[pp_rank]
        self.is_first_stage, self.is_last_stage = pp_rank == 0, pp_rank == pp_size - 1
        self.aux_loss_scale = 1.0
        self._input_tensor: torch.Tensor | None = None
        if self.is_first_stage:
            self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleDict({str(i): Block(cfg, i) for i in self.layer_range})
        if self.is_last_stage:
            self.hc_head = HyperHead(cfg.dim, cfg.hc_mult, hc_eps=cfg.hc_eps, norm_eps=cfg.norm_eps)
            self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def set_input_tensor(self, input_tensor: torch.Tensor | list | None) -> None:
        """Megatron pipeline hook: the previous stage's ``[S, B, N*D]`` output (a 1-element list or None)."""
        if isinstance(input_tensor, (list, tuple)):
            if len(input_tensor) != 1:
                raise ValueError(f"stage {self.pp_rank}: expected one input tensor, got {len(input_tensor)}")
            input_tensor = input_tensor[0]
        self._input_tensor = input_tensor

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """Run this stage on ``input_ids``/``position_ids`` ``[B, S]`` int64 (every stage needs both).

        Returns the streams ``[S, B, N*D]`` fp32 on a non-last stage; on the last stage the per-token
        next-token cross-entropy ``[B, S]`` fp32 (0 where ``labels == -100``), or the logits
        ``[B, S, V]`` when ``labels`` is None. Raises RuntimeError on a non-first stage with no input
        tensor set.
        """
        X_BSND = self._embed(input_ids) if self.is_first_stage else self._received_streams(input_ids)
        for block in self.layers.values():
            X_BSND = block(X_BSND, position_ids, input_ids, self.aux_loss_scale)
        if not self.is_last_stage:
            # a fresh tensor, never a view (B = 1 would make contiguous() a no-op): Megatron frees the
            # storage of sent outputs and refuses views
            return X_BSND.flatten(2).transpose(0, 1).clone(memory_format=torch.contiguous_format)
        logits_BSV = self.head(self.norm(self.hc_head(X_BSND))).float()
        if labels is None:
            return logits_BSV
        B, S, V = logits_BSV.shape
        return F.cross_entropy(logits_BSV.view(B * S, V), labels.reshape(B * S), reduction="none").view(B, S)

    def _embed(self, input_ids_BS: torch.Tensor) -> torch.Tensor:
        e_BSD = self.embed(input_ids_BS)
        return e_BSD.unsqueeze(2).repeat(1, 1, self.cfg.hc_mult, 1)

    def _received_streams(self, input_ids_BS: torch.Tensor) -> torch.Tensor:
        t_SBF = self._input_tensor
        if t_SBF is None:
            raise RuntimeError(f"stage {self.pp_rank} of {self.pp_size}: forward called before set_input_tensor")
        expected = (input_ids_BS.shape[1], input_ids_BS.shape[0], self.cfg.hc_mult * self.cfg.dim)
        if tuple(t_SBF.shape) != expected:
            raise RuntimeError(f"stage {self.pp_rank}: input tensor shape {tuple(t_SBF.shape)}, expected {expected}")
        return t_SBF.transpose(0, 1).unflatten(-1, (self.cfg.hc_mult, self.cfg.dim))

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Initialise every parameter from a generator seeded by crc32("{seed}/{name}") (layout-free).

        A module's direct parameters go through its ``init_parameter(name, tensor, generator, std)``
        hook when it has one (norm scales 1, sink 0, mHC per spec 10.2); all other weights (linears,
        embedding, router) are N(0, init_std). Values are drawn on the CPU and copied, so they are
        the same on every device. Router biases and load counts are reset to 0.
        """
        std = self.cfg.init_std
        for module_name, module in self.named_modules():
            for name, param in module.named_parameters(recurse=False):
                fqn = f"{module_name}.{name}" if module_name else name
                gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{fqn}".encode()))
                if hasattr(module, "init_parameter"):
                    value = torch.empty(param.shape, dtype=param.dtype)
                    module.init_parameter(name, value, gen, std)
                else:
                    value = torch.empty(param.shape, dtype=param.dtype).normal_(0.0, std, generator=gen)
                param.copy_(value)
            if isinstance(module, Router) and not module.is_hash:
                module.bias.zero_()
                module.expert_counts.zero_()

    def pop_aux_metrics(self) -> dict[str, float]:
        """``{"balance_loss": ...}``: over this stage's MoE layers, the sum of each layer's mean weighted
        balance loss across the training forwards since the last call; ``{}`` if none ran. Clears the log."""
        per_layer = []
        for module in self.modules():
            if isinstance(module, MoE) and module.aux_log:
                per_layer.append(torch.stack(module.aux_log).mean())
                module.aux_log.clear()
        if not per_layer:
            return {}
        return {"balance_loss": float(torch.stack(per_layer).sum())}
