"""The multi-host simulated cluster (network namespaces, one Ray node each; needs root), three hosts shared by
the module: a two-node job ((TP, PP, DP) = (2, 2, 2), four ranks per node) runs on hosts 0 and 1 with host 2
standing by, as on a cluster with a spare node.

- Unfailed, it gives the one-host losses, the rank-to-node map keeps each tensor-parallel group on one host,
  and a checkpoint written on two hosts resumes on one host and back.
- The same job on all three hosts (a cluster file of 3 x 4 devices: whole tensor-parallel groups, 4 + 2 + 2
  ranks) gives the one-host losses too, and its checkpoint resumes on one host and back.
- ``partition@3:node=1`` cuts host 1's link: its ranks stop answering heartbeats, a node loss; the group is
  rebuilt at once on host 0 and the standby host 2 (ranks on all three hosts over the run) and reaches the
  unfailed losses. Host 1 stays cut off.
- ``node_kill@3:node=1`` then kills host 2 (node 1 of the job now): the group is rebuilt on host 0 alone.

Everything runs through ``v4train submit`` / ``resume`` as a user runs them; the cluster is torn down by its
namespaces' pids."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from support.cli import V4TRAIN, cli_env
from support.jobs import tiny_job
from v4train.orchestrator.tools.sim_cluster import SimCluster, can_create

REASON = can_create()
pytestmark = [pytest.mark.slow, pytest.mark.ci, pytest.mark.skipif(REASON is not None, reason=REASON or "")]

RUN_TIMEOUT_S = 900  # one 8-rank run on a loaded 2-core machine; a hang fails the test


def _cluster_file(path: Path, nodes: int, interface: str | None, devices_per_node: int | None = None) -> Path:
    spec = {"name": path.stem, "nodes": nodes, "devices_per_node": devices_per_node or 8 // nodes, "device": "cpu",
            "simulated": True,
            "backend": "gloo", "collective_timeout_s": 120, "heartbeat_timeout_s": 120,
            "ray": {"num_cpus": 8, "object_store_memory_mb": 256}}
    if interface:
        spec["interface"] = interface
    path.write_text(yaml.safe_dump(spec))
    return path


def _run(prefix: list[str], args: list[str]) -> None:
    proc = subprocess.run([*prefix, *V4TRAIN, *args], env=cli_env(), capture_output=True, text=True,
                          timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, f"{' '.join(args)}: {proc.stderr[-3000:]}"


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


@pytest.fixture(scope="module")
def hosts():
    # 8 logical CPUs per host: after two node losses the remaining host takes every rank
    with SimCluster(3, cpus=8) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def files(tiny_dataset, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sim")
    job = tiny_job(tiny_dataset, parallel={"tp": 2, "pp": 2, "dp": 2}, train={"max_restarts": 1},
                   checkpoint={"every_steps": 2, "at_end": False, "async_save": False})
    (root / "job.yaml").write_text(yaml.safe_dump(job))
    return {"job": root / "job.yaml", "multi": _cluster_file(root / "two-host.yaml", 2, "v4eth"),
            "three": _cluster_file(root / "three-host.yaml", 3, "v4eth", devices_per_node=4),
            "single": _cluster_file(root / "one-host.yaml", 1, None)}


@pytest.fixture(scope="module")
def one_host(files, tmp_path_factory) -> Path:
    """The reference: the same job with every rank on this machine's own Ray (embedded)."""
    run_dir = tmp_path_factory.mktemp("one") / "run"
    _run([], ["submit", str(files["job"]), "--cluster", str(files["single"]), "--run-dir", str(run_dir)])
    return run_dir


def _run_against_one_host(inside: list[str], files: dict[str, Path], cluster: str, one_host: Path, tmp_path: Path,
                          run: str) -> dict[int, float]:
    """Submit the job inside host 0 on ``files[cluster]`` into ``tmp_path/run``, copy the one-host reference
    run to ``tmp_path/one`` (it is resumed later), assert the losses equal (rel 1e-5); the one-host losses."""
    _run(inside, ["submit", str(files["job"]), "--cluster", str(files[cluster]), "--run-dir", str(tmp_path / run)])
    shutil.copytree(one_host, tmp_path / "one")
    got, one = _losses(tmp_path / run), _losses(tmp_path / "one")
    assert sorted(got) == sorted(one) == [1, 2, 3]
    for step in one:
        assert got[step] == pytest.approx(one[step], rel=1e-5), step
    return one


