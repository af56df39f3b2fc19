"""`python -m v4train.orchestrator.launch` under torchrun: the same losses as the Ray supervisor, checkpoints that
commit and resume, and one-line errors outside torchrun."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from support.cli import torchrun
from support.jobs import run_job, tiny_job
from support.paths import REPO_ROOT
from v4train.orchestrator.launch import rank_env

def _losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.timeout(900)
def test_torchrun_matches_the_ray_supervisor_and_resumes(rank_pool, tiny_dataset, tmp_path):
    job = tiny_job(tiny_dataset, parallel={"pp": 2, "dp": 1}, checkpoint={"every_steps": 0, "at_end": True})
    ray_metrics, _, _ = run_job(rank_pool, job, tmp_path / "ray")
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job))

    run = tmp_path / "torchrun"
    first = torchrun(2, str(job_file), "--run-dir", str(run), "--set", "checkpoint.every_steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    assert _losses(run) == [m["loss"] for m in ray_metrics]  # bit-identical to the Ray-driven run
    assert (run / "latest").read_text().strip() == "step_00000003" and (run / "step_00000002" / "COMMIT").is_file()
    # as if the job had died after step 2: only that checkpoint exists; --resume replays step 3 exactly
    shutil.rmtree(run / "step_00000003")
    (run / "latest").write_text("step_00000002")
    resumed = torchrun(2, str(job_file), "--run-dir", str(run), "--resume", "--set", "checkpoint.every_steps=2")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert _losses(run)[3:] == [ray_metrics[2]["loss"]]
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events if e["event"] in ("start", "checkpoint_committed", "finish")] == \
        ["start", "checkpoint_committed", "checkpoint_committed", "finish", "start", "checkpoint_committed", "finish"]
    restart = [e for e in events if e["event"] == "start"][1]
    assert restart["step"] == 2 and restart["launcher"] == "torchrun"


def test_rank_env_reads_torchrun_and_slurm():
    assert rank_env({"RANK": "3", "WORLD_SIZE": "8", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}) == \
        (3, 8, "tcp://10.0.0.1:29500")
    assert rank_env({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "MASTER_ADDR": "n1", "MASTER_PORT": "1"})[:2] == (1, 2)
    with pytest.raises(ValueError, match="torchrun or srun"):
        rank_env({})


def test_launch_outside_torchrun_is_one_line():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                                                            "SLURM_PROCID", "SLURM_NTASKS")}
    proc = subprocess.run([sys.executable, "-m", "v4train.orchestrator.launch", "configs/demo.yaml", "--run-dir", "x"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "torchrun or srun" in proc.stderr


# Fields that differ between two runs of the same job by nature: clocks, throughput, memory, the launcher's
# name, and the random suffix of a checkpoint attempt's directory.
PATH_SPECIFIC = {"time", "step_time_s", "tokens_per_s", "peak_rss_mb", "setup_s", "setup_parts_s", "launcher",
                 "seconds", "training_blocked_s"}
CPU_TIMES = ("stage_cpu_s/", "rank_step_cpu_s/", "rank_update_cpu_s/")


def _records(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        record = {k: v for k, v in json.loads(line).items()
                  if k not in PATH_SPECIFIC and not k.startswith(CPU_TIMES)}
        if "path" in record:
            record["path"] = Path(record["path"]).name.split(".attempt-")[0]
        out.append(record)
    return out


@pytest.mark.timeout(600)
def test_torchrun_and_ray_write_the_same_records_with_evaluation_during_a_ramp(rank_pool, tiny_dataset, tmp_path):
    """Both launchers run one supervisor loop: the same metrics and events, evaluation at train.eval_seq_len
    (64) while training ramps from 32 to 64 tokens, checkpoints at the same steps."""
    job = tiny_job(tiny_dataset, data={"seq_len": 32}, parallel={"pp": 2, "dp": 1},
                   train={"steps": 4, "warmup_steps": 0, "eval_every": 2, "eval_batches": 2, "eval_seq_len": 64},
                   checkpoint={"every_steps": 3, "at_end": True, "async_save": False},
                   curriculum={"stages": [{"seq_len": 32, "tokens": 512}, {"seq_len": 64}], "batch_multiple": 4})
    run_job(rank_pool, job, tmp_path / "ray")
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job))
    proc = torchrun(2, str(job_file), "--run-dir", str(tmp_path / "torchrun"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("metrics.jsonl", "events.jsonl"):
        assert _records(tmp_path / "torchrun" / name) == _records(tmp_path / "ray" / name), name
    events = _records(tmp_path / "ray" / "events.jsonl")
    assert [(e["event"], e["step"]) for e in events if e["event"] in ("eval", "stage_change")] == \
        [("eval", 2), ("stage_change", 2), ("eval", 4)]
    assert [m["seq_len"] for m in _records(tmp_path / "ray" / "metrics.jsonl")] == [32, 32, 64, 64]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("master_addr, interface, expected", [
    ("nosuch.invalid", None, r"host .* cannot reach the rendezvous nosuch\.invalid:29500"),
    ("127.0.0.1", "nosuch0", r"interface 'nosuch0' has no IPv4 address on host "),
])
def test_a_node_that_cannot_join_stops_at_start_with_one_line(tiny_dataset, tmp_path, master_addr, interface,
                                                               expected):
    """The node preflight under torchrun/srun: a rendezvous host this node cannot reach, or a data-plane
    interface it lacks, ends the process at once (exit 2, one line naming the host), not at a timeout."""
    import re

    job, cluster = tmp_path / "job.yaml", tmp_path / "cluster.yaml"
    job.write_text(yaml.safe_dump(tiny_job(tiny_dataset)))
    cluster.write_text(yaml.safe_dump({"name": "c", "devices_per_node": 1, "device": "cpu", "backend": "gloo",
                                       **({"interface": interface} if interface else {})}))
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", MASTER_ADDR=master_addr, MASTER_PORT="29500")
    proc = subprocess.run([sys.executable, "-m", "v4train.orchestrator.launch", str(job), "--run-dir",
                           str(tmp_path / "run"), "--cluster", str(cluster)], cwd=REPO_ROOT, capture_output=True,
                          text=True, env=env, timeout=240)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(expected, lines[0]), lines
    assert not (tmp_path / "run").exists()


@pytest.mark.timeout(300)
def test_rank_0_writes_nothing_in_the_run_directory_before_every_rank_has_joined(tiny_dataset, tmp_path):
    """A peer still checking the run directory must see it as it was: rank 0 waiting at the rendezvous has
    written nothing there, and a peer's preflight probe in it does not make it "not empty"."""
    import socket
    import time

    from v4train.orchestrator.control.preflight import PROBE_PREFIX
    from v4train.orchestrator.control.rendezvous import free_port

    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(tiny_job(tiny_dataset, parallel={"pp": 2, "dp": 1})))
    run = tmp_path / "run"
    run.mkdir()
    (run / f"{PROBE_PREFIX}peer").write_bytes(b"")
    port = free_port()
    env = dict(os.environ, RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    proc = subprocess.Popen([sys.executable, "-m", "v4train.orchestrator.launch", str(job), "--run-dir", str(run)],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while True:  # rank 0 hosts the rendezvous store: once it listens, it is waiting for rank 1
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "rank 0 never opened the rendezvous"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        assert sorted(p.name for p in run.iterdir()) == [f"{PROBE_PREFIX}peer"]
    finally:
        proc.kill()
        proc.wait()
