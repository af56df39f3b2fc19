"""Recovery from a rank failure: which injected faults have had their chance, and where a restart resumes.

A failed attempt's state is never repaired in place: the supervisor keeps the healthy rank processes or
releases every rank (:meth:`RankGroup.rejoin`), counts the restart against ``train.max_restarts``
(:func:`orchestrator.control.decisions.restart_allowed`) and sets the group up again from the newest
committed checkpoint, or from step 0 when there is none (:func:`recovery_point`).
"""

from __future__ import annotations

from v4train.orchestrator import checkpoint
from v4train.orchestrator.control.run_state import RunState
from v4train.orchestrator.faults import Fault
from v4train.orchestrator.spec import JobSpec
from v4train.orchestrator.checkpoint.storage import Storage

__all__ = ["fired", "recovery_point"]


def fired(fault: Fault, step: int, checkpointing: bool) -> bool:
    """Whether ``fault`` has had its chance in an attempt that failed after step ``step`` (during the save
    of that step when ``checkpointing``), so a recovered run must not meet it again."""
    in_flight = step if checkpointing else step + 1
    save_kind = fault.kind in ("kill_during_save", "kill_during_upload")
    return fault.step < in_flight or (fault.step == in_flight and save_kind == checkpointing)


def recovery_point(storage: Storage, state: RunState, job: JobSpec, telemetry,
                   **fields) -> tuple[RunState, str | None]:
    """Count one restart; return the state to start from and the committed checkpoint to restore (None:
    none exists, the run starts again from step 0). Emits the ``restart`` event, with ``fields`` (how the
    failed group was torn down)."""
    state = state.replace(restarts=state.restarts + 1)
    latest = checkpoint.latest_committed(storage)
    from_step = int(checkpoint.read_train_state(storage, latest)["step"]) if latest else 0
    if latest is None:
        state = state.replace(step=0, consumed_tokens=0, consumed_samples=0)
    telemetry.event("restart", from_step, restart=state.restarts, max_restarts=job.train.max_restarts,
                    from_checkpoint=storage.url_of(latest) if latest else None, **fields)
    return state, latest