def _resume_across(inside: list[str], files: dict[str, Path], cluster: str, tmp_path: Path, run: str,
                   step3_loss: float) -> None:
    """The multi-host run's step-2 checkpoint resumed on one host, and the one-host run's on ``files[cluster]``
    (inside host 0): both redo step 3 to ``step3_loss`` (rel 1e-5)."""
    for name, cluster_file, prefix in ((run, files["single"], []), ("one", files[cluster], inside)):
        (tmp_path / name / "cluster.yaml").write_text(cluster_file.read_text())
        _run(prefix, ["resume", str(tmp_path / name), "--step", "2"])
        resumed = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert resumed[-1]["step"] == 3
        assert resumed[-1]["loss"] == pytest.approx(step3_loss, rel=1e-5), name


@pytest.mark.timeout(5 * RUN_TIMEOUT_S)
def test_two_hosts_give_the_one_host_losses_and_checkpoints_move_between_them(hosts, files, one_host, tmp_path):
    inside = hosts.exec_prefix(0)
    one = _run_against_one_host(inside, files, "multi", one_host, tmp_path, "two")

    # placement: host i holds ranks 4i..4i+3 (pipeline stage i), so each TP group sits on one host
    placement = json.loads((tmp_path / "two" / "placement.json").read_text())
    assert placement["nodes"] == {h.address: list(range(4 * h.index, 4 * h.index + 4)) for h in hosts.members[:2]}
    assert {r["pp"] for r in placement["ranks"] if r["node"] == hosts.members[1].address} == {1}
    logs = sorted(p.name for p in (tmp_path / "two" / "logs").glob("rank_*.log"))
    assert logs == sorted(f"rank_{r}.log" for r in range(8))

    # the two-host checkpoint of step 2 resumes on one host, the one-host one on two hosts: same step 3
    _resume_across(inside, files, "multi", tmp_path, "two", one[3])


@pytest.mark.timeout(5 * RUN_TIMEOUT_S)
def test_three_hosts_hold_whole_tensor_parallel_groups_and_give_the_one_host_losses(hosts, files, one_host,
                                                                                    tmp_path):
    """Three hosts of four devices for the 8 ranks: host 0 holds pipeline stage 0 (ranks 0-3), hosts 1 and 2
    stage 1's two data-parallel replicas (ranks 4-5 and 6-7), so pipeline and data-parallel traffic cross
    hosts and no tensor-parallel group does. Runs before the drills, which cut host 1 off."""
    inside = hosts.exec_prefix(0)
    one = _run_against_one_host(inside, files, "three", one_host, tmp_path, "three")

    host0, host1, host2 = (h.address for h in hosts.members)
    placement = json.loads((tmp_path / "three" / "placement.json").read_text())
    assert placement["nodes"] == {host0: [0, 1, 2, 3], host1: [4, 5], host2: [6, 7]}
    assert {(r["pp"], r["dp"]) for r in placement["ranks"] if r["node"] == host1} == {(1, 0)}
    assert {(r["pp"], r["dp"]) for r in placement["ranks"] if r["node"] == host2} == {(1, 1)}
    # each rank's own log names the host it ran on
    for rank, node in enumerate([host0] * 4 + [host1] * 2 + [host2] * 2):
        log = (tmp_path / "three" / "logs" / f"rank_{rank}.log").read_text()
        assert f"rank {rank} of 8 on node {node}," in log, rank

    # the three-host checkpoint of step 2 resumes on one host, the one-host one on three hosts: same step 3
    _resume_across(inside, files, "three", tmp_path, "three", one[3])
    placement = json.loads((tmp_path / "one" / "placement.json").read_text())
    assert placement["nodes"] == {host0: [0, 1, 2, 3], host1: [4, 5], host2: [6, 7]}


