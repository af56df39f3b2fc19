"""What a rank builds when it joins a job: its pipeline stage of the model, the parameter groups the step
treats differently, and the optimizer.

The stage is the V4 model sliced for this rank's pipeline position (``model/``), its layers tensor- and
expert-parallel per the parallel context (``parallel/``). Every rank seeds identically before building, so
parameter initialisation is a function of (seed, parameter name) only and any layout starts from the same
model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from v4train.model import V4Stage
from v4train.model.moe import expert_parallel_experts
from v4train.orchestrator.checkpoint.init_from import load_model
from v4train.orchestrator.spec import JobSpec
from v4train.orchestrator.tools.stage_costs import job_stage_layers
from v4train.parallel.context_parallel import ContextParallel
from v4train.parallel.fp8 import enable_fp8
from v4train.parallel.optim import build_optimizer
from v4train.parallel.tensor_parallel import TensorParallel, is_sharded

__all__ = ["ParameterGroups", "build_stage", "group_parameters", "build_rank_optimizer", "muon_shard_groups",
           "adamw_shard_groups"]


@dataclass(frozen=True)
class ParameterGroups:
    """This rank's trainable parameters by how the step treats them.

    ``expert``: routed experts, gradients summed over the expert-data-parallel group; ``dense``: the rest,
    averaged over data parallel (summed over data x context parallel, divided by dp; Megatron DDP's two
    buckets); ``shared``: held by the first and the last
    stage (the embedding, for MTP), summed over the embedding group; ``norm_excluded``: left out of this
    rank's share of the global gradient norm (so every distinct tensor counts once over the world);
    ``frozen_in_warmup``: everything but the Lightning Indexer (frozen during its warm-up);
    ``norm_replicas``: the part of ``norm_excluded`` another rank counts for a reason other than data
    parallelism (a TP-replicated tensor off TP rank 0, the last stage's embedding copy): what a distributed
    optimizer, whose owned ranges split the data-parallel copies, still leaves out.
    """

    params: list
    expert: list
    dense: list
    shared: list
    norm_excluded: list
    frozen_in_warmup: list
    norm_replicas: list


def build_stage(job: JobSpec, cfg, pctx, placement=None) -> tuple[V4Stage, TensorParallel]:
    """This rank's pipeline stage of the model (initialised from ``job.seed``, on ``placement.device``, CPU by
    default; its layers from ``parallel.stage_layers``, balanced for the device kind; with ``parallel.cp`` > 1 it
    takes this rank's load-balanced share of every sequence) and its tensor-parallel helper. ``train.fp8``
    installs what ``placement.fp8`` names: Transformer Engine layers (``parallel/te_layers.py``) or the CPU
    emulation (``parallel/fp8.py``)."""
    # Every rank seeds identically: parameter init is a function of (seed, parameter name) only.
    torch.manual_seed(job.seed)
    tp = TensorParallel(pctx.tp_group, pctx.tp_rank, pctx.tp) if pctx.tp > 1 else TensorParallel()
    experts = None
    if pctx.ep > 1:
        def experts(_layer):
            return expert_parallel_experts(cfg, ep_group=pctx.ep_group, ep_rank=pctx.ep_rank, ep_size=pctx.ep)
    device = "gpu" if placement is not None and placement.device.type == "cuda" else "cpu"
    cp = ContextParallel(pctx.cp_group, pctx.cp_rank, pctx.cp) if pctx.cp > 1 else None
    stage = V4Stage(cfg, pp_rank=pctx.pp_rank, pp_size=pctx.pp, vp_size=job.parallel.vp, tp=tp,
                    experts_factory=experts, cp=cp, stage_layers=job_stage_layers(job, cfg, device))
    stage.init_weights(job.seed)
    stage.recompute = job.train.recompute
    if job.model.init_from is not None:  # start from converted or earlier weights (fresh optimizer)
        load_model(job.model.init_from, stage, tp)
    if placement is not None:
        stage.to(placement.device)
    if job.train.fp8 and placement is not None and placement.fp8 == "transformer_engine":
        from v4train.parallel.te_layers import enable_te_fp8

        enable_te_fp8(stage)  # same names and shapes: checkpoints stay interchangeable
    elif job.train.fp8:
        enable_fp8(stage)  # same Parameter objects and names: checkpoints stay interchangeable
    return stage, tp


def group_parameters(stage: V4Stage, pctx) -> ParameterGroups:
    """Sort the stage's trainable parameters into :class:`ParameterGroups` for this rank's coordinates."""
    named = [(n, p) for n, p in stage.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    expert = [p for n, p in named if ".ffn.experts." in n]
    expert_ids = {id(p) for p in expert}
    shared = stage.shared_embedding_parameters() if pctx.embedding_group is not None else []
    # The global gradient norm counts every distinct tensor once over the whole world: a dense parameter on
    # data- and context-parallel rank 0 (and TP rank 0 unless it is a TP shard), an expert on
    # expert-data-parallel rank 0 (that group spans the CP ranks), never the last stage's embedding copy.
    last_copy = {id(p) for p in shared} if pctx.is_last_stage else set()
    norm_excluded = [
        p for p in params
        if id(p) in last_copy
        or (id(p) in expert_ids and pctx.expert_dp_rank != 0)
        or (id(p) not in expert_ids
            and (pctx.dp_rank != 0 or pctx.cp_rank != 0 or (pctx.tp_rank != 0 and not is_sharded(p))))
    ]
    norm_replicas = [
        p for p in params
        if id(p) in last_copy or (id(p) not in expert_ids and pctx.tp_rank != 0 and not is_sharded(p))
    ]
    indexer = {id(p) for p in stage.indexer_parameters()}
    return ParameterGroups(params=params, expert=expert, dense=[p for p in params if id(p) not in expert_ids],
                           shared=shared, norm_excluded=norm_excluded,
                           frozen_in_warmup=[p for p in params if id(p) not in indexer], norm_replicas=norm_replicas)


def build_rank_optimizer(stage: V4Stage, job: JobSpec, pctx):
    """The job's optimizer (Muon + AdamW groups, or AdamW) over the stage's parameters."""
    t = job.train
    groups = group_parameters(stage, pctx)
    return build_optimizer(
        list(stage.named_parameters()),
        algorithm=t.optimizer,
        lr=t.lr,
        weight_decay=t.weight_decay,
        betas=tuple(t.adam_betas),
        eps=t.adam_eps,
        momentum=t.muon_momentum,
        tp_group=pctx.tp_group if pctx.tp > 1 else None,  # Muon gathers whole matrices of TP shards
        muon_shard_groups=muon_shard_groups(job, pctx, groups.dense, groups.expert),
        adamw_shard_groups=adamw_shard_groups(job, pctx, groups.dense, groups.expert),
    )


def muon_shard_groups(job: JobSpec, pctx, dense: list, expert: list):
    """With ``train.distributed_muon`` (or ``distributed_optimizer``): dense matrices owned over the
    data(-and-context)-parallel group (:attr:`ParallelContext.data_group`), routed experts over the
    expert-data-parallel group (spec 6); None otherwise (every replica runs the whole Muon)."""
    if not (job.train.distributed_muon or job.train.distributed_optimizer):
        return None
    return [(pctx.data_group, dense), (pctx.expert_dp_group, expert)]


def adamw_shard_groups(job: JobSpec, pctx, dense: list, expert: list):
    """With ``train.distributed_optimizer``: each AdamW parameter's moments owned over the
    data(-and-context)-parallel group (:attr:`ParallelContext.data_group`; routed experts: the
    expert-data-parallel group); None otherwise (replicated)."""
    if not job.train.distributed_optimizer:
        return None
    return [(pctx.data_group, dense), (pctx.expert_dp_group, expert)]
