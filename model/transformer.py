"""DeepSeek-V4 pipeline stage: embedding, blocks, head, MTP (spec section 2, 5.3; OC ``Transformer``).

  tokens -> embed -> repeat to N streams                                    (first stage)
  per layer:  Block (mHC read -> attention -> mHC write; mHC read -> MoE -> mHC write)
  hc_head -> norm -> head fused with the per-token cross-entropy (fp32)     (last stage, model/head_loss.py)
  MTP blocks on the final streams -> shared head -> MTP loss (injected)     (last stage, training)

A ``V4Stage`` is one pipeline stage; with pp_size = 1 it is the whole model. Layers live in a
ModuleDict keyed by the global layer index, so parameter names (``layers.3.attn.wq_a.weight``) are the
same in every pipeline layout, and ``init_weights(seed)`` seeds every parameter from (seed, name): any
split of the model starts from bit-identical weights. MTP blocks live under ``mtp.<k>`` on the last
stage; with pp_size > 1 the last stage holds its own copy of the embedding under the same name
``embed.weight`` (identical init; the trainer sums the two copies' gradients every step, Megatron's
embedding group, via :meth:`V4Stage.shared_embedding_parameters`).

Auxiliary losses (MoE sequence balance loss, indexer KL, MTP) never enter the returned loss: each
rides into the backward through :class:`model.moe.AuxLossInjector` with the gradient scale
``aux_loss_scale`` (the trainer sets 1/num_microbatches), and is reported by :meth:`pop_aux_metrics`.

Shape letters: B batch, S sequence, N hc streams, D model dim, V vocab.
"""

from __future__ import annotations

import zlib

import torch
from torch import nn

from v4train.model.attention import Attention
from v4train.model.block import Block
from v4train.model.config import ModelConfig
from v4train.model.head_loss import fused_head_loss
from v4train.model.layout import ATTENTION_MODES, SequenceContext
from v4train.model.mhc import HyperHead
from v4train.model.moe import AuxLossInjector, MoE, Router, pop_moe_stats
from v4train.model.mtp import IGNORE_INDEX, MTPBlock, shift_left
from v4train.model.norm import RMSNorm
from v4train.model.recompute import check_recompute_mode
from v4train.parallel import context_parallel as cpar  # module import: context_parallel imports model/
from v4train.parallel.tensor_parallel import (TensorParallel, column_linear, full_shape, gather_heads, shard_of,
                                      vocab_embedding)

__all__ = ["Block", "StageChunk", "V4Stage", "stage_layer_ranges"]


def stage_layer_ranges(n_layers: int, pp_size: int, sizes: list[int] | None = None) -> list[range]:
    """Contiguous global layer ranges per pipeline stage: ``sizes[s]`` layers for stage s when given (the
    cost-balanced split of ``orchestrator/tools/stage_costs.py``, or the job's explicit list), else as even as
    possible with the earlier stages taking the remainder. Raises ValueError unless 1 <= pp_size <= n_layers,
    or when ``sizes`` is not pp_size counts >= 1 summing to n_layers."""
    if not 1 <= pp_size <= n_layers:
        raise ValueError(f"pp_size {pp_size} must be between 1 and n_layers ({n_layers}): each stage needs a layer")
    if sizes is None:
        base, extra = divmod(n_layers, pp_size)
        sizes = [base + (1 if rank < extra else 0) for rank in range(pp_size)]
    elif len(sizes) != pp_size or sum(sizes) != n_layers or min(sizes) < 1:
        raise ValueError(f"stage layers {list(sizes)}: need {pp_size} counts >= 1 summing to n_layers ({n_layers})")
    ranges, start = [], 0
    for size in sizes:
        ranges.append(range(start, start + size))
        start += size
    return ranges