def _drill(hosts: SimCluster, files: dict[str, Path], run_dir: Path, fault: str) -> tuple[list[dict], list[dict]]:
    """Run the job with ``fault`` inside host 0; returns its events and metrics."""
    _run(hosts.exec_prefix(0), ["submit", str(files["job"]), "--cluster", str(files["multi"]), "--run-dir",
                                str(run_dir), "--inject-fault", fault])
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return events, metrics


def _recovery_times(events: list[dict], metrics: list[dict]) -> str:
    """The drill's timeline from the step-2 commit (the fault strikes as step 3 starts), for BENCHMARKS.md."""
    fault_at = next(e["time"] for e in events if e["event"] == "checkpoint_committed" and e["step"] == 2)
    failure = next(e for e in events if e["event"] == "failure")
    restart_start = [e for e in events if e["event"] == "start"][-1]
    return (f"detected {failure['time'] - fault_at:.1f} s after the step-2 commit; restarted group set up in "
            f"{restart_start['setup_s']} s; step 3 done again {metrics[-1]['time'] - fault_at:.1f} s after it")


@pytest.mark.timeout(2 * RUN_TIMEOUT_S)
def test_partition_is_a_node_loss_recovered_on_the_standby_host(hosts, files, one_host, tmp_path):
    """Host 1's link goes down at the start of step 3: its ranks live on but answer no heartbeat, a node loss
    named by the heartbeats (long before Ray's health checks or the collective timeout would say it); the
    group is rebuilt on host 0 and the standby host 2 from the step-2 checkpoint and reaches the one-host
    losses."""
    events, metrics = _drill(hosts, files, tmp_path / "drill", "partition@3:node=1")
    failure = next(e for e in events if e["event"] == "failure")
    host0, host1, host2 = (h.address for h in hosts.members)
    assert failure["kind"] == "node_lost" and f"node {host1} unreachable: ranks 4-7 answered no heartbeat" in \
        failure["cause"], failure
    assert [e["event"] for e in events].count("start") == 2 and events[-1]["event"] == "finish"
    assert metrics[-1]["step"] == 3 and metrics[-1]["restarts"] == 1
    assert metrics[-1]["loss"] == pytest.approx(_losses(one_host)[3], rel=1e-5)
    placement = json.loads((tmp_path / "drill" / "placement.json").read_text())
    assert placement["nodes"] == {host0: [0, 1, 2, 3], host2: [4, 5, 6, 7]}
    print(f"partition: {_recovery_times(events, metrics)}")


@pytest.mark.timeout(2 * RUN_TIMEOUT_S)
def test_node_kill_is_a_node_loss_recovered_on_the_nodes_left(hosts, files, one_host, tmp_path):
    """Every process of the job's node 1 dies at the start of step 3; the supervisor names a node loss and
    restarts from the step-2 checkpoint on the hosts left: host 0 and a standby host whose link is up (none
    after the partition drill: host 1 is cut off, so host 2 is the one killed and host 0 takes every rank);
    the one-host losses either way. The killed host stays dead."""
    events, metrics = _drill(hosts, files, tmp_path / "drill", "node_kill@3:node=1")
    failure = next(e for e in events if e["event"] == "failure")
    killed = next((h for h in hosts.members[1:] if f"node {h.address} lost: ranks 4-7 died" in failure["cause"]), None)
    assert failure["kind"] == "node_lost" and killed is not None, failure
    assert [e["event"] for e in events].count("start") == 2 and events[-1]["event"] == "finish"
    assert metrics[-1]["step"] == 3 and metrics[-1]["restarts"] == 1
    assert metrics[-1]["loss"] == pytest.approx(_losses(one_host)[3], rel=1e-5)
    placement = json.loads((tmp_path / "drill" / "placement.json").read_text())
    host0 = hosts.members[0].address
    standby = [h.address for h in hosts.members[1:] if h is not killed and hosts.link_up(h.index)]
    expected = {host0: [0, 1, 2, 3], standby[0]: [4, 5, 6, 7]} if standby else {host0: list(range(8))}
    assert placement["nodes"] == expected
    print(f"node_kill: {_recovery_times(events, metrics)}")
