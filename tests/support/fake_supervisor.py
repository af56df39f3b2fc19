"""The real Supervisor driven against an in-process rank group (no processes, no model): the job and the runner
shared by the supervisor and fault-taxonomy tests."""

from __future__ import annotations

import json
from pathlib import Path

from support.jobs import tiny_job
from v4train.orchestrator.control.supervisor import Supervisor
from v4train.orchestrator.control.telemetry import Telemetry
from v4train.orchestrator.spec import ClusterSpec, JobSpec


def fake_job(tmp_path: Path, max_restarts: int, **sections) -> JobSpec:
    """The tiny job at 6 steps, checkpoints every 2 steps and at the end (synchronous), `max_restarts` restarts;
    keyword arguments update whole sections. The dataset path is never opened by a fake group."""
    base = tiny_job(tmp_path / "no-dataset", train={"steps": 6, "max_restarts": max_restarts},
                    checkpoint={"every_steps": 2, "at_end": True, "async_save": False})
    for key, value in sections.items():
        base[key] = {**base[key], **value} if isinstance(base.get(key), dict) else value
    return JobSpec.model_validate(base)


def run_supervisor(job: JobSpec, run_dir: Path, group, resume_from: str | None = None):
    """Run `job` to its end against `group`; returns (phase, supervisor, events, metrics records)."""
    telemetry = Telemetry(run_dir, job.train.steps, live=False)
    sup = Supervisor(job, ClusterSpec(name="fake", devices_per_node=2), str(run_dir), lambda: group,
                     telemetry, resume_from=resume_from)
    try:
        phase = sup.run()
    finally:
        telemetry.close()
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    metrics_file = run_dir / "metrics.jsonl"
    metrics = [json.loads(line) for line in metrics_file.read_text().splitlines()] if metrics_file.exists() else []
    return phase, sup, events, metrics
