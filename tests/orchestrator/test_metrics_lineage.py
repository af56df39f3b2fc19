"""`metrics.jsonl` is append-only: after `resume --step k` the steps after k appear twice. Readers (`v4train
report`, `v4train status`) show the run's current trajectory only: the supervisor's `start` event at step k
makes the records after k history. Runs on the in-process fake rank group (no processes, no model)."""

from __future__ import annotations

import json

import pytest

from support.jobs import tiny_job
from v4train.orchestrator.control.fake_group import FakeRankGroup, Script
from v4train.orchestrator.control.supervisor import Phase, Supervisor
from v4train.orchestrator.control.telemetry import Telemetry
from v4train.orchestrator.spec import ClusterSpec, JobSpec
from v4train.orchestrator.tools.cli import main
from v4train.orchestrator.tools.jobs import format_status
from v4train.orchestrator.tools.report import read_run, summary

pytestmark = pytest.mark.timeout(60)


def _train(run, steps: int, resume_from: str | None = None) -> None:
    job = JobSpec.model_validate(tiny_job(run / "no-dataset", train={"steps": steps, "max_restarts": 0},
                                          checkpoint={"every_steps": 2, "at_end": True, "async_save": False}))
    telemetry = Telemetry(run, steps, live=False)
    sup = Supervisor(job, ClusterSpec(name="fake", devices_per_node=2), str(run), lambda: FakeRankGroup(2, Script()),
                     telemetry, resume_from=resume_from)
    try:
        assert sup.run() is Phase.FINISHED
    finally:
        telemetry.close()


def _lines(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_resume_to_an_earlier_step_shows_one_curve(tmp_path, capsys):
    run = tmp_path / "run"
    _train(run, 6)
    _train(run, 4, resume_from="step_00000002")
    lines = _lines(run)
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5, 6, 3, 4]  # the stream keeps both trajectories
    metrics, events = read_run(run)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert [m["time"] for m in metrics] == [m["time"] for m in lines[:2] + lines[-2:]]  # the resumed records
    assert [e["step"] for e in events if e["event"] == "checkpoint_committed"] == [2, 4]  # 4 and 6 set aside
    s = summary(metrics, events)
    assert (s["steps"], s["last_committed"]) == (4, 4)
    assert main(["report", str(run)]) == 0
    assert "steps                     4" in capsys.readouterr().out


def test_records_after_the_restored_step_are_history_before_the_first_new_step(tmp_path):
    """A resumed run stopped before its first step: the abandoned steps are not shown as current."""
    run = tmp_path / "run"
    _train(run, 6)
    _train(run, 2, resume_from="step_00000002")  # restored at its last step: trains nothing
    assert [m["step"] for m in _lines(run)] == [1, 2, 3, 4, 5, 6]
    metrics, events = read_run(run)
    assert [m["step"] for m in metrics] == [1, 2]
    assert summary(metrics, events)["last_committed"] == 2
    status = format_status({"job_id": "j", "status": "RUNNING", "message": "", "run_dir": str(run), "start": None,
                            "end": None})
    assert "progress  step 2  " in status  # v4train status: not step 6 of the abandoned trajectory


def test_a_restart_after_a_failure_replaces_the_replayed_steps(tmp_path):
    run = tmp_path / "run"
    job = JobSpec.model_validate(tiny_job(run / "no-dataset", train={"steps": 6, "max_restarts": 1},
                                          checkpoint={"every_steps": 2, "at_end": True, "async_save": False}))
    telemetry = Telemetry(run, 6, live=False)
    group = FakeRankGroup(2, Script(failures={4: "died"}))  # the script fails step 4 once
    sup = Supervisor(job, ClusterSpec(name="fake", devices_per_node=2), str(run), lambda: group, telemetry)
    try:
        assert sup.run() is Phase.FINISHED
    finally:
        telemetry.close()
    lines = _lines(run)
    assert [(m["step"], m["restarts"]) for m in lines] == [(1, 0), (2, 0), (3, 0), (3, 1), (4, 1), (5, 1), (6, 1)]
    metrics, _ = read_run(run)
    assert [(m["step"], m["restarts"]) for m in metrics] == [(1, 0), (2, 0), (3, 1), (4, 1), (5, 1), (6, 1)]
