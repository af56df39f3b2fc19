"""Which rank of a data-parallel group owns which optimizer state, and the collectives that move it.

Shared by the distributed optimizers (:mod:`parallel.distributed_adamw`, :mod:`parallel.distributed_muon`):

* :func:`resolve_shard_groups` checks the ``(process group, parameters)`` pairs an optimizer is given
  (every parameter in exactly one pair) and puts each pair in the optimizer's parameter order, so every
  rank of a group derives the same ownership table without talking.
* :func:`all_gather_packed`: each rank's packed values (padded to the longest) in one ``all_gather``; how
  owners hand their updated values to the rest of the group.
* :class:`FlatShard`: Megatron's element-granular layout (its ``DistributedOptimizer``): a group's
  parameters laid end to end in one flat index space, padded to a multiple of the group size and cut into
  equal contiguous ranges, rank r owning ``[r * S, (r + 1) * S)``; a parameter may straddle ranks. The
  gradients are reduce-scattered into the owned range and the updated parameters all-gathered from it; without
  the distributed optimizer the same buffer is all-reduced whole, so both sum every element in one order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.distributed as dist

__all__ = ["FlatShard", "Piece", "all_gather_packed", "group_rank_size", "resolve_shard_groups"]


def group_rank_size(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(this rank's index, size) of ``group``; None is a group of one: (0, 1)."""
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def resolve_shard_groups(
    owner: str,
    held: Sequence[torch.Tensor],
    shard_groups: Sequence[tuple[dist.ProcessGroup | None, Sequence[torch.Tensor]]],
) -> list[tuple[dist.ProcessGroup | None, list[torch.Tensor]]]:
    """``shard_groups`` with each pair's parameters in the order of ``held`` (the optimizer's order, the
    same on every rank).

    Raises:
        ValueError (naming ``owner`` and the parameter's shape): a parameter of a pair is not in ``held``,
            is in two pairs, or a parameter of ``held`` is in none.
    """
    index = {id(p): i for i, p in enumerate(held)}
    seen: set[int] = set()
    out = []
    for group, group_params in shard_groups:
        group_params = list(group_params)
        for p in group_params:
            if id(p) not in index:
                raise ValueError(f"{owner}: a shard_groups parameter of shape {tuple(p.shape)} is not one of the "
                                 "optimizer's parameters")
            if id(p) in seen:
                raise ValueError(f"{owner}: the parameter of shape {tuple(p.shape)} is in two shard_groups")
            seen.add(id(p))
        out.append((group, sorted(group_params, key=lambda p: index[id(p)])))
    missing = [p for p in held if id(p) not in seen]
    if missing:
        raise ValueError(f"{owner}: {len(missing)} parameter(s) (first of shape {tuple(missing[0].shape)}) are in "
                         "no shard_groups entry")
    return out


def all_gather_packed(group: dist.ProcessGroup | None, local: torch.Tensor, width: int) -> list[torch.Tensor]:
    """Every rank's 1-D ``local`` (at most ``width`` elements), zero-padded to ``width``, in one ``all_gather``:
    a list of ``[width]`` tensors indexed by group rank (``[padded local]`` for a group of one). Collective."""
    if local.dim() != 1 or local.numel() > width:
        raise ValueError(f"all_gather_packed: local must be 1-D with at most {width} elements, got "
                         f"{tuple(local.shape)}")
    packed = torch.zeros(width, dtype=local.dtype, device=local.device)
    packed[: local.numel()] = local
    rank, size = group_rank_size(group)
    if size == 1:
        return [packed]
    received = [torch.empty_like(packed) for _ in range(size)]
    dist.all_gather(received, packed, group=group)
    return received


@dataclasses.dataclass(frozen=True)
class Piece:
    """The part of parameter ``index`` that this rank owns: its flat elements ``[lo, hi)`` (of
    ``param.reshape(-1)``), at ``[at, at + hi - lo)`` of the rank's range."""

    index: int
    lo: int
    hi: int
    at: int


