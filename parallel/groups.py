"""Process groups for a (TP, CP, PP, EP, DP) layout, built by Megatron-core's ``parallel_state``.

This is the only module that reads Megatron's ``parallel_state`` globals: it
builds them once per layout and hands the result out as an explicit, immutable
:class:`ParallelContext`. Everything else receives the context.

Rank order is Megatron's ``"tp-cp-ep-dp-pp"`` (TP fastest, then CP, PP slowest); the context-parallel
group is Megatron's (``parallel.context_parallel`` splits each sequence over it), and the expert grid
uses expert-tensor-parallel size 1 (ETP·EP·PP), which keeps TP2·PP2·EP2 feasible on 4 ranks.
Example on 8 ranks with tp=2, pp=2, dp=2: pp groups [[0,4],[1,5],[2,6],[3,7]], dp
groups [[0,2],[1,3],[4,6],[5,7]]; with cp=2, tp=1, pp=1, dp=2 on 4 ranks the cp groups are [[0,1],[2,3]].
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from v4train.parallel import megatron_compat

__all__ = ["ParallelContext", "all_reduce_on", "collective_device", "destroy", "initialize"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParallelContext:
    """The parallel layout of one rank: sizes, ranks within each group, and the groups.

    Attributes:
        tp, pp, ep, dp: tensor-, pipeline-, expert- and data-parallel sizes
            (tp*cp*pp*dp == world_size).
        rank, world_size: this process in the default (world) group.
        tp_rank, pp_rank, dp_rank, ep_rank: this process's rank inside each group.
        tp_group, pp_group, dp_group, ep_group: torch ProcessGroups (from Megatron's
            ``parallel_state``); None only in :meth:`single`, where no torch.distributed exists.
        cp, cp_rank, cp_group: context-parallel size, rank and group (Megatron's); size 1 / None when
            context parallelism is off. tp*cp*pp*dp == world_size.
        dp_cp_group: the data x context parallel ranks (Megatron's ``with_context_parallel`` DP group),
            over which dense gradients are summed when cp > 1; None when cp == 1.
        embedding_group: the first and last stage of this rank's pipeline (Megatron's embedding group:
            parameters both stages hold, such as the embedding MTP needs on the last stage, have their
            gradients summed over it); None on middle stages and with pp == 1.
        expert_dp_group, expert_dp_rank: the ranks of this stage that hold the same routed experts
            (Megatron's expert-data-parallel group, tp*cp*dp/ep ranks with expert-tensor-parallel 1); expert
            gradients are summed over it. None / 0 in :meth:`single`.
    Raises:
        ValueError: naming the field, when a size is < 1, tp*cp*pp*dp != world_size, or a rank is
            outside [0, size).
    """

    tp: int
    pp: int
    ep: int
    dp: int
    rank: int
    world_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    ep_rank: int
    tp_group: dist.ProcessGroup | None
    pp_group: dist.ProcessGroup | None
    dp_group: dist.ProcessGroup | None
    ep_group: dist.ProcessGroup | None
    embedding_group: dist.ProcessGroup | None = None
    expert_dp_group: dist.ProcessGroup | None = None
    expert_dp_rank: int = 0
    cp: int = 1
    cp_rank: int = 0
    cp_group: dist.ProcessGroup | None = None
    dp_cp_group: dist.ProcessGroup | None = None

    def __post_init__(self) -> None:
        _check_sizes(tp=self.tp, cp=self.cp, pp=self.pp, ep=self.ep, dp=self.dp, world_size=self.world_size)
        if self.tp * self.cp * self.pp * self.dp != self.world_size:
            raise ValueError(
                f"ParallelContext: tp*cp*pp*dp = {self.tp * self.cp * self.pp * self.dp} differs from "
                f"world_size={self.world_size}"
            )
        for field, size in (
            ("rank", self.world_size), ("tp_rank", self.tp), ("pp_rank", self.pp),
            ("dp_rank", self.dp), ("ep_rank", self.ep), ("cp_rank", self.cp),
        ):
            value = getattr(self, field)
            if not 0 <= value < size:
                raise ValueError(f"ParallelContext.{field}={value} is outside [0, {size})")

    @property
    def is_first_stage(self) -> bool:
        """True on the first pipeline stage (it owns the embedding)."""
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        """True on the last pipeline stage (it owns the head and computes the loss)."""
        return self.pp_rank == self.pp - 1

    @property
    def data_group(self) -> dist.ProcessGroup | None:
        """The ranks holding replicas of this rank's dense parameters with the same pipeline stage and TP
        shard: the data x context parallel group when cp > 1 (their gradients are summed over it, as in
        Megatron's ``with_context_parallel`` DP group), the data-parallel group otherwise."""
        return self.dp_cp_group if self.cp > 1 else self.dp_group

    @classmethod
    def single(cls) -> ParallelContext:
        """The one-process layout: every size 1, every rank 0, no groups (no torch.distributed)."""
        return cls(
            tp=1, pp=1, ep=1, dp=1, rank=0, world_size=1,
            tp_rank=0, pp_rank=0, dp_rank=0, ep_rank=0,
            tp_group=None, pp_group=None, dp_group=None, ep_group=None,
        )


def initialize(tp: int, pp: int, ep: int, dp: int, *, cp: int = 1, timeout_minutes: int = 30) -> ParallelContext:
    """Build Megatron's process groups for a layout over the initialised default group.

    Call after ``torch.distributed.init_process_group``, collectively on every rank with the same
    arguments. Any previous Megatron state is destroyed first, so a reused pool of ranks can switch
    layouts by calling this again. On a CPU host the Megatron CPU shim is installed
    (:func:`parallel.megatron_compat.install`).

    Args:
        tp, pp, ep, dp: tensor-, pipeline-, expert- and data-parallel sizes.
        cp: context-parallel size (each sequence split over cp ranks).
        timeout_minutes: timeout of the new subgroups' collectives (Megatron's
            ``distributed_timeout_minutes``; a hung peer blocks that long).
    Returns:
        The :class:`ParallelContext` of this rank.
    Raises:
        ValueError: naming the field, when a size is not an int >= 1, tp*cp*pp*dp differs from the
            world size, or ep does not divide tp*cp*dp (experts are spread over the TP x CP x DP ranks of
            a stage, with expert-tensor-parallel size 1).
        RuntimeError: torch.distributed is not initialised.
    """
    _check_sizes(tp=tp, cp=cp, pp=pp, ep=ep, dp=dp)
    if not dist.is_initialized():
        raise RuntimeError(
            "parallel.groups.initialize: torch.distributed is not initialised; call "
            "torch.distributed.init_process_group first"
        )
    world_size = dist.get_world_size()
    if tp * cp * pp * dp != world_size:
        raise ValueError(
            f"tp*cp*pp*dp = {tp}*{cp}*{pp}*{dp} = {tp * cp * pp * dp} must equal the world size {world_size} "
            "(fields tp, cp, pp, dp)"
        )
    if (tp * cp * dp) % ep != 0:
        raise ValueError(
            f"ep={ep} must divide tp*cp*dp={tp * cp * dp}: the expert grid (ETP=1)*EP*PP must divide the "
            f"world size {world_size}"
        )
    megatron_compat.install()

    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        context_parallel_size=cp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=1,
        distributed_timeout_minutes=timeout_minutes,
        order="tp-cp-ep-dp-pp",
    )
    return ParallelContext(
        tp=parallel_state.get_tensor_model_parallel_world_size(),
        pp=parallel_state.get_pipeline_model_parallel_world_size(),
        ep=parallel_state.get_expert_model_parallel_world_size(),
        dp=parallel_state.get_data_parallel_world_size(),
        rank=dist.get_rank(),
        world_size=world_size,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        ep_rank=parallel_state.get_expert_model_parallel_rank(),
        tp_group=parallel_state.get_tensor_model_parallel_group(),
        pp_group=parallel_state.get_pipeline_model_parallel_group(),
        dp_group=parallel_state.get_data_parallel_group(),
        ep_group=parallel_state.get_expert_model_parallel_group(),
        # Membership from the stage index: Megatron's _EMBEDDING_GLOBAL_RANKS survives
        # destroy_model_parallel(), so is_rank_in_embedding_group() is stale after a layout change.
        embedding_group=(parallel_state.get_embedding_group()
                         if pp > 1 and parallel_state.get_pipeline_model_parallel_rank() in (0, pp - 1) else None),
        expert_dp_group=parallel_state.get_expert_data_parallel_group(),
        expert_dp_rank=parallel_state.get_expert_data_parallel_rank(),
        cp=parallel_state.get_context_parallel_world_size(),
        cp_rank=parallel_state.get_context_parallel_rank(),
        cp_group=parallel_state.get_context_parallel_group() if cp > 1 else None,
        dp_cp_group=parallel_state.get_data_parallel_group(with_context_parallel=True) if cp > 1 else None,
    )


def collective_device(group=None) -> torch.device:
    """The device a tensor made for a collective of ``group`` (default: the world) must be on: this rank's
    CUDA device under NCCL (which communicates from GPU memory only), the CPU under gloo."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_on(x: torch.Tensor, device: torch.device, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """``x`` all-reduced (``op``) over ``group`` through a copy on ``device``, returned on ``x``'s device: for
    small CPU-held tensors (the optimizers' step counts, as torch's AdamW keeps them) that meet a group whose
    backend communicates from ``device`` only (NCCL: the GPU)."""
    on_device = x.to(device)
    dist.all_reduce(on_device, op=op, group=group)
    return on_device.to(x.device)


def destroy() -> None:
    """Forget Megatron's process groups (its ``destroy_model_parallel``); safe to call repeatedly.

    Megatron drops its references and destroys its gloo data-parallel groups; every group is
    released when the default group is destroyed (``torch.distributed.destroy_process_group()``).
    """
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()


def _check_sizes(**sizes: int) -> None:
    for field, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{field}={value!r} must be an int >= 1")
