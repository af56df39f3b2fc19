"""Activation recompute of V4 blocks with MoE routing replay (``train.recompute``).

Modes (:data:`RECOMPUTE_MODES`), applied by :class:`model.block.Block`:

  none       every activation of the block is kept (the attention layer still recomputes its own cheap
             projections, ``model/attention.py``).
  selective  the attention sub-layer (attn_norm + attention) and the MoE sub-layer (ffn_norm + router +
             experts + shared expert) keep only their inputs and are re-run in the backward; the mHC
             read/write and the residual streams stay saved.
  full       the block keeps only its input, the hyper-connection streams ``[B, S, N, D]``, and is re-run
             whole in the backward (Megatron's full recompute, Korthikanti et al. 2022 §4).

A recomputed region runs through :func:`torch.utils.checkpoint.checkpoint` (non-reentrant) with a
:class:`RegionReplay` as its ``context_fn``. The first forward *records* every router's top-k indices
(learned and hash routes, and whatever the anticipatory-routing tape decided); the recompute *replays*
them, so routing is never decided twice (a tie broken differently, or a tape popped twice, would give a
different backward than forward). During the recompute the MoE and attention layers skip their logging
(auxiliary-loss logs, expert counts feeding the balancing bias, load and entropy statistics), so every
statistic is counted once; the auxiliary losses themselves reach the backward once, through the first
forward's graph. The recompute runs to the end of the region (no early stop): it re-runs the region's
collectives (tensor-parallel reductions, expert-parallel all-to-alls), and every rank of a group must
run all of them.
"""

from __future__ import annotations

from contextlib import contextmanager
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["RECOMPUTE_MODES", "RegionReplay", "recompute_region", "check_recompute_mode"]

RECOMPUTE_MODES = ("none", "selective", "full")


def check_recompute_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`RECOMPUTE_MODES`; ValueError naming ``recompute`` otherwise."""
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"recompute {mode!r}: choose one of {', '.join(RECOMPUTE_MODES)}")
    return mode


class RegionReplay:
    """Routing record of one recomputed region, and the switch that silences its logging on the re-run.

    The region's modules that take part expose ``routing_replay`` (routers: where to record or replay
    their indices) and ``recomputing`` (MoE and attention layers: skip logging while True). ``contexts``
    is the ``context_fn`` of :func:`torch.utils.checkpoint.checkpoint`: (first forward, recompute).
    """

    def __init__(self, region: nn.Module):
        self._routers = [m for m in region.modules() if hasattr(m, "routing_replay")]
        self._loggers = [m for m in region.modules() if hasattr(m, "recomputing")]
        self._routes: list[torch.Tensor] = []
        self._replaying = False
        self._next = 0

    def contexts(self):
        return self._recording(), self._recomputing()

    def indices(self, decide: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A router's ``[T, K]`` indices: ``decide()`` recorded in the first forward, the recorded ones in
        the recompute (in call order). RuntimeError when the recompute asks for more routes than recorded."""
        if not self._replaying:
            indices_TK = decide()
            self._routes.append(indices_TK.detach())
            return indices_TK
        if self._next >= len(self._routes):
            raise RuntimeError(f"recompute: the re-run asked for route {self._next + 1}, the forward recorded "
                               f"{len(self._routes)}")
        self._next += 1
        return self._routes[self._next - 1]

    @contextmanager
    def _recording(self) -> Iterator[None]:
        with self._attached(replaying=False):
            yield

    @contextmanager
    def _recomputing(self) -> Iterator[None]:
        self._next = 0
        with self._attached(replaying=True):
            yield

    @contextmanager
    def _attached(self, *, replaying: bool) -> Iterator[None]:
        self._replaying = replaying
        for router in self._routers:
            router.routing_replay = self
        for module in self._loggers:
            module.recomputing = replaying
        try:
            yield
        finally:
            for router in self._routers:
                router.routing_replay = None
            for module in self._loggers:
                module.recomputing = False


def recompute_region(region: nn.Module, fn: Callable[..., torch.Tensor], *args: torch.Tensor) -> torch.Tensor:
    """``fn(*args)`` (the forward of ``region`` or a part of it) with its activations dropped after the
    forward and recomputed in the backward, routing replayed (module docstring). Only ``args`` (and the
    parameters) are kept. Without autograd (evaluation) ``fn`` simply runs."""
    if not torch.is_grad_enabled():
        return fn(*args)
    replay = RegionReplay(region)
    return checkpoint(fn, *args, use_reentrant=False, context_fn=replay.contexts, early_stop=False)
