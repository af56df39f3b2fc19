"""Spike rollback (spec section 8.1): after a loss spike, return to a state from before it and go on.

The spike guard (``orchestrator/recovery/spike_guard.py``) judges each step; when
:func:`orchestrator.control.decisions.decide` returns ``rollback="spike"``, :func:`roll_back` restores every
rank's newest in-memory snapshot at least two steps old (``orchestrator/rank/snapshots.py``; with
``spike_guard.skip_data`` the loader keeps its position, so the window that led to the spike is not trained
on again), else the last committed checkpoint old enough. Committed checkpoints of the abandoned trajectory
are set aside, and anticipatory routing (``orchestrator/recovery/anticipatory_routing.py``) runs for
``spike_guard.anticipatory_steps`` steps.
"""

from __future__ import annotations

from v4train.orchestrator.checkpoint import CheckpointError
from v4train.orchestrator.control.checkpointing import CheckpointCoordinator
from v4train.orchestrator.control.rank_group import RankGroup
from v4train.orchestrator.control.run_state import RunState
from v4train.orchestrator.spec import JobSpec

__all__ = ["roll_back"]


def roll_back(group: RankGroup, checkpoints: CheckpointCoordinator, state: RunState, step: int,
              counters_at: dict[int, tuple[int, int]], job: JobSpec, telemetry) -> RunState:
    """Roll the run back from a spike seen at ``step``; returns the restored state, its anticipatory-routing
    window taken from ``state`` (the decision's). ``counters_at`` holds the counters of each snapshot step.
    Raises CheckpointError when neither a snapshot nor a checkpoint precedes step ``step - 1``."""
    routing = state.routing
    state = checkpoints.commit_pending(group, state, wait=True)
    skip = job.spike_guard.skip_data
    restored = set(group.rollback(step - 2, skip))
    if len(restored) == 1 and (target := restored.pop()) >= 0:
        tokens, samples = counters_at[target]
        state = state.replace(step=target, consumed_tokens=tokens, consumed_samples=samples)
        source = "memory"
    else:
        latest = checkpoints.latest(group)
        if latest is None or checkpoints.step_of(group, latest) > step - 2:
            raise CheckpointError(f"spike at step {step}: no snapshot or checkpoint before step {step - 1}")
        state, _ = checkpoints.restore(group, state, latest)
        source, skip = "checkpoint", False
    state, superseded = checkpoints.supersede_after(group, state)
    telemetry.event("rollback", state.step, from_step=step, source=source, skipped_data=skip, superseded=superseded)
    state = state.replace(routing=routing)
    if routing.remaining:
        telemetry.event("anticipatory_routing_on", state.step, steps=routing.remaining, delay_steps=1)
    return state
