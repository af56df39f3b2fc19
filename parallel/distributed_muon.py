"""Distributed Muon: every whole matrix is updated by one rank of its data-parallel group (spec section 6).

V4 (R §3.5.1) does not run Newton-Schulz redundantly on every data-parallel replica: whole matrices are
assigned to ranks, each rank orthogonalises only its own, and the updates are exchanged. Here:

* **Units.** A unit is one logically independent matrix: a parameter, or one block of its
  ``muon_split`` (each routed expert's matrices are parameters of their own). Shapes are those of the
  whole, tensor-parallel-unsharded matrix.
* **Ownership.** :func:`partition_units` assigns each unit of a data-parallel group to exactly one of
  its ranks by a balanced partition of the Newton-Schulz FLOPs (:func:`newton_schulz_flops`),
  greedy longest-first with ties broken by unit order: a pure function of the model's matrices and the
  group size, so every rank computes the same table without talking. Dense matrices are partitioned
  over the data-parallel group, routed experts over the expert-data-parallel group.
* **Step.** The owner keeps the unit's momentum, forms the Nesterov input, gathers the tensor-parallel
  shards of the whole matrix (the owner set of a matrix is one TP group: the partition does not depend
  on the TP rank), runs Newton-Schulz with same-shape units batched into one ``bmm`` chain, and keeps
  this TP rank's part of the update. One ``all_gather`` per data-parallel group then hands every rank
  the updates of the units it does not own (each rank's packed updates, padded to the longest).
* **Momentum** lives with the owner: a parameter's ``momentum_buffer`` exists only on ranks owning at
  least one of its units, and only the owned blocks of it are ever non-zero. Checkpoints stay global:
  :meth:`DistributedMuon.gather_state` rebuilds every parameter's whole momentum on every rank (one
  all-reduce of the zero-padded buffers per group, exact because each element has one non-zero
  contributor) and :meth:`DistributedMuon.scatter_state` keeps the owned part again, so a checkpoint
  written with it loads without it, at another data-parallel size, and the reverse.

The arithmetic per unit is :class:`parallel.muon.Muon`'s, so parameters equal the non-distributed
optimizer's up to the batching of the ``bmm`` (1e-6 relative in the tests).
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.distributed as dist

from v4train.parallel import groups
from v4train.parallel.muon import Muon, MuonSplit, hybrid_newton_schulz
from v4train.parallel.ownership import all_gather_packed, group_rank_size, resolve_shard_groups
from v4train.parallel.tensor_parallel import TensorParallel, full_shape, gather_full, is_sharded, shard_of

__all__ = ["DistributedMuon", "MuonUnit", "muon_units", "newton_schulz_flops", "partition_units"]


def newton_schulz_flops(shape: Sequence[int], iterations: int) -> int:
    """Multiply-add FLOPs of ``iterations`` hybrid Newton-Schulz steps on one ``[n, m]`` matrix.

    With s = min(n, m), l = max(n, m) (the iteration runs on the short side): per step X X^T costs
    2 s^2 l, (X X^T)^2 costs 2 s^3 and the product with X 2 s^2 l. Raises ValueError for a non-2-D shape.
    """
    if len(shape) != 2:
        raise ValueError(f"newton_schulz_flops: needs a matrix shape [n, m], got {tuple(shape)}")
    short, long = sorted(int(d) for d in shape)
    return iterations * (4 * short * short * long + 2 * short ** 3)


@dataclasses.dataclass(frozen=True)
class MuonUnit:
    """One logically independent matrix: block ``block`` (0 when whole) of parameter ``param``
    (its index in the optimizer's order), of whole-matrix shape ``shape`` [n, m]."""

    param: int
    block: int
    shape: tuple[int, int]


def muon_units(whole_shapes: Sequence[Sequence[int]], splits: Sequence[MuonSplit | None]) -> list[MuonUnit]:
    """The units of parameters with whole (unsharded) shapes ``whole_shapes`` and ``muon_split`` values
    ``splits``, in parameter order then block order. Raises ValueError when a split does not tile its shape."""
    units = []
    for i, (shape, split) in enumerate(zip(whole_shapes, splits, strict=True)):
        if split is None:
            units.append(MuonUnit(i, 0, (int(shape[0]), int(shape[1]))))
            continue
        split.check(shape, f"muon_units: parameter {i}")
        for j, size in enumerate(split.sizes):
            block = (size, shape[1]) if split.dim == 0 else (shape[0], size)
            units.append(MuonUnit(i, j, (int(block[0]), int(block[1]))))
    return units


def partition_units(costs: Sequence[int], size: int) -> list[int]:
    """The owner rank (0..size-1) of each unit: greedy longest-processing-time partition of ``costs``.

    Units are taken by decreasing cost (ties: lower index first) and each goes to the rank with the
    least total so far (ties: lower rank), so the largest load is at most 4/3 of the optimum (Graham
    1969) and at most the mean load plus the largest unit. Deterministic: the same on every rank.
    Raises ValueError for size < 1 or a negative cost.
    """
    if size < 1:
        raise ValueError(f"partition_units: group size {size} must be >= 1")
    if any(c < 0 for c in costs):
        raise ValueError("partition_units: costs must be >= 0")
    owners = [0] * len(costs)
    loads = [0] * size
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(size), key=lambda r: (loads[r], r))
        owners[i] = rank
        loads[rank] += costs[i]
    return owners