class V4Stage(nn.Module):
    """Pipeline stage ``pp_rank`` of ``pp_size`` (contracts, ``model/``).

    First stage: ``embed``. Last stage: ``hc_head``, ``norm``, ``head`` (untied), ``mtp`` (cfg.mtp_depth
    blocks) and, when pp_size > 1 and MTP is on, its own ``embed``. Between stages the streams travel
    as ``[S, B, N*D]`` fp32 (Megatron's p2p layout) through :meth:`set_input_tensor`.

    Interleaved pipelining (``vp_size`` > 1, Narayanan et al. 2021 §2.2.2): the layers are cut into
    pp_size * vp_size virtual stages and this stage holds chunks i = 0..vp_size-1, virtual stages
    i * pp_size + pp_rank; :meth:`chunks` gives the views the schedule runs. The first stage's chunk 0
    embeds, the last stage's last chunk runs the head and MTP.

    Attributes read at forward time, set by the trainer: ``aux_loss_scale`` (default 1.0) scales the
    gradients of the auxiliary losses; ``attention_mode`` is one of "dense", "sparse", "indexer_warmup"
    (CSA layers; ValueError otherwise) and has no default: a forward before it is set raises
    RuntimeError, so no caller trains dense by omission; ``mtp_loss_weight`` (default 0.3)
    weighs the MTP loss (0 skips MTP); ``recompute`` (default "none") is every block's activation-recompute
    mode (:mod:`model.recompute`). ``stage_layers`` gives the layers of each of the pp_size * vp_size virtual
    stages (default: as even as possible, :func:`stage_layer_ranges`). Raises ValueError for a bad
    pp_rank/pp_size or stage_layers.

    Parallel context (passed in explicitly, never read from globals): ``tp`` splits heads, output groups, the
    shared expert's hidden units and the vocabulary (embedding, head and cross-entropy: Megatron's vocab-
    parallel layers) over the tensor-parallel ranks (ValueError naming the field tp does not divide);
    ``experts_factory(layer)`` returns the routed experts of a layer (None: :class:`model.moe.LocalExperts`,
    every expert here), the hook through which the trainer installs expert parallelism. ``cp`` splits each
    sequence over the context-parallel ranks (:mod:`parallel.context_parallel`): the stage then takes this
    rank's tokens (load-balanced split) and returns their losses; position ids and labels are all-gathered
    (cheap) so layouts, windows and MTP targets are those of the whole sequence, and the MTP loss is normalised
    by the whole sequence's valid targets. With the defaults the stage is the single-process reference.
    """

    def __init__(self, cfg: ModelConfig, *, pp_rank: int, pp_size: int, vp_size: int = 1,
                 tp: TensorParallel = TensorParallel(), experts_factory=None,
                 cp: cpar.ContextParallel | None = None, stage_layers: list[int] | None = None):
        super().__init__()
        self.tp, self.cp = tp, cp or cpar.ContextParallel()
        if vp_size < 1 or (vp_size > 1 and pp_size < 2):
            raise ValueError(f"vp_size {vp_size}: virtual stages need vp_size >= 1, and pp_size >= 2 when > 1")
        ranges = stage_layer_ranges(cfg.n_layers, pp_size * vp_size, stage_layers)
        if not 0 <= pp_rank < pp_size:
            raise ValueError(f"pp_rank {pp_rank} is outside 0..{pp_size - 1}")
        self.cfg, self.pp_rank, self.pp_size, self.vp_size = cfg, pp_rank, pp_size, vp_size
        # chunk i is virtual stage i * pp_size + pp_rank (Megatron's interleaved placement)
        self.chunk_ranges = [ranges[i * pp_size + pp_rank] for i in range(vp_size)]
        self.is_first_stage, self.is_last_stage = pp_rank == 0, pp_rank == pp_size - 1
        self.aux_loss_scale = 1.0
        self.mtp_loss_weight = 0.3
        self._attention_mode: str | None = None
        self._input_tensors: list[torch.Tensor | None] = [None] * vp_size
        self._mtp_log: list[torch.Tensor] = []
        if self.is_first_stage or (self.is_last_stage and cfg.mtp_depth > 0):
            self.embed = vocab_embedding(cfg.vocab_size, cfg.dim, tp)
        make_experts = experts_factory or (lambda _layer: None)
        self.layers = nn.ModuleDict({str(i): Block(cfg, i, tp, make_experts(i))
                                     for layers in self.chunk_ranges for i in layers})
        if self.is_last_stage:
            self.hc_head = HyperHead(cfg.dim, cfg.hc_mult, hc_eps=cfg.hc_eps, norm_eps=cfg.norm_eps)
            self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
            self.head = column_linear(cfg.dim, cfg.vocab_size, tp, what="vocab_size")
            self.mtp = nn.ModuleDict({str(k): MTPBlock(cfg, cfg.n_layers + k, tp, make_experts(cfg.n_layers + k))
                                      for k in range(cfg.mtp_depth)})

    @property
    def attention_mode(self) -> str | None:
        return self._attention_mode

    @attention_mode.setter
    def attention_mode(self, mode: str) -> None:
        if mode not in ATTENTION_MODES:
            raise ValueError(f"attention_mode {mode!r}: choose one of {', '.join(ATTENTION_MODES)}")
        self._attention_mode = mode

    @property
    def recompute(self) -> str:
        """Activation-recompute mode of every block, MTP blocks included (:mod:`model.recompute`);
        ValueError naming ``recompute`` for a mode other than none / selective / full."""
        return next((b.recompute for b in self.modules() if isinstance(b, Block)), "none")

    @recompute.setter
    def recompute(self, mode: str) -> None:
        check_recompute_mode(mode)
        for block in self.modules():
            if isinstance(block, Block):
                block.recompute = mode

    def shared_embedding_parameters(self) -> list[nn.Parameter]:
        """The embedding parameters whose gradients the trainer sums across the first and last stage.

        ``[embed.weight]`` on the first and the last stage when pp_size > 1 and MTP is on; ``[]`` on
        middle stages, with pp_size == 1 (one embedding, nothing to tie) and without MTP.
        """
        if self.pp_size == 1 or self.cfg.mtp_depth == 0 or not (self.is_first_stage or self.is_last_stage):
            return []
        return [self.embed.weight]

    def indexer_parameters(self) -> list[nn.Parameter]:
        """Parameters of this stage's Lightning Indexers (the only ones trained in the indexer warm-up)."""
        return [p for name, p in self.named_parameters() if ".indexer." in name]

    def set_input_tensor(self, input_tensor: torch.Tensor | list | None, chunk: int = 0) -> None:
        """Megatron pipeline hook: the previous stage's ``[S, B, N*D]`` output (a 1-element list or None)
        for virtual-stage chunk ``chunk``."""
        if isinstance(input_tensor, (list, tuple)):
            if len(input_tensor) != 1:
                raise ValueError(f"stage {self.pp_rank}: expected one input tensor, got {len(input_tensor)}")
            input_tensor = input_tensor[0]
        self._input_tensors[chunk] = input_tensor

    def chunks(self) -> list[StageChunk]:
        """The ``vp_size`` virtual-stage views of this stage, for the interleaved schedule."""
        return [StageChunk(self, i) for i in range(self.vp_size)]

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                labels: torch.Tensor | None = None, chunk: int = 0) -> torch.Tensor:
        """Run virtual-stage chunk ``chunk`` (0 without interleaving) of this stage on
        ``input_ids``/``position_ids`` ``[B, S]`` int64 (every stage needs both).

        Returns the streams ``[S, B, N*D]`` fp32 unless this is the model's last virtual stage; there
        the per-token main next-token cross-entropy ``[B, S]`` fp32 (0 where ``labels == -100``; MTP
        and auxiliary losses excluded), or the logits ``[B, S, V]`` when ``labels`` is None. In a
        training forward with labels the MTP loss is attached to the returned tensor's backward.
        Raises RuntimeError on a non-first stage with no input tensor set, and when ``attention_mode``
        was never set.
        """
        if self._attention_mode is None:
            raise RuntimeError(f"stage {self.pp_rank}: attention_mode is not set; set it to one of "
                               f"{', '.join(ATTENTION_MODES)} before the forward (the trainer sets the step plan's)")
        ctx = SequenceContext(position_ids, input_ids, attention_mode=self._attention_mode,
                              aux_loss_scale=self.aux_loss_scale)
        if self.cp.active:
            ctx.context_parallel = cpar.CPSequence(cpar.gather_sequence(position_ids, self.cp), self.cp,
                                              attention_mode=self._attention_mode, aux_loss_scale=self.aux_loss_scale)
        first = self.is_first_stage and chunk == 0
        X_BSND = self._embed(input_ids) if first else self._received_streams(input_ids, chunk)
        for i in self.chunk_ranges[chunk]:
            X_BSND = self.layers[str(i)](X_BSND, ctx)
        if not (self.is_last_stage and chunk == self.vp_size - 1):
            # a fresh tensor, never a view (B = 1 would make contiguous() a no-op): Megatron frees the
            # storage of sent outputs and refuses views; the boundary is fp32 whatever the compute precision
            return X_BSND.flatten(2).transpose(0, 1).to(torch.float32, memory_format=torch.contiguous_format,
                                                        copy=True)
        h_BSD = self.norm(self.hc_head(X_BSND))
        if labels is None:  # this TP rank's vocabulary rows, gathered
            return gather_heads(self.head(h_BSD).float(), self.tp, dim=-1)
        loss_BS = fused_head_loss(h_BSD, self.head.weight, labels, self.tp)
        if len(self.mtp) and self.mtp_loss_weight > 0 and self.training and torch.is_grad_enabled():
            mtp_loss = self._mtp_loss(X_BSND, labels, ctx)
            self._mtp_log.append(mtp_loss.detach())
            loss_BS = AuxLossInjector.apply(loss_BS, self.mtp_loss_weight * mtp_loss, self.aux_loss_scale)
        return loss_BS

    def _mtp_loss(self, H_BSND: torch.Tensor, labels_BS: torch.Tensor, ctx: SequenceContext) -> torch.Tensor:
        """Mean over MTP depths of the mean CE over valid positions (``model/mtp.py``)."""
        losses = []
        labels_BT = cpar.gather_sequence(labels_BS, self.cp)  # shifts cross the CP chunks' edges
        for k, block in enumerate(self.mtp.values()):
            inputs_BS, targets_BS = (self._local(shift_left(labels_BT, j)) for j in (k, k + 1))
            valid_BS = (inputs_BS != IGNORE_INDEX) & (targets_BS != IGNORE_INDEX)
            tokens_BS = inputs_BS.clamp(min=0)
            H_BSND, h_BSD = block(H_BSND, self.embed(tokens_BS), ctx, tokens_BS)
            masked_targets_BS = torch.where(valid_BS, targets_BS, IGNORE_INDEX)
            ce_BS = fused_head_loss(h_BSD, self.head.weight, masked_targets_BS, self.tp)
            losses.append(ce_BS.sum() / cpar.sum_over_cp(valid_BS.sum(), self.cp).clamp(min=1))
        return torch.stack(losses).mean()

    def _local(self, x_BT: torch.Tensor) -> torch.Tensor:
        """This CP rank's tokens of a whole-sequence tensor (itself without CP)."""
        return cpar.shard_tokens(x_BT, self.cp.size, self.cp.rank) if self.cp.active else x_BT

    def _embed(self, input_ids_BS: torch.Tensor) -> torch.Tensor:
        e_BSD = self.embed(input_ids_BS)
        return e_BSD.unsqueeze(2).repeat(1, 1, self.cfg.hc_mult, 1)

    def _received_streams(self, input_ids_BS: torch.Tensor, chunk: int) -> torch.Tensor:
        t_SBF = self._input_tensors[chunk]
        if t_SBF is None:
            raise RuntimeError(f"stage {self.pp_rank} of {self.pp_size}: forward called before set_input_tensor")
        expected = (input_ids_BS.shape[1], input_ids_BS.shape[0], self.cfg.hc_mult * self.cfg.dim)
        if tuple(t_SBF.shape) != expected:
            raise RuntimeError(f"stage {self.pp_rank}: input tensor shape {tuple(t_SBF.shape)}, expected {expected}")
        # the streams compute in the precision of the layers' weights (bf16 under mixed precision)
        dtype = self.layers[str(self.chunk_ranges[chunk][0])].attn.wq_a.weight.dtype
        return t_SBF.transpose(0, 1).unflatten(-1, (self.cfg.hc_mult, self.cfg.dim)).to(dtype)

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """Initialise every parameter from a generator seeded by crc32("{seed}/{name}") (layout-free).

        A module's direct parameters go through its ``init_parameter(name, tensor, generator, std)``
        hook when it has one (norm scales 1, sink 0, ``ape`` 0, mHC per spec 10.2); all other weights
        (linears, embedding, router) are N(0, init_std). Values are drawn on the CPU and copied, so
        they are the same on every device, and both embedding copies start equal. Router biases and
        load counts are reset to 0. A tensor-parallel shard draws the whole tensor and keeps its slice,
        so every TP size starts from the same values.
        """
        std = self.cfg.init_std
        for module_name, module in self.named_modules():
            for name, param in module.named_parameters(recurse=False):
                fqn = f"{module_name}.{name}" if module_name else name
                gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{fqn}".encode()))
                value = torch.empty(full_shape(param, self.tp), dtype=param.dtype)
                if hasattr(module, "init_parameter"):
                    module.init_parameter(name, value, gen, std)
                else:
                    value.normal_(0.0, std, generator=gen)
                param.copy_(shard_of(value, param, self.tp))
            if isinstance(module, Router) and not module.is_hash:
                module.bias.zero_()
                module.expert_counts.zero_()

    def pop_aux_metrics(self, *, per_layer: bool = False) -> dict[str, float]:
        """Auxiliary metrics of the training forwards since the last call (then cleared); keys present
        only when something was measured on this stage:

        ``balance_loss``: sum over MoE layers of each layer's mean *weighted* sequence balance loss;
        ``mtp_loss``: mean *unweighted* MTP cross-entropy (nats); ``indexer_loss``: mean over CSA layers
        and forwards of the indexer KL; ``indexer_recall``: share of the attention mass on compressed
        entries that the indexer's top-k keeps (warm-up mode only); ``moe_dead_experts``,
        ``moe_max_load``, ``moe_router_entropy`` (and per-layer keys with ``per_layer``): see
        :func:`model.moe.pop_moe_stats`.
        """
        out: dict[str, float] = {}
        balance = [torch.stack(m.aux_log).mean() for m in self.modules() if isinstance(m, MoE) and m.aux_log]
        if balance:
            out["balance_loss"] = float(torch.stack(balance).sum())
        for m in self.modules():
            if isinstance(m, MoE):
                m.aux_log.clear()
        if self._mtp_log:
            out["mtp_loss"] = float(torch.stack(self._mtp_log).mean())
            self._mtp_log.clear()
        for key in ("indexer_loss", "indexer_recall"):
            values = []
            for m in self.modules():
                if isinstance(m, Attention) and m.aux_log[key]:
                    values.append(torch.stack(m.aux_log[key]).mean())
                    m.aux_log[key].clear()
            if values:
                out[key] = float(torch.stack(values).mean())
        out.update(pop_moe_stats(self, per_layer=per_layer))
        return out


class StageChunk:
    """Virtual-stage chunk ``index`` of a :class:`V4Stage` as Megatron's interleaved schedule sees a model
    chunk: ``set_input_tensor``, a call running only the chunk's layers, and whether it is the model's
    last virtual stage (the one that returns the loss). The parameters stay in the stage, so names and
    checkpoints are those of the non-interleaved stage."""

    def __init__(self, stage: V4Stage, index: int):
        self.stage, self.index = stage, index
        self.is_last_stage = stage.is_last_stage and index == stage.vp_size - 1

    def set_input_tensor(self, input_tensor: torch.Tensor | list | None) -> None:
        self.stage.set_input_tensor(input_tensor, self.index)

    def parameters(self):
        return self.stage.parameters()

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                 labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.stage(input_ids, position_ids, labels, chunk=self.index)
