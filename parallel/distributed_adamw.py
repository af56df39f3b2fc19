"""Distributed AdamW (ZeRO-1 at parameter granularity): each parameter's moments live on one rank of its
data-parallel group (``train.distributed_optimizer``).

* **Ownership.** Each parameter of a data-parallel group is owned by exactly one of its ranks, by the balanced
  partition :func:`parallel.distributed_muon.partition_units` of the parameters' element counts (a pure
  function of the model and the group size: every rank computes the same table without talking). Dense
  parameters are partitioned over the data-parallel group, routed experts over the expert-data-parallel
  group, as :class:`parallel.distributed_muon.DistributedMuon` partitions its matrices.
* **Step.** The owner updates its parameters with torch AdamW's own arithmetic (same foreach kernels, so the
  result is bit-identical to the non-distributed AdamW) and keeps their ``exp_avg``/``exp_avg_sq``; one
  ``all_gather`` per group then hands every rank the updated values of the parameters it does not own.
  Gradients arrive already all-reduced (the trainer's data-parallel sync, which also feeds the global
  gradient norm and clipping), so the optimizer state and the update work are what is divided by the
  group size.
* **Checkpoints stay global**: :meth:`DistributedAdamW.gather_state` rebuilds every parameter's whole state on
  every rank (one all-reduce of the zero-padded moments per group, exact because each parameter has one
  non-zero contributor) and :meth:`DistributedAdamW.scatter_state` drops the foreign state again, so a
  checkpoint written with it loads without it, at another data-parallel size, and the reverse
  (``parallel.optim.global_state``).

Megatron-core's ``DistributedOptimizer`` is not used: it needs Megatron's ``DistributedDataParallel`` grad
buffers (contiguous per-dtype buffers of Megatron modules, bucketed reduce-scatter hooks) and its
``MegatronOptimizer`` wrapper around the whole model chunk, while the trainer's stage is a plain module with
its own gradient sync and a hybrid Muon + AdamW optimizer whose Muon part already distributes whole matrices.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.distributed as dist

from v4train.parallel import groups
from v4train.parallel.distributed_muon import partition_units

__all__ = ["DistributedAdamW"]

_MOMENTS = ("exp_avg", "exp_avg_sq")


class DistributedAdamW(torch.optim.AdamW):
    """torch AdamW whose state and update of each parameter live on one rank of its ``shard_groups`` group.

    Args:
        params: as for AdamW (named groups allowed).
        shard_groups: ``(process group or None, parameters)`` pairs covering every parameter exactly once.
        **adamw_settings: lr, betas, eps, weight_decay, ... (no ``amsgrad``, ``fused`` or ``capturable``).
    Raises:
        ValueError: a parameter in no or in two shard groups, a foreign parameter, or an unsupported setting.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], *,
                 shard_groups: Sequence[tuple[dist.ProcessGroup | None, Sequence[torch.Tensor]]], **adamw_settings):
        super().__init__(params, **adamw_settings)
        if any(g["amsgrad"] or g["fused"] or g["capturable"] for g in self.param_groups):
            raise ValueError("DistributedAdamW: amsgrad, fused and capturable are not supported")
        held = [p for group in self.param_groups for p in group["params"]]
        index = {id(p): i for i, p in enumerate(held)}
        self._owner: dict[int, bool] = {}
        self._shards: list[tuple[dist.ProcessGroup | None, int, list[torch.Tensor], list[int]]] = []
        for group, group_params in shard_groups:
            group_params = list(group_params)
            for p in group_params:
                if id(p) not in index:
                    raise ValueError(f"DistributedAdamW: a shard_groups parameter of shape {tuple(p.shape)} "
                                     "is not one of the optimizer's parameters")
                if id(p) in self._owner:
                    raise ValueError(f"DistributedAdamW: the parameter of shape {tuple(p.shape)} is in two "
                                     "shard_groups")
                self._owner[id(p)] = False
            group_params.sort(key=lambda p: index[id(p)])  # the optimizer's order, the same on every rank
            size = dist.get_world_size(group) if group is not None else 1
            rank = dist.get_rank(group) if group is not None else 0
            owners = partition_units([p.numel() for p in group_params], size)
            for p, o in zip(group_params, owners, strict=True):
                self._owner[id(p)] = o == rank
            self._shards.append((group, size, group_params, owners))
        missing = [p for p in held if id(p) not in self._owner]
        if missing:
            raise ValueError(f"DistributedAdamW: {len(missing)} parameter(s) (first of shape "
                             f"{tuple(missing[0].shape)}) are in no shard_groups entry")

    def owns(self, param: torch.Tensor) -> bool:
        """Whether this rank updates ``param`` and keeps its moments; KeyError for a foreign tensor."""
        return self._owner[id(param)]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """AdamW on the owned parameters, then every group's updated values exchanged (collective over each
        shard group; all its ranks must agree on which parameters have a gradient)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        everything = [group["params"] for group in self.param_groups]
        try:
            for group in self.param_groups:
                group["params"] = [p for p in group["params"] if self._owner[id(p)]]
            super().step()
        finally:
            for group, params in zip(self.param_groups, everything, strict=True):
                group["params"] = params
        for group, size, params, owners in self._shards:
            if size > 1:
                self._exchange(group, size, params, owners)
        return loss

    @staticmethod
    def _exchange(group, size: int, params: list[torch.Tensor], owners: list[int]) -> None:
        """Every rank's updated parameters, packed and padded to the longest, in one all_gather."""
        stepped = [(p, o) for p, o in zip(params, owners, strict=True) if p.grad is not None]
        per_rank = [[p for p, o in stepped if o == r] for r in range(size)]
        lengths = [sum(p.numel() for p in ps) for ps in per_rank]
        if not any(lengths):
            return
        rank = dist.get_rank(group)
        dtype = stepped[0][0].dtype
        packed = torch.zeros(max(lengths), dtype=dtype, device=stepped[0][0].device)
        if per_rank[rank]:
            torch.cat([p.detach().reshape(-1) for p in per_rank[rank]], out=packed[:lengths[rank]])
        received = [torch.empty_like(packed) for _ in range(size)]
        dist.all_gather(received, packed, group=group)
        for r, ps in enumerate(per_rank):
            if r == rank:
                continue
            offset = 0
            for p in ps:
                p.copy_(received[r][offset: offset + p.numel()].view_as(p))
                offset += p.numel()

    @torch.no_grad()
    def gather_state(self) -> None:
        """Give every rank every parameter's whole state (``step``, ``exp_avg``, ``exp_avg_sq``), as the
        non-distributed AdamW holds it: one all-reduce of the zero-padded moments and one of the step counts
        (max) per shard group. A parameter never stepped gets AdamW's initial state (zeros, step 0). Collective;
        call before saving or loading a checkpoint and :meth:`scatter_state` after."""
        for group, size, params, _ in self._shards:
            if not params:
                continue
            moments = [[self.state[p][k] if self.state.get(p) else torch.zeros_like(p) for p in params]
                       for k in _MOMENTS]
            steps = torch.stack([self.state[p]["step"] if self.state.get(p) else torch.zeros((), dtype=torch.float32)
                                 for p in params])
            flat = torch.cat([t.reshape(-1) for ts in moments for t in ts])
            if size > 1:
                dist.all_reduce(flat, group=group)
                steps = groups.all_reduce_on(steps, flat.device, group, dist.ReduceOp.MAX)
            offset = 0
            whole: dict[str, list[torch.Tensor]] = {}
            for k, ts in zip(_MOMENTS, moments, strict=True):
                whole[k] = []
                for t in ts:
                    whole[k].append(flat[offset: offset + t.numel()].view_as(t).clone())
                    offset += t.numel()
            for i, p in enumerate(params):
                self.state[p] = {"step": steps[i].clone(), "exp_avg": whole["exp_avg"][i],
                                 "exp_avg_sq": whole["exp_avg_sq"][i]}

    @torch.no_grad()
    def scatter_state(self) -> None:
        """Drop the state of the parameters this rank does not own (after :meth:`gather_state` or a checkpoint
        load). Local, no communication."""
        for p in [p for p in self.state if not self._owner[id(p)]]:
            del self.state[p]