@dataclasses.dataclass
class _Shard:
    """The units of one data-parallel group and who owns them."""

    group: dist.ProcessGroup | None
    rank: int
    size: int
    params: list[torch.Tensor]
    units: list[MuonUnit]
    owners: list[int]


class DistributedMuon(Muon):
    """:class:`parallel.muon.Muon` with each matrix updated by one rank of its data-parallel group.

    Args:
        params, lr, weight_decay, momentum, nesterov, ns_steps, update_rms, tp_group: as for Muon.
        shard_groups: ``(process group or None, parameters)`` pairs covering every parameter exactly
            once: the units of each pair's parameters are partitioned over that group (None: a group of
            one, this rank owns them all). V4: dense matrices over the data-parallel group, routed
            experts over the expert-data-parallel group.
    Raises:
        ValueError: as Muon; or a parameter in no or in two ``shard_groups``, or one in
            ``shard_groups`` that the optimizer does not hold.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        *,
        shard_groups: Sequence[tuple[dist.ProcessGroup | None, Sequence[torch.Tensor]]],
        **muon_settings,
    ):
        super().__init__(params, **muon_settings)
        held = [p for group in self.param_groups for p in group["params"]]
        self._group_of: dict[int, dict] = {id(p): g for g in self.param_groups for p in g["params"]}
        self._shards: list[_Shard] = []
        for group, group_params in resolve_shard_groups("DistributedMuon", held, shard_groups):
            units = muon_units([full_shape(p, self._tp) for p in group_params],
                               [getattr(p, "muon_split", None) for p in group_params])
            rank, size = group_rank_size(group)
            costs = [newton_schulz_flops(u.shape, len(self._group_of[id(group_params[u.param])]["ns_steps"]))
                     for u in units]
            self._shards.append(_Shard(group, rank, size, group_params, units, partition_units(costs, size)))
        # id(param) -> (fp32 master or None, bf16 compute copy): parameters whose values live there instead of in
        # the parameter (:mod:`parallel.sharded_masters`); the master on :meth:`master_rank` only
        self.masters: dict[int, tuple[torch.Tensor | None, torch.Tensor]] = {}

    def master_rank(self, param: torch.Tensor) -> int:
        """The rank of ``param``'s group that applies its update when its fp32 master is sharded: the owner of its
        first block (it receives every block's update). KeyError for a foreign tensor."""
        shard, index = self._shard_of(param)
        return self._first_owners(shard)[index]

    def holds_master(self, param: torch.Tensor) -> bool:
        """Whether this rank is ``param``'s :meth:`master_rank` in its group. KeyError for a foreign tensor."""
        shard, index = self._shard_of(param)
        return self._first_owners(shard)[index] == shard.rank

    def _shard_of(self, param: torch.Tensor) -> tuple[_Shard, int]:
        for shard in self._shards:
            for i, p in enumerate(shard.params):
                if p is param:
                    return shard, i
        raise KeyError(f"DistributedMuon: no parameter of shape {tuple(param.shape)}")

    @staticmethod
    def _first_owners(shard: _Shard) -> dict[int, int]:
        """``index -> owner of the parameter's first block`` for every parameter of ``shard``."""
        first: dict[int, int] = {}
        for u, o in zip(shard.units, shard.owners, strict=True):
            first.setdefault(u.param, o)
        return first

    def _master_ranks(self, shard: _Shard) -> dict[int, int]:
        """``index -> master rank`` of each parameter of ``shard`` with a sharded master."""
        first = self._first_owners(shard)
        return {i: first[i] for i, p in enumerate(shard.params) if id(p) in self.masters}

    def _publish(self, shard: _Shard, indices: Sequence[int], *, bf16: bool) -> dict[int, torch.Tensor]:
        """Each of ``indices``' (parameters with sharded masters) master from its master rank to every rank of the
        group, in one all-gather: cast to bf16 into the bf16 copies (``bf16``), or whole fp32 (returned by
        index). Collective over the group."""
        ranks = self._master_ranks(shard)
        by_rank: list[list[int]] = [[] for _ in range(shard.size)]
        for i in indices:
            by_rank[ranks[i]].append(i)
        width = max((sum(shard.params[i].numel() for i in ks) for ks in by_rank), default=0)
        mine = [self.masters[id(shard.params[i])][0] for i in by_rank[shard.rank]]
        local = torch.cat([(m.to(torch.bfloat16) if bf16 else m).reshape(-1).float() for m in mine]) if mine \
            else torch.zeros(0, dtype=torch.float32, device=shard.params[0].device)
        received = all_gather_packed(shard.group, local, width)
        out = {}
        for rank, ks in enumerate(by_rank):
            offset = 0
            for i in ks:
                p = shard.params[i]
                values = received[rank][offset: offset + p.numel()].view(p.shape)
                offset += p.numel()
                if bf16:
                    self.masters[id(p)][1].copy_(values)
                else:
                    out[i] = values.clone()
        return out

    @torch.no_grad()
    def whole_masters(self) -> dict[int, torch.Tensor]:
        """``id(param) -> whole fp32 value`` of every parameter with a sharded master, from its master rank
        (collective over every shard group)."""
        out = {}
        for shard in self._shards:
            indices = list(self._master_ranks(shard))
            if indices:
                out.update({id(shard.params[i]): t for i, t in self._publish(shard, indices, bf16=False).items()})
        return out

    # ------------------------------------------------------------------ ownership
    def owned_blocks(self, param: torch.Tensor) -> list[int]:
        """The block indices of ``param`` (0 when whole) this rank owns; KeyError for a foreign tensor."""
        for shard in self._shards:
            for i, p in enumerate(shard.params):
                if p is param:
                    return [u.block for u, o in zip(shard.units, shard.owners, strict=True)
                            if u.param == i and o == shard.rank]
        raise KeyError(f"DistributedMuon: no parameter of shape {tuple(param.shape)}")

    def owned_flops(self) -> list[tuple[int, int]]:
        """Per shard group: (Newton-Schulz FLOPs of this rank's units, of all units of the group)."""
        out = []
        for s in self._shards:
            costs = [newton_schulz_flops(u.shape, len(self._group_of[id(s.params[u.param])]["ns_steps"]))
                     for u in s.units]
            out.append((sum(c for c, o in zip(costs, s.owners, strict=True) if o == s.rank), sum(costs)))
        return out

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One Muon update of every parameter with a gradient (collective over each shard group, and
        over ``tp_group`` for sharded matrices). All ranks of a group must agree on which parameters
        have a gradient. Returns ``closure()``'s loss if given; RuntimeError for a sparse gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for shard in self._shards:
            self._step_shard(shard)
        return loss

    def _step_shard(self, shard: _Shard) -> None:
        active = [k for k, u in enumerate(shard.units) if shard.params[u.param].grad is not None]
        if not active:
            return
        mine = [k for k in active if shard.owners[k] == shard.rank]
        # 1. momentum and Nesterov input of the owned blocks; the whole matrix of each (TP gather)
        blocks_in: dict[int, torch.Tensor] = {}
        for i in sorted({shard.units[k].param for k in mine}):
            p = shard.params[i]
            if p.grad.is_sparse:
                raise RuntimeError("Muon does not support sparse gradients")
            group = self._group_of[id(p)]
            mu = group["momentum"]
            state = self.state[p]
            if not state:
                state.update(self.initial_state(p))
            state["step"] += 1
            owned = [shard.units[k].block for k in mine if shard.units[k].param == i]
            split = getattr(p, "muon_split", None)
            g_views, b_views = _block_views(p.grad, p, self._tp), _block_views(state["momentum_buffer"], p, self._tp)
            if len(owned) == len(g_views):
                buf = state["momentum_buffer"]
                buf.mul_(mu).add_(p.grad)
                x = p.grad.add(buf, alpha=mu) if group["nesterov"] else buf
            else:  # only some blocks are ours: the rest of the input is never read
                x = torch.zeros_like(p.grad)
                x_views = _block_views(x, p, self._tp)
                for j in owned:
                    b_views[j].mul_(mu).add_(g_views[j])
                    x_views[j].copy_(g_views[j].add(b_views[j], alpha=mu) if group["nesterov"] else b_views[j])
            whole = gather_full(x, p, self._tp)
            pieces = split.blocks(whole) if split is not None else (whole,)
            for k in mine:
                if shard.units[k].param == i:
                    blocks_in[k] = pieces[shard.units[k].block]
        # 2. Newton-Schulz, same-shape (and same-settings) units in one batched call
        updates: dict[int, torch.Tensor] = {}
        batches: dict[tuple, list[int]] = defaultdict(list)
        for k in mine:
            group = self._group_of[id(shard.params[shard.units[k].param])]
            batches[(shard.units[k].shape, group["ns_steps"], group["update_rms"], group["ns_dtype"])].append(k)
        for ((n, m), steps, rms, dtype), ks in batches.items():
            out_KNM = hybrid_newton_schulz(torch.stack([blocks_in[k] for k in ks]), steps, dtype)
            out_KNM.mul_(math.sqrt(max(n, m)) * rms)
            updates.update(zip(ks, out_KNM.unbind(0), strict=True))
        # 3. every rank's packed updates (this TP rank's part of each unit) in one all_gather
        local = {k: _local_part(updates[k], shard.params[shard.units[k].param], shard.units[k].block, self._tp)
                 for k in mine}
        numel = {k: _block_views(shard.params[shard.units[k].param], shard.params[shard.units[k].param],
                                 self._tp)[shard.units[k].block].numel() for k in active}
        by_rank: list[list[int]] = [[] for _ in range(shard.size)]
        for k in active:
            by_rank[shard.owners[k]].append(k)
        width = max(sum(numel[k] for k in ks) for ks in by_rank)
        local = torch.cat([local[k].reshape(-1).float() for k in mine]) if mine \
            else torch.zeros(0, dtype=torch.float32, device=shard.params[0].device)
        received = all_gather_packed(shard.group, local, width)
        # 4. apply: decoupled weight decay, then the update
        full_update: dict[int, torch.Tensor] = {}
        for rank, ks in enumerate(by_rank):
            offset = 0
            for k in ks:
                u = shard.units[k]
                p = shard.params[u.param]
                if u.param not in full_update:
                    full_update[u.param] = torch.empty(p.shape, dtype=torch.float32, device=p.device)
                view = _block_views(full_update[u.param], p, self._tp)[u.block]
                view.copy_(received[rank][offset: offset + numel[k]].view(view.shape))
                offset += numel[k]
        for i, update in full_update.items():
            p = shard.params[i]
            target = self.masters[id(p)][0] if id(p) in self.masters else p
            if target is None:  # a sharded master held by another rank, which publishes the result
                continue
            group = self._group_of[id(p)]
            target.mul_(1.0 - group["lr"] * group["weight_decay"])
            target.add_(update.to(target.dtype), alpha=-group["lr"])
        published = [i for i in full_update if id(shard.params[i]) in self.masters]
        if published:
            self._publish(shard, published, bf16=True)

    # ------------------------------------------------------------------ checkpoints
    @torch.no_grad()
    def gather_state(self) -> None:
        """Give every rank every parameter's whole state (``step``, ``momentum_buffer``; this TP rank's
        shard), as the non-distributed Muon holds it: one all-reduce of the zero-padded momentum buffers
        and one of the step counts (max) per shard group. Collective; call before saving or loading a
        checkpoint and :meth:`scatter_state` after."""
        for shard in self._shards:
            buffers = [self.state[p]["momentum_buffer"] if self.state.get(p) else torch.zeros_like(p)
                       for p in shard.params]
            steps = torch.stack([self.state[p]["step"] if self.state.get(p) else torch.zeros((), dtype=torch.float32)
                                 for p in shard.params])
            flat = torch.cat([b.reshape(-1).float() for b in buffers]) if buffers else torch.zeros(0)
            if shard.size > 1:
                dist.all_reduce(flat, group=shard.group)
                steps = groups.all_reduce_on(steps, flat.device, shard.group, dist.ReduceOp.MAX)
            offset = 0
            for p, b, step in zip(shard.params, buffers, steps.unbind(0), strict=True):
                whole = flat[offset: offset + b.numel()].view(b.shape).to(p.dtype)
                offset += b.numel()
                self.state[p] = {"step": step.clone(), "momentum_buffer": whole}

    @torch.no_grad()
    def scatter_state(self) -> None:
        """Keep only the owned part of the state :meth:`gather_state` (or a checkpoint load) left: a
        parameter with no owned block loses its state, a partly owned one keeps its owned blocks
        (the rest zero). Local, no communication."""
        for shard in self._shards:
            for p in shard.params:
                state = self.state.get(p)
                if not state:
                    continue
                owned = self.owned_blocks(p)
                if not owned:
                    del self.state[p]
                    continue
                # a fresh tensor, so nothing keeps the gathered buffer of the whole group alive
                src = _block_views(state["momentum_buffer"], p, self._tp)
                buf = torch.zeros_like(state["momentum_buffer"])
                dst = _block_views(buf, p, self._tp)
                for j in owned:
                    dst[j].copy_(src[j])
                state["momentum_buffer"] = buf


def _block_views(tensor: torch.Tensor, param: torch.Tensor, tp: TensorParallel) -> list[torch.Tensor]:
    """Views of ``tensor`` (``param``'s local shape) per block of ``param``'s ``muon_split``: the part of
    each block that lies in this TP rank's shard (possibly empty); ``[tensor]`` when unsplit."""
    split = getattr(param, "muon_split", None)
    if split is None:
        return [tensor]
    if not is_sharded(param) or param.partition_dim != split.dim or not tp.active:
        return list(torch.split(tensor, list(split.sizes), dim=split.dim))
    width = tensor.shape[split.dim]
    lo_shard = tp.rank * width
    views, start = [], 0
    for size in split.sizes:
        lo, hi = max(start, lo_shard), min(start + size, lo_shard + width)
        views.append(tensor.narrow(split.dim, lo - lo_shard, max(0, hi - lo)) if hi > lo
                     else tensor.narrow(split.dim, 0, 0))
        start += size
    return views


def _local_part(update: torch.Tensor, param: torch.Tensor, block: int, tp: TensorParallel) -> torch.Tensor:
    """This TP rank's part of the whole update [n, m] of ``param``'s block ``block`` (shaped as the
    matching :func:`_block_views` view)."""
    split = getattr(param, "muon_split", None)
    if split is None:
        return shard_of(update, param, tp)
    if not is_sharded(param) or not tp.active:
        return update
    dim = param.partition_dim
    width = param.shape[dim]
    if dim != split.dim:
        return update.narrow(dim, tp.rank * width, width)
    start = sum(split.sizes[:block])
    lo, hi = max(start, tp.rank * width), min(start + split.sizes[block], (tp.rank + 1) * width)
    return update.narrow(dim, lo - start, max(0, hi - lo)) if hi > lo else update.narrow(dim, 0, 0)
