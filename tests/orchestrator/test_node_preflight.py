"""Preflight before setup on real Ray rank actors: a node without the cluster file's data-plane interface
is a deterministic fault naming its host, reported within seconds, never retried against the restart budget."""

from __future__ import annotations

import json
import time

import pytest

from support.jobs import tiny_job
from v4train.orchestrator.control.supervisor import Phase, Supervisor
from v4train.orchestrator.control.telemetry import Telemetry
from v4train.orchestrator.spec import ClusterSpec, JobSpec


@pytest.mark.timeout(300)
def test_node_without_the_interface_fails_at_once_without_restarts(rank_pool, tiny_dataset, tmp_path):
    job = JobSpec.model_validate(tiny_job(tiny_dataset, parallel={"dp": 2}, train={"steps": 2, "max_restarts": 3}))
    cluster = ClusterSpec(name="pool", devices_per_node=2, interface="nosuch0", collective_timeout_s=120,
                          heartbeat_timeout_s=120)
    telemetry = Telemetry(tmp_path, 2, live=False)
    workers = rank_pool.take(2)  # started before the clock: actor start-up is not the preflight's
    sup = Supervisor(job, cluster, str(tmp_path), lambda: workers, telemetry)
    started = time.monotonic()
    try:
        assert sup.run() is Phase.FAILED
    finally:
        telemetry.close()
    # a stall would take the heartbeat timeout (120 s) per attempt, four attempts; the preflight takes a few
    # calls (seconds; the bound leaves room for a loaded 2-core machine)
    assert time.monotonic() - started < 60.0
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    failure = next(e for e in events if e["event"] == "failure")
    assert failure["kind"] == "unreachable" and failure["step"] == 0
    assert failure["fault_class"] == "deterministic"
    assert failure["cause"].startswith("rank 0 (rendezvous): host ")
    assert "interface 'nosuch0' has no IPv4 address" in failure["cause"]
    assert [e for e in events if e["event"] in ("restart", "start")] == []
    assert sup.restarts == 0
