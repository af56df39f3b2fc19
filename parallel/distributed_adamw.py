"""Distributed AdamW (ZeRO-1 at element granularity): each rank of a data-parallel group keeps the AdamW
state of one equal, contiguous range of the group's parameters (``train.distributed_optimizer``).

* **Ownership.** A group's AdamW parameters (dense over the data-parallel group, routed experts over the
  expert-data-parallel group) are laid end to end in one flat index space in the optimizer's order, padded to
  a multiple of the group size and cut into equal ranges (:class:`parallel.ownership.FlatShard`, Megatron's
  ``DistributedOptimizer`` layout): a parameter may straddle ranks, so the state per rank is 1/DP of the
  group's elements whatever the largest parameter (an embedding or a head bigger than the total / DP
  included). A pure function of the model and the group size: every rank derives the same table.
* **Gradients** are reduce-scattered, not all-reduced (:meth:`DistributedAdamW.reduce_scatter_gradients`):
  each rank receives the group's mean gradient of its own range only, which also makes it the one rank that
  counts those elements in the global gradient norm (:meth:`DistributedAdamW.owned_gradients`).
* **Step.** The owner runs torch AdamW's own step on 1-D views of its owned ranges (state ``exp_avg`` /
  ``exp_avg_sq`` of the range's length, ``step`` per parameter), so every element follows AdamW's
  arithmetic exactly; one ``all_gather`` per group then gives every rank the updated parameters.
* **Checkpoints stay global**: :meth:`DistributedAdamW.gather_state` rebuilds every parameter's whole state on
  every rank (an all-gather of the owned ranges and a MAX all-reduce of the step counts) and
  :meth:`DistributedAdamW.scatter_state` keeps the owned ranges again, so a checkpoint written with it loads
  without it, at another data-parallel size, and the reverse (``parallel.optim.global_state``).

Muon matrices are not in these ranges: Newton-Schulz runs on whole matrices only, so each Muon matrix is owned
whole by one rank (:mod:`parallel.distributed_muon`), which keeps its momentum.

Megatron-core's ``DistributedOptimizer`` is not used: it needs Megatron's ``DistributedDataParallel`` around a
Megatron module (its contiguous per-dtype param-and-grad buffers with bucketed reduce-scatter hooks, which own
``param.main_grad``) and wraps the whole model chunk in a ``MegatronOptimizer``; the trainer's stage is a plain
module with its own gradient sync, a hybrid Muon + AdamW optimizer whose Muon part owns whole matrices, and
global checkpoints through PyTorch DCP. The layout is Megatron's; the module is ours.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.distributed as dist

from v4train.parallel import groups
from v4train.parallel.data_parallel import reduce_flat_gradients
from v4train.parallel.ownership import FlatShard, resolve_shard_groups

__all__ = ["DistributedAdamW"]

_MOMENTS = ("exp_avg", "exp_avg_sq")


class DistributedAdamW(torch.optim.AdamW):
    """torch AdamW whose state and update of each element live on one rank of its ``shard_groups`` group.

    Args:
        params: as for AdamW (named groups allowed); contiguous fp32 (or one dtype per shard group) tensors.
        shard_groups: ``(process group or None, parameters)`` pairs covering every parameter exactly once.
        **adamw_settings: lr, betas, eps, weight_decay, ... (no ``amsgrad``, ``fused`` or ``capturable``).
    Raises:
        ValueError: a parameter in no or in two shard groups, a foreign parameter, a non-contiguous parameter,
            or an unsupported setting.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], *,
                 shard_groups: Sequence[tuple[dist.ProcessGroup | None, Sequence[torch.Tensor]]], **adamw_settings):
        super().__init__(params, **adamw_settings)
        if any(g["amsgrad"] or g["fused"] or g["capturable"] for g in self.param_groups):
            raise ValueError("DistributedAdamW: amsgrad, fused and capturable are not supported")
        held = [p for group in self.param_groups for p in group["params"]]
        self._shards = [FlatShard(ps, group) for group, ps in resolve_shard_groups("DistributedAdamW", held,
                                                                                   shard_groups)]
        # param -> (its shard, this rank's piece of it or None)
        self._piece = {id(p): (s, s.piece_of(i)) for s in self._shards for i, p in enumerate(s.params)}
        # id(param) -> (fp32 master of its owned range or None, its bf16 compute copy): parameters whose values
        # live there instead of in the parameter (:mod:`parallel.sharded_masters`)
        self.masters: dict[int, tuple[torch.Tensor | None, torch.Tensor]] = {}

    def owned_range(self, param: torch.Tensor) -> tuple[int, int] | None:
        """The flat elements ``[lo, hi)`` of ``param`` whose state this rank keeps; None when it keeps none.
        KeyError for a foreign tensor."""
        piece = self._piece[id(param)][1]
        return None if piece is None else (piece.lo, piece.hi)

    def sharded_params(self) -> list[torch.Tensor]:
        """Every parameter this optimizer shards (all of its parameters, whichever rank owns which range)."""
        return [p for s in self._shards for p in s.params]

    @property
    def shards(self) -> list[FlatShard]:
        """The flat layout of each shard group (:class:`parallel.ownership.FlatShard`), in ``shard_groups`` order."""
        return list(self._shards)

    # ------------------------------------------------------------------ gradients
    @torch.no_grad()
    def reduce_scatter_gradients(self, divisor: int, reduced: Sequence[torch.Tensor] = ()) -> None:
        """Each group's gradients summed over its ranks and divided by ``divisor`` (data parallel: the DP size,
        for the dense mean and the expert sum over expert-DP alike), into this rank's owned range of each
        ``.grad`` only; the rest of a ``.grad`` keeps its local, unreduced value and is never read. The gradients
        of ``reduced`` (parameters the caller has already reduced over the group) are left as they are.
        :func:`parallel.data_parallel.reduce_flat_gradients` on every shard group (collective over each); raises
        ValueError for a sparse gradient."""
        for shard in self._shards:
            reduce_flat_gradients(shard, divisor, scatter=True, reduced=reduced)

    def owned_gradients(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(param, 1-D view of its gradient's owned range)`` for every parameter with a gradient of which
        this rank owns a part: the reduced values, what this rank counts in the global gradient norm."""
        out = []
        for shard in self._shards:
            for pc in shard.pieces:
                p = shard.params[pc.index]
                if p.grad is not None:
                    out.append((p, p.grad.view(-1)[pc.lo: pc.hi]))
        return out

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """AdamW on the owned ranges, then every group's updated parameters all-gathered (collective over each
        shard group; all its ranks must agree on which parameters have a gradient, as after
        :meth:`reduce_scatter_gradients`)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        everything = [group["params"] for group in self.param_groups]
        views: dict[int, torch.Tensor] = {}  # id(param) -> the 1-D view of its owned range AdamW steps
        try:
            for group in self.param_groups:
                stepped = []
                for p in group["params"]:
                    piece = self._piece[id(p)][1]
                    if piece is None or p.grad is None:
                        continue
                    view = self.masters[id(p)][0] if id(p) in self.masters else p.detach().view(-1)[piece.lo: piece.hi]
                    view.grad = p.grad.view(-1)[piece.lo: piece.hi]
                    if p in self.state:
                        self.state[view] = self.state.pop(p)
                    views[id(p)] = view
                    stepped.append(view)
                group["params"] = stepped
            super().step()
        finally:
            for group, params in zip(self.param_groups, everything, strict=True):
                group["params"] = params
                for p in params:
                    view = views.get(id(p))
                    if view is not None and view in self.state:
                        self.state[p] = self.state.pop(view)
        for shard in self._shards:
            sharded = any(id(p) in self.masters for p in shard.params)
            if (shard.size > 1 or sharded) and any(p.grad is not None for p in shard.params):
                self._all_gather(shard, bf16=True)
        return loss

    def _all_gather(self, shard: FlatShard, *, bf16: bool) -> list[torch.Tensor]:
        """Every rank's owned values of ``shard``'s parameters into every rank's copies (collective): a parameter
        with a sharded master receives its master's bf16 cast into its bf16 copy (``bf16``) or the master itself
        into a new whole fp32 tensor (returned in parameter order; the others: the parameter)."""
        targets, owned = [], {}
        for i, p in enumerate(shard.params):
            master = self.masters.get(id(p))
            if master is None:
                targets.append(p.detach())
                continue
            targets.append(master[1] if bf16 else torch.empty(p.shape, dtype=torch.float32, device=p.device))
            if master[0] is not None:
                owned[i] = master[0].to(torch.bfloat16) if bf16 else master[0]
        shard.all_gather(targets, owned)
        return targets

    @torch.no_grad()
    def whole_masters(self) -> dict[int, torch.Tensor]:
        """``id(param) -> whole fp32 value`` of every parameter with a sharded master: the owners' ranges
        all-gathered (collective over every shard group)."""
        out = {}
        for shard in self._shards:
            if any(id(p) in self.masters for p in shard.params):
                for p, t in zip(shard.params, self._all_gather(shard, bf16=False), strict=True):
                    if id(p) in self.masters:
                        out[id(p)] = t
        return out

    def owned_slice(self, param: torch.Tensor, whole: torch.Tensor) -> torch.Tensor | None:
        """The 1-D view of ``whole`` (shaped as ``param``) over this rank's owned range of ``param``; None when
        it owns none of it."""
        piece = self._piece[id(param)][1]
        return None if piece is None else whole.reshape(-1)[piece.lo: piece.hi]

    # ------------------------------------------------------------------ checkpoints
    @torch.no_grad()
    def gather_state(self) -> None:
        """Give every rank every parameter's whole state (``step``, ``exp_avg``, ``exp_avg_sq``, shaped as the
        parameter), as the non-distributed AdamW holds it: per shard group one all-gather of the owned ranges
        of each moment and one MAX all-reduce of the step counts. A parameter never stepped gets AdamW's
        initial state (zeros, step 0). Collective; call before saving or loading a checkpoint and
        :meth:`scatter_state` after."""
        for shard in self._shards:
            if not shard.params:
                continue
            steps = torch.stack([self.state[p]["step"] if self.state.get(p) else torch.zeros((), dtype=torch.float32)
                                 for p in shard.params])
            if shard.size > 1:
                steps = groups.all_reduce_on(steps, shard.params[0].device, shard.group, dist.ReduceOp.MAX)
            whole = {}
            for k in _MOMENTS:
                ts = [torch.zeros_like(p) for p in shard.params]
                for pc in shard.pieces:
                    state = self.state.get(shard.params[pc.index])
                    if state:
                        ts[pc.index].view(-1)[pc.lo: pc.hi] = state[k]
                shard.all_gather(ts)
                whole[k] = ts
            for i, p in enumerate(shard.params):
                self.state[p] = {"step": steps[i].clone(), "exp_avg": whole["exp_avg"][i],
                                 "exp_avg_sq": whole["exp_avg_sq"][i]}

    @torch.no_grad()
    def scatter_state(self) -> None:
        """Keep only the owned ranges of the whole state :meth:`gather_state` (or a checkpoint load) left: a
        parameter this rank owns nothing of loses its state. Local, no communication."""
        for p in list(self.state):
            state = self.state[p]
            piece = self._piece[id(p)][1]
            if piece is None or not state:
                del self.state[p]
                continue
            for k in _MOMENTS:
                if state[k].shape == p.shape:  # whole: keep a fresh copy of the owned range only
                    state[k] = state[k].reshape(-1)[piece.lo: piece.hi].clone()
