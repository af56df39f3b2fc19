"""Abandoning a rank's step at once when a peer has failed.

A rank learns that a peer died only when it next exchanges data with it: a data-parallel replica of a dead
rank computes its whole forward and backward before the gradient all-reduce fails, seconds on a loaded
machine, and the recovery waits for it. The supervisor therefore asks every surviving rank to abort
(``RankWorker.abort``, answered on the heartbeat thread while the step runs on another), and the step
checks the request between modules: before every module's forward and, through a hook on every block's
output, as the backward reaches each block. The rank's state after an abort is never used again: the
survivor leaves its process groups and is set up anew from the last committed checkpoint.
"""

from __future__ import annotations

import torch

__all__ = ["AbortSwitch", "StepAborted"]


class StepAborted(RuntimeError):
    """The supervisor asked this rank to abandon its call (a peer failed)."""


class AbortSwitch:
    """A flag set from another thread and checked by the thread running the step.

    Setting a Python attribute is atomic, so the heartbeat thread needs no lock to set it.
    """

    def __init__(self) -> None:
        self.requested = False

    def request(self) -> None:
        """Ask the running (or next) call to stop at its next check."""
        self.requested = True

    def check(self) -> None:
        """Raise :class:`StepAborted` if an abort was requested."""
        if self.requested:
            raise StepAborted("aborted by the supervisor: a peer rank failed")

    def install(self, stage: torch.nn.Module, blocks: list[torch.nn.Module]) -> None:
        """Check before the forward of every module of ``stage`` and, in the backward, when the gradient of
        each of ``blocks``' outputs is computed. The hooks return nothing: no value or gradient changes."""
        for module in stage.modules():
            module.register_forward_pre_hook(lambda _module, _args: self.check())
        for block in blocks:
            block.register_forward_hook(self._watch_backward)

    def _watch_backward(self, _module, _args, output) -> None:
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(lambda _grad: self.check())
