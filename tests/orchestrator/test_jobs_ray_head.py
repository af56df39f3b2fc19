"""Acceptance: a real Ray head on 127.0.0.1, the demo job submitted through `v4train submit`, followed with
`v4train status`, its logs read with `v4train logs`, a second job stopped with `v4train stop`.

The head runs as `ray start --head --block` in its own session and temp directory, with every port chosen
free and the dashboard on loopback; it is shut down afterwards, even on failure, by signalling exactly that
process group (SIGTERM to `ray start`, whose reaper ends the head's processes, then SIGKILL to the group).
Not `ray stop`: that ends every Ray process on the machine, including other test sessions' clusters.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from support.paths import REPO_ROOT, holds
from v4train.orchestrator.control.rendezvous import free_port

HEAD_START_TIMEOUT_S = 90
JOB_TIMEOUT_S = 400


def _ray_cli() -> list[str]:
    script = Path(sys.executable).parent / "ray"
    return [str(script)] if script.exists() else [sys.executable, "-m", "ray.scripts.scripts"]


@pytest.fixture(scope="module")
def ray_head():
    """(job server address, environment) of a Ray head started for this module and always shut down."""
    from ray.job_submission import JobSubmissionClient

    temp = tempfile.mkdtemp(prefix="v4r", dir="/tmp")  # short: Ray's socket paths live under it
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")  # the job's `python`
    env.pop("RAY_ADDRESS", None)
    dash = free_port()
    port_flags = ("port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
                  "metrics-export-port", "ray-client-server-port", "node-manager-port", "object-manager-port")
    ports = {f"--{name}": free_port() for name in port_flags}
    cmd = _ray_cli() + ["start", "--head", "--block", "--node-ip-address=127.0.0.1", "--include-dashboard=true",
                        "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--num-cpus=8",
                        f"--object-store-memory={256 * 2**20}", f"--temp-dir={temp}", "--disable-usage-stats"]
    cmd += [f"{k}={v}" for k, v in ports.items()]
    log = open(Path(temp) / "head.log", "w")  # noqa: SIM115 - closed in the finaliser
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=temp)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + HEAD_START_TIMEOUT_S
        while True:
            try:
                JobSubmissionClient(address)
                break
            except Exception as exc:
                if head.poll() is not None or time.monotonic() > deadline:
                    log_tail = (Path(temp) / "head.log").read_text()[-2000:]
                    raise RuntimeError(f"Ray head did not come up: {log_tail}") from exc
                time.sleep(0.5)
        yield address, env
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)  # anything of the head's session still alive
        except ProcessLookupError:
            pass
        head.wait(timeout=10)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _v4train(*args, env, timeout=JOB_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "v4train.orchestrator.tools.cli", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # about a minute
@pytest.mark.ci
@pytest.mark.timeout(900)
def test_submit_status_logs_and_stop_on_a_running_ray_cluster(ray_head, tiny_dataset, tmp_path):
    address, env = ray_head
    env = {k: v for k, v in env.items() if k != "PATH"} | {"PATH": os.environ.get("PATH", "")}
    cluster = yaml.safe_load((REPO_ROOT / "clusters/local-ray.yaml").read_text()) | {"address": address}
    cluster_file = tmp_path / "local-ray.yaml"
    cluster_file.write_text(yaml.safe_dump(cluster))
    common = ["--cluster", str(cluster_file), "--set", f"data.path={tiny_dataset}", "--set", "train.eval_batches=0",
              "--set", "checkpoint.every_steps=0"]

    run = tmp_path / "run"
    sub = _v4train("submit", "configs/demo.yaml", *common, "--set", "train.steps=3", "--run-dir", str(run), env=env)
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip().splitlines()[-1]
    assert job_id.startswith("v4train-demo-")

    status = _v4train("status", job_id, "--cluster", str(cluster_file), "--wait", "--timeout", str(JOB_TIMEOUT_S),
                      env=env)
    logs = _v4train("logs", job_id, "--cluster", str(cluster_file), env=env).stdout
    assert status.returncode == 0, status.stdout + logs[-3000:]
    assert "status    SUCCEEDED" in status.stdout and f"run dir   {run}" in status.stdout
    assert "progress  step 3" in status.stdout
    assert "v4train: finished demo at step 3" in logs
    followed = _v4train("logs", job_id, "--address", address, "--follow", env=env)  # a finished job: all, then exit
    assert followed.returncode == 0 and "v4train: finished demo at step 3" in followed.stdout
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    assert (run / "latest").read_text().strip() == "step_00000003"  # the final checkpoint committed on the cluster

    # A second job, stopped while it runs: its supervisor tears its ranks down.
    run2 = tmp_path / "run2"
    sub2 = _v4train("submit", "configs/demo.yaml", *common, "--set", "train.steps=100000", "--run-dir", str(run2),
                    env=env)
    assert sub2.returncode == 0, sub2.stderr
    job2 = sub2.stdout.strip().splitlines()[-1]
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while "status    RUNNING" not in (state := _v4train("status", job2, "--address", address, env=env).stdout):
        assert time.monotonic() < deadline and "status    PENDING" in state, f"second job never ran: {state}"
        time.sleep(1)
    stopped = _v4train("stop", job2, "--address", address, env=env)
    assert stopped.returncode == 0 and "status    STOPPED" in stopped.stdout, stopped.stdout + stopped.stderr

    from ray.util.state import list_actors

    deadline = time.monotonic() + 60
    while any(a.class_name == "RankWorker" for a in list_actors(address=address, filters=[("state", "=", "ALIVE")])):
        assert time.monotonic() < deadline, "rank actors outlived the stopped job"
        time.sleep(1)


def _events(run_dir: Path) -> list[dict]:
    path = run_dir / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _two_rank_cluster(ray_head, tmp_path: Path) -> tuple[str, dict, Path]:
    """``(address, env, cluster file)``: the head's address, its environment with this PATH, and a cluster file
    of 2 devices on it."""
    address, env = ray_head
    env = {k: v for k, v in env.items() if k != "PATH"} | {"PATH": os.environ.get("PATH", "")}
    cluster_file = tmp_path / "cluster.yaml"
    cluster_file.write_text(yaml.safe_dump({"name": "ray2", "devices_per_node": 2, "address": address,
                                            "collective_timeout_s": 300}))
    return address, env, cluster_file


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_c13_job_status_tells_the_truth(ray_head, tiny_dataset, tmp_path):
    """A rank raising with no restarts left: FAILED; a killed rank recovered: SUCCEEDED with its restart count; a
    stopped job: STOPPED. `status --wait` exits non-zero unless SUCCEEDED, the state agrees with the last event
    in events.jsonl, and `v4train logs` names the rank, step and cause. The three jobs run at once."""
    from support.jobs import tiny_job

    address, env, cluster_file = _two_rank_cluster(ray_head, tmp_path)
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(tiny_job(tiny_dataset, parallel={"dp": 2},
                                                train={"steps": 4, "warmup_steps": 1, "max_restarts": 1},
                                                checkpoint={"every_steps": 2, "at_end": False})))
    runs = {"failed": ["--set", "train.max_restarts=0", "--inject-fault", "raise@3:rank=1"],
            "recovered": ["--inject-fault", "kill@3:rank=1"],
            "stopped": ["--set", "train.steps=100000"]}
    ids = {}
    for name, extra in runs.items():
        sub = _v4train("submit", str(job_file), "--cluster", str(cluster_file), "--run-dir", str(tmp_path / name),
                       *extra, env=env)
        assert sub.returncode == 0, sub.stderr
        ids[name] = sub.stdout.strip().splitlines()[-1]

    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not any(e["event"] == "start" for e in _events(tmp_path / "stopped")):
        assert time.monotonic() < deadline, "the job to stop never started"
        time.sleep(1)
    stopped = _v4train("stop", ids["stopped"], "--address", address, env=env)
    assert "status    STOPPED" in stopped.stdout, stopped.stdout + stopped.stderr

    expected = {"failed": ("FAILED", "failure"), "recovered": ("SUCCEEDED", "finish"),
                "stopped": ("STOPPED", "stopped")}
    for name, (state, last_event) in expected.items():
        status = _v4train("status", ids[name], "--address", address, "--wait", "--timeout", str(JOB_TIMEOUT_S),
                          env=env)
        assert f"status    {state}" in status.stdout, (name, status.stdout)
        assert (status.returncode == 0) == (state == "SUCCEEDED"), (name, status.returncode)
        assert _events(tmp_path / name)[-1]["event"] == last_event, (name, _events(tmp_path / name)[-3:])
        assert f"event     {last_event} at step" in status.stdout
    recovered = _v4train("status", ids["recovered"], "--address", address, env=env).stdout
    assert "progress  step 4" in recovered and "restarts 1" in recovered
    logs = _v4train("logs", ids["failed"], "--address", address, env=env).stdout
    assert "run failed: rank 1 exception in train_step: RuntimeError: injected fault raise@3 on rank 1" in logs
    assert "[failure] step 2" in logs



@pytest.mark.slow
@pytest.mark.timeout(900)
def test_c12_stop_leaves_no_process_and_the_resumed_run_stays_within_the_first_ones_memory(ray_head, tiny_dataset,
                                                                                            tmp_path):
    """C12 after `v4train stop`: within 30 s of the stop no process of the job's rank group remains (alive and
    not a zombie), none reparented to init holds the run directory, and the run resumed from its last commit
    (`v4train resume`) peaks within 10% of the first run's resident memory."""
    import psutil
    from ray.util.state import list_actors

    from support.jobs import tiny_job

    address, env, cluster_file = _two_rank_cluster(ray_head, tmp_path)
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(tiny_job(tiny_dataset, parallel={"dp": 2},
                                                train={"steps": 100000, "warmup_steps": 1},
                                                checkpoint={"every_steps": 2, "at_end": False, "async_save": True})))
    run = tmp_path / "run"
    sub = _v4train("submit", str(job_file), "--cluster", str(cluster_file), "--run-dir", str(run), env=env)
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip().splitlines()[-1]
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not any(e["event"] == "checkpoint_committed" for e in _events(run)):
        assert time.monotonic() < deadline, "the job never committed a checkpoint"
        time.sleep(1)
    ranks = [a.pid for a in list_actors(address=address, filters=[("state", "=", "ALIVE")], detail=True)
             if a.class_name == "RankWorker" and a.pid]
    assert len(ranks) >= 2, ranks  # the two ranks (and any spare)
    group = set(ranks) | {c.pid for p in ranks if psutil.pid_exists(p) for c in psutil.Process(p).children(True)}
    stopped = _v4train("stop", job_id, "--address", address, env=env)
    stopped_at = time.monotonic()
    assert "status    STOPPED" in stopped.stdout, stopped.stdout + stopped.stderr

    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    while [p for p in group if alive(p)]:
        assert time.monotonic() - stopped_at < 30, f"processes of the stopped group alive: {group}"
        time.sleep(0.5)
    orphans = [p.pid for p in psutil.process_iter(["ppid"]) if p.info["ppid"] == 1 and holds(run, p.pid)]
    assert orphans == []

    first = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last_committed = max(e["step"] for e in _events(run) if e["event"] == "checkpoint_committed")
    resumed = _v4train("resume", str(run), "--set", f"train.steps={last_committed + 2}", env=env)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][len(first):]
    assert [m["step"] for m in rows] == [last_committed + 1, last_committed + 2]
    first_peak = max(m["peak_rss_mb"] for m in first)
    assert max(m["peak_rss_mb"] for m in rows) <= 1.1 * first_peak, (first_peak, rows)
