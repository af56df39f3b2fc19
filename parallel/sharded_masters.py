"""fp32 master weights sharded by the distributed optimizer under bf16 (``precision: bf16`` with
``train.distributed_optimizer``): ZeRO-1's masters, as Megatron's ``DistributedOptimizer`` keeps them.

Each parameter computed in bf16 (:func:`parallel.mixed_precision.computes_in_bf16`) that the distributed
optimizer updates keeps, on every rank, only its bf16 compute copy, persistently; its fp32 master lives on the
rank that updates it: the owned element range of an AdamW parameter
(:class:`parallel.distributed_adamw.DistributedAdamW`), the whole matrix on its master rank for Muon
(:meth:`parallel.distributed_muon.DistributedMuon.master_rank`, the owner of its first block, which receives
every block's update). Bytes per such parameter: 2 (bf16 copy) + 4 / DP (master) + 4 (fp32 gradient, reduced
as before) + the optimizer state / DP. The optimizers step the masters and hand every rank the bf16 cast of each
updated master (one all-gather per group; every rank would cast the same fp32 value, so the copies are those
of the replicated run bit for bit).

Outside a step's forward and backward such a parameter's storage is a placeholder (:func:`placeholder`): fp32
and of the parameter's shape, so its fp32 gradient can be assigned, but one NaN element broadcast (4 bytes), so
a read that forgets the masters yields NaN rather than a plausible value, and a write raises.
:meth:`ShardedMasters.whole` gives every such parameter its whole fp32 value for a while (checkpoint save and
load, in-memory snapshots), so checkpoints still hold fp32 masters and stay layout-free.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from v4train.parallel.distributed_adamw import DistributedAdamW
from v4train.parallel.distributed_muon import DistributedMuon

__all__ = ["ShardedMasters", "placeholder"]


def placeholder(shape: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """An fp32 tensor of ``shape`` holding one NaN element broadcast to every position (strides 0, 4 bytes).

    torch accepts it as a parameter's ``.data`` and then accepts a gradient of the parameter's shape and dtype
    (the ``.grad`` setter checks dtype, device and sizes, not strides), and refuses in-place writes into it
    (overlapping memory): ``tests/parallel/test_parallel_sharded_masters.py`` fails if torch changes either."""
    return torch.full((), float("nan"), dtype=torch.float32, device=device).expand(*shape)


class ShardedMasters:
    """The sharded fp32 masters of ``params`` (bf16-computed parameters) under the distributed parts of
    ``optimizers`` (module docstring). Parameters no distributed optimizer updates are left alone.

    Built after the optimizer and before its first step; moves each parameter's values into its bf16 copy and,
    for the owner, its fp32 master, and registers both with the optimizer (``optimizer.masters``).

    Raises:
        ValueError: a parameter is not fp32 or is not contiguous.
    """

    def __init__(self, params: Sequence[nn.Parameter], optimizers: Sequence[torch.optim.Optimizer]):
        wanted = {id(p): p for p in params}
        self.params: list[nn.Parameter] = []
        self.bf16: dict[int, torch.Tensor] = {}
        self._optimizers = [o for o in optimizers if isinstance(o, (DistributedAdamW, DistributedMuon))]
        with torch.no_grad():
            for opt in self._optimizers:
                for p in (q for g in opt.param_groups for q in g["params"] if id(q) in wanted):
                    if p.dtype != torch.float32 or not p.is_contiguous():
                        raise ValueError(f"ShardedMasters: a parameter of shape {tuple(p.shape)} is {p.dtype}"
                                         f"{'' if p.is_contiguous() else ', not contiguous'}; needs contiguous fp32")
                    opt.masters[id(p)] = (self._master_of(opt, p, p.detach()), p.detach().to(torch.bfloat16))
                    self.bf16[id(p)] = opt.masters[id(p)][1]
                    self.params.append(p)
                    p.data = placeholder(p.shape, p.device)

    @staticmethod
    def _master_of(opt, p: torch.Tensor, whole: torch.Tensor) -> torch.Tensor | None:
        """A fresh fp32 copy of what this rank keeps of ``p``'s master, taken from ``whole`` (its fp32 value)."""
        if isinstance(opt, DistributedAdamW):
            mine = opt.owned_slice(p, whole)
            return None if mine is None else mine.clone()
        return whole.clone() if opt.holds_master(p) else None

    def master_bytes(self) -> int:
        """Bytes of the fp32 masters this rank keeps."""
        return sum(m[0].numel() * 4 for opt in self._optimizers for m in opt.masters.values() if m[0] is not None)

    @contextmanager
    def whole(self) -> Iterator[None]:
        """Inside, every sharded parameter holds its whole fp32 master (all-gathered: collective over the data-
        and expert-data-parallel groups, enter on every rank); on exit the masters and bf16 copies are taken
        from the parameters' values (a checkpoint or snapshot load included) and the placeholders are back."""
        whole: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            for opt in self._optimizers:
                whole.update(opt.whole_masters())
        for p in self.params:
            p.data = whole[id(p)]
        try:
            yield
        finally:
            with torch.no_grad():
                for opt in self._optimizers:
                    for p in (q for g in opt.param_groups for q in g["params"] if id(q) in opt.masters):
                        master, copy = opt.masters[id(p)]
                        if master is not None:
                            master.copy_(opt.owned_slice(p, p.detach()) if isinstance(opt, DistributedAdamW)
                                         else p.detach())
                        copy.copy_(p.detach())
                for p in self.params:
                    p.data = placeholder(p.shape, p.device)

