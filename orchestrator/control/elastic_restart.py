"""torchrun's restarts of a job: ``torchrun --max-restarts N`` starts every worker of the job again after one fails.

torchrun's elastic agent replaces every process of the job, healthy or not, and runs each with the same
command line, telling it which restart it is (``TORCHELASTIC_RESTART_COUNT``, 0 for the first attempt). A
restarted process of ``python -m v4train.orchestrator.launch`` therefore:

- continues from the newest committed checkpoint of the run, as ``--resume`` does, and never deletes the run
  directory, even when the command line says ``--overwrite`` (that flag was for the first attempt);
- does not train again after a deterministic fault (``orchestrator/recovery/fault_taxonomy.py``): torchrun
  restarts on any exit code, so the restarted process reads the previous attempts' ``failure`` events from
  ``events.jsonl`` and exits 1 at once, with one line, when the last one was deterministic or repeated an
  earlier one at the same step (the taxonomy's repeat rule);
- meets only the injected faults (``orchestrator/faults.py``) the previous attempts had not reached: each
  fault fires once, as it does across the Ray supervisor's restarts.

Everything here reads what rank 0 of the earlier attempts recorded in the run directory, which every rank sees.

torchrun's static rendezvous (``--master-addr/--master-port``) keeps one store for all attempts, so the keys an
attempt's process groups leave there (each rank's address, under group names that repeat in every attempt) are
still there when the next attempt starts, and a rank can read its peer's address of the attempt before and fail to
connect. A restarted attempt therefore puts every key under its own prefix (:func:`attempt_store`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from v4train.orchestrator.control.telemetry import read_jsonl
from v4train.orchestrator.faults import parse_fault

__all__ = ["ENV", "PreviousAttempts", "restart_count", "previous_attempts", "refusal", "unfired_faults",
           "attempt_store"]

ENV = "TORCHELASTIC_RESTART_COUNT"


def restart_count(environ=os.environ) -> int:
    """Which torchrun restart this process belongs to: 0 for the first attempt (and outside torchrun)."""
    return int(environ.get(ENV, "0") or 0)


@dataclass(frozen=True)
class PreviousAttempts:
    """What the earlier attempts of a run recorded: the step of the last metrics record (0: none; after a
    rollback or a resume to an earlier step it is lower than steps recorded before) and their ``failure``
    events, oldest first."""

    last_step: int = 0
    failures: list[dict] = field(default_factory=list)


def previous_attempts(run_dir: Path) -> PreviousAttempts:
    """Read ``metrics.jsonl`` and ``events.jsonl`` of ``run_dir`` (absent files: nothing recorded)."""
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "step" in r]
    failures = [e for e in read_jsonl(run_dir / "events.jsonl") if e.get("event") == "failure"]
    return PreviousAttempts(last_step=steps[-1] if steps else 0, failures=failures)


def _signature(failure: dict) -> str:
    from v4train.orchestrator.recovery.fault_taxonomy import FaultHistory

    return FaultHistory.signature(str(failure.get("cause", "")))


def refusal(previous: PreviousAttempts) -> str | None:
    """Why a restart must not train again (one line), or None when it may: the last recorded failure was
    deterministic, or the same fault (cause without addresses, ids and durations) at the same step as an earlier
    one."""
    if not previous.failures:
        return None
    last = previous.failures[-1]
    where = f"at step {last.get('step')}: {last.get('cause')}"
    if last.get("fault_class") == "deterministic":
        return f"the previous attempt stopped on a deterministic fault {where}"
    for earlier in previous.failures[:-1]:
        if earlier.get("step") == last.get("step") and _signature(earlier) == _signature(last):
            return f"the same fault repeated after a restart {where}"
    return None


def unfired_faults(faults: list[str], last_step: int) -> list[str]:
    """The injected faults (``KIND@STEP...``) an attempt that recorded steps up to ``last_step`` had not reached:
    a step fault fires at the start of its step, a save fault after its step, so the failed attempt met every
    fault of a step up to ``last_step`` and the step faults of ``last_step + 1``."""
    from v4train.orchestrator.recovery.restart import fired

    return [text for text in faults if not fired(parse_fault(text), last_step, checkpointing=False)]


def attempt_store(init_method: str, rank: int, world_size: int, timeout_s: float, restart: int):
    """The rendezvous store of ``init_method`` (``tcp://host:port``, torch.distributed's own rendezvous: a client
    of torchrun's agent store under torchrun) with every key under ``v4train-attempt-<restart>/``, for
    ``torch.distributed.init_process_group(store=...)``."""
    import datetime

    import torch.distributed as dist

    store, _, _ = next(dist.rendezvous(init_method, rank, world_size, timeout=datetime.timedelta(seconds=timeout_s)))
    return dist.PrefixStore(f"v4train-attempt-{restart}", store)
