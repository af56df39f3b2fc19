"""Non-finite gradients (case C7): a step whose global gradient norm is not finite on any rank is skipped
everywhere by the ranks (``orchestrator/rank/trainer.py``); a streak of ``train.max_consecutive_nonfinite``
such steps escalates by ``train.nonfinite_policy`` (:func:`orchestrator.control.decisions.decide`): ``halt``
stops the run, ``rollback`` calls :func:`roll_back`.
"""

from __future__ import annotations

from v4train.orchestrator.checkpoint import CheckpointError
from v4train.orchestrator.control.checkpointing import CheckpointCoordinator
from v4train.orchestrator.control.rank_group import RankGroup
from v4train.orchestrator.control.run_state import RunState

__all__ = ["roll_back"]


def roll_back(group: RankGroup, checkpoints: CheckpointCoordinator, state: RunState, step: int,
              telemetry) -> RunState:
    """Restore the last committed checkpoint and skip the data window since it: the loader keeps its
    position, while the step and token counters (hence the LR schedule and curriculum) return to the
    checkpoint's. Raises CheckpointError when no committed checkpoint exists."""
    state = checkpoints.commit_pending(group, state, wait=True)
    latest = checkpoints.latest(group)
    if latest is None:
        raise CheckpointError(f"{state.consecutive_nonfinite} consecutive non-finite gradients at step {step} and "
                              "no committed checkpoint to roll back to")
    cursor = group.loader_state()
    state, _ = checkpoints.restore(group, state, latest)
    group.set_loader_state(cursor)
    state, superseded = checkpoints.supersede_after(group, state)
    telemetry.event("rollback", state.step, from_step=step, source="checkpoint", reason="nonfinite",
                    skipped_data=True, superseded=superseded)
    return state.replace(consecutive_nonfinite=0)
