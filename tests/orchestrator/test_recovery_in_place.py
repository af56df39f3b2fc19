"""Recovery in place on Ray (C12): a rank SIGKILLed right after an asynchronous save request is replaced by
the spare actor; the three healthy rank processes re-join the new process groups; within 30 s of the
restart no process of the first group but those kept remains, none is reparented to init holding the run
directory, and the group's peak RSS stays within 10% of the first's."""

from __future__ import annotations

import time

import psutil
import pytest
import ray

from support.jobs import run_job, tiny_job
from support.paths import holds
from v4train.orchestrator.control.ray_group import RayRankGroup, start_spare
from v4train.orchestrator.faults import parse_fault


class _Watch:
    """The pool's four warm actors as one group with a warm spare; each started group's rank pids (read at
    its start event)."""

    def __init__(self, pool) -> None:
        self.pool = pool
        self.spare = start_spare()
        ray.get(self.spare.pid.remote(), timeout=300)  # warm before the job starts, as in production
        self.groups: list[RayRankGroup] = []
        self.pids_at_start: list[list[int]] = []
        self.checked_at: list[dict] = []

    def make(self) -> RayRankGroup:
        self.groups.append(RayRankGroup(self.pool.take(4).actors, 60.0, owned=False, spares=[self.spare]))
        return self.groups[-1]

    def pids(self) -> list[int]:
        return ray.get([a.pid.remote() for a in self.groups[-1].actors], timeout=60)

    def release(self) -> None:
        """Kill the spare, wherever it ended up (the pool replaces its own dead actor at the next take)."""
        ray.kill(self.spare, no_restart=True)



@pytest.mark.slow  # a warm spare, a 4-rank job and its recovery: about a minute on an idle 2-core machine
@pytest.mark.timeout(420)
def test_c12_kill_right_after_an_async_save_keeps_survivors_and_leaves_no_orphan(tiny_dataset, rank_pool, tmp_path):
    watch = _Watch(rank_pool)
    job = tiny_job(tiny_dataset, parallel={"pp": 2, "dp": 2},
                   train={"steps": 4, "warmup_steps": 1, "max_restarts": 1},
                   checkpoint={"every_steps": 2, "at_end": False, "async_save": True})

    from v4train.orchestrator.control import telemetry as telemetry_module

    original_event = telemetry_module.Telemetry.event

    def event(self, name, step, **fields):
        original_event(self, name, step, **fields)
        if name == "start":
            watch.pids_at_start.append(watch.pids())
            if len(watch.pids_at_start) == 2:  # the recovered group has started: check the first one's leftovers
                first = set(watch.pids_at_start[0]) - set(watch.pids_at_start[1])
                alive = [p for p in first if psutil.pid_exists(p)
                         and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
                orphans = [p.pid for p in psutil.process_iter(["ppid"])
                           if p.info["ppid"] == 1 and holds(tmp_path, p.pid)]
                watch.checked_at.append({"time": time.time(), "replaced_alive": alive, "orphans": orphans})

    mp = pytest.MonkeyPatch()
    mp.setattr(telemetry_module.Telemetry, "event", event)
    try:
        metrics, events, sup = run_job(rank_pool, job, tmp_path, faults=[parse_fault("kill@3:rank=1")],
                                       make_workers=watch.make)
    finally:
        mp.undo()
        watch.release()
    requested = next(e for e in events if e["event"] == "checkpoint_requested")
    assert requested["step"] == 2 and requested["asynchronous"]
    failure = next(e for e in events if e["event"] == "failure")
    restart = next(e for e in events if e["event"] == "restart")
    assert (failure["rank"], failure["kind"]) == (1, "died")
    assert restart["ranks_kept"] is True and len(watch.groups) == 1  # no new group was made
    before, after = watch.pids_at_start
    assert [after[r] == before[r] for r in range(4)] == [True, False, True, True]  # only rank 1 replaced
    [check] = watch.checked_at
    assert check["time"] - restart["time"] < 30.0
    assert check["replaced_alive"] == [] and check["orphans"] == []
    rss = {m["restarts"]: m["peak_rss_mb"] for m in metrics}
    assert rss[1] <= 1.1 * rss[0], rss
    # the step-2 save never persisted on the killed rank, so it was never committed: the run starts over
    assert restart["from_checkpoint"] is None
    assert [m["step"] for m in metrics if m["restarts"] == 1] == [1, 2, 3, 4]
    # both pipeline stages' MoE layers report their router health in the run's record
    layers = {k.split("/")[1] for k in metrics[-1] if k.startswith("router/")}
    assert len(layers) >= 2 and all(f"router/{layer}/entropy" in metrics[-1] for layer in layers)