class FlatShard:
    """Element-granular ownership of ``params`` over ``group`` (module docstring): Megatron's layout.

    Args:
        params: the group's parameters in the same order on every rank (contiguous, one dtype).
        group: the data-parallel group (None: a group of one).
    Attributes:
        rank, size: this rank's index and the group size; ``shard_numel``: S, the elements per rank;
        ``pieces``: this rank's :class:`Piece` of each parameter it owns part of, in parameter order.
    Raises:
        ValueError: a parameter is not contiguous, or the parameters mix dtypes.
    """

    def __init__(self, params: Sequence[torch.Tensor], group: dist.ProcessGroup | None):
        self.params = list(params)
        self.group = group
        self.rank, self.size = group_rank_size(group)
        for p in self.params:
            if not p.is_contiguous():
                raise ValueError(f"FlatShard: the parameter of shape {tuple(p.shape)} is not contiguous")
        if len({p.dtype for p in self.params}) > 1:
            raise ValueError(f"FlatShard: parameters of several dtypes {sorted({str(p.dtype) for p in self.params})}")
        self.offsets = [0]
        for p in self.params:
            self.offsets.append(self.offsets[-1] + p.numel())
        total = self.offsets[-1]
        self.shard_numel = -(-total // self.size)
        start, end = self.rank * self.shard_numel, min(total, (self.rank + 1) * self.shard_numel)
        self.pieces = [Piece(i, max(start, a) - a, min(end, b) - a, max(start, a) - start)
                       for i, (a, b) in enumerate(zip(self.offsets, self.offsets[1:])) if max(start, a) < min(end, b)]

    def piece_of(self, index: int) -> Piece | None:
        """This rank's :class:`Piece` of parameter ``index``; None when it owns none of it."""
        return next((pc for pc in self.pieces if pc.index == index), None)

    def flat(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """``tensors`` (shaped as ``params``) laid end to end at their offsets, zero-padded to ``size * shard_numel``:
        the one buffer both :meth:`reduce_scatter` and :meth:`all_reduce` reduce."""
        flat = torch.zeros(self.shard_numel * self.size, dtype=tensors[0].dtype, device=tensors[0].device)
        for t, a, b in zip(tensors, self.offsets[:-1], self.offsets[1:], strict=True):
            flat[a:b] = t.reshape(-1)
        return flat

    @torch.no_grad()
    def reduce_scatter(self, tensors: Sequence[torch.Tensor], divisor: int) -> None:
        """Each of ``tensors`` (shaped as ``params``, one per parameter) summed over the group and divided by
        ``divisor``, written into this rank's owned range of it only (the rest keeps its local value): one
        ``reduce_scatter_tensor`` of :meth:`flat`. Collective."""
        flat = self.flat(tensors)
        mine = torch.empty(self.shard_numel, dtype=flat.dtype, device=flat.device)
        if self.size > 1:
            dist.reduce_scatter_tensor(mine, flat, group=self.group)
        else:
            mine.copy_(flat)
        mine.div_(divisor)
        for pc in self.pieces:
            tensors[pc.index].view(-1)[pc.lo: pc.hi].copy_(mine[pc.at: pc.at + pc.hi - pc.lo])

    @torch.no_grad()
    def all_reduce(self, tensors: Sequence[torch.Tensor], divisor: int) -> None:
        """Each of ``tensors`` summed over the group and divided by ``divisor``, whole: one ``all_reduce`` of the
        same :meth:`flat` buffer :meth:`reduce_scatter` reduces. The collective's summation order of an element
        depends on its place in the buffer and on the buffer's length (gloo's ring), so reducing this buffer
        gives every owned range bit for bit what :meth:`reduce_scatter` gives its owner: the replicated
        optimizer and the distributed one see the same gradients. Collective."""
        flat = self.flat(tensors)
        if self.size > 1:
            dist.all_reduce(flat, group=self.group)
        flat.div_(divisor)
        for t, a, b in zip(tensors, self.offsets[:-1], self.offsets[1:], strict=True):
            t.view(-1).copy_(flat[a:b])

    @torch.no_grad()
    def all_gather(self, tensors: Sequence[torch.Tensor], owned: dict[int, torch.Tensor] | None = None) -> None:
        """Every rank's owned range of ``tensors`` (shaped as ``params``) copied into the others' (collective).

        ``owned[i]`` (1-D, this rank's piece of parameter ``i``) replaces ``tensors[i]``'s owned range as what this
        rank sends: a sharded fp32 master, or its bf16 cast, whose parameter holds no values of its own. Values
        travel in the parameters' dtype (a bf16 value is exact in fp32) and are cast into each tensor's dtype."""
        owned = owned or {}
        dtype = self.params[0].dtype
        local = torch.cat([(owned[pc.index] if pc.index in owned else tensors[pc.index].view(-1)[pc.lo: pc.hi])
                           .to(dtype) for pc in self.pieces]) if self.pieces \
            else torch.zeros(0, dtype=dtype, device=tensors[0].device)
        flat = torch.cat(all_gather_packed(self.group, local, self.shard_numel))
        for t, a, b in zip(tensors, self.offsets[:-1], self.offsets[1:], strict=True):
            t.view(-1).copy_(flat[a:b])
