"""C8: checkpoints commit atomically on S3 (a moto server on 127.0.0.1). A writer killed mid-upload and a
supervisor killed between the last shard and COMMIT leave the previous committed checkpoint as what
resume picks; an aborted attempt is never merged with a later save of the same step and is deleted only
after a successor commits. Credentials never reach job.yaml, events or logs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest
import yaml

from support.jobs import run_job, tiny_job
from support.paths import REPO_ROOT
from v4train.orchestrator import checkpoint
from v4train.orchestrator.faults import parse_fault
from v4train.orchestrator.checkpoint.storage import Storage
from v4train.orchestrator.control.ray_group import RayRankGroup



def _job(dataset, s3, prefix, **train):
    return tiny_job(dataset, parallel={"pp": 2, "dp": 2},
                    train={"steps": 6, "warmup_steps": 2, "max_restarts": 1, **train},
                    checkpoint={"every_steps": 2, "at_end": False, "root": f"s3://{s3['bucket']}/{prefix}",
                                "endpoint_url": s3["endpoint_url"], "keep": 0, "async_save": False})


@pytest.fixture(scope="module")
def reference(rank_pool, tiny_dataset, s3_server, tmp_path_factory):
    metrics, _, _ = run_job(rank_pool, _job(tiny_dataset, s3_server, f"ref-{uuid.uuid4().hex[:6]}"),
                            tmp_path_factory.mktemp("s3ref"))
    return {m["step"]: m for m in metrics}


@pytest.mark.slow
@pytest.mark.ci
@pytest.mark.timeout(420)
def test_c08_writer_killed_mid_upload(reference, rank_pool, tiny_dataset, s3_server, tmp_path):
    prefix = f"upload-{uuid.uuid4().hex[:6]}"
    job = _job(tiny_dataset, s3_server, prefix)
    metrics, events, _ = run_job(rank_pool, job, tmp_path, faults=[parse_fault("kill_during_upload@4:rank=1")],
                                 make_workers=lambda: RayRankGroup.create(4, 60.0))
    failure = next(e for e in events if e["event"] == "failure")
    assert (failure["rank"], failure["kind"], failure["step"]) == (1, "died", 4)
    restart = next(e for e in events if e["event"] == "restart")
    assert restart["from_checkpoint"].endswith(f"{prefix}/step_00000002")
    # The step-4 save that died is never committed; a fresh attempt for step 4 commits after the restart.
    committed = [e for e in events if e["event"] == "checkpoint_committed"]
    assert [e["step"] for e in committed] == [2, 4, 6]
    storage = Storage(job["checkpoint"]["root"], endpoint_url=s3_server["endpoint_url"])
    # Whatever of the aborted attempt reached the bucket (the surviving ranks' shards, when they finished
    # before they were stopped) is deleted once its successor commits: no object of any attempt is left.
    deleted_attempts = [d for e in committed for d in e["deleted"] if ".attempt-" in d]
    assert all(".attempt-" not in path for path in storage.files("")), sorted(storage.files(""))
    assert all(d.rsplit("/", 1)[-1].startswith("step_00000004.attempt-") for d in deleted_attempts), deleted_attempts
    names = [c["name"] for c in checkpoint.list_checkpoints(storage)]
    assert names == ["step_00000002", "step_00000004", "step_00000006"]
    for name in ("step_00000002", "step_00000004", "step_00000006"):
        checkpoint.verify(storage, name)
    final = {m["step"]: m for m in metrics if m["restarts"] == 1}
    assert all(final[s]["loss"] == reference[s]["loss"] for s in (3, 4, 5, 6))


@pytest.mark.slow
@pytest.mark.ci
@pytest.mark.timeout(600)
def test_c08_supervisor_killed_between_last_shard_and_commit(reference, tiny_dataset, s3_server, tmp_path):
    prefix = f"sup-{uuid.uuid4().hex[:6]}"
    job = _job(tiny_dataset, s3_server, prefix)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(
        {"name": "sim4", "devices_per_node": 4, "collective_timeout_s": 120, "ray": {"num_cpus": 8}}))
    secret = "s3cr3t-" + uuid.uuid4().hex
    env = dict(os.environ, AWS_ACCESS_KEY_ID="AKIA-TEST", AWS_SECRET_ACCESS_KEY=secret, RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    run_dir = tmp_path / "run"
    cli = [sys.executable, "-m", "v4train.orchestrator.tools.cli"]
    killed = subprocess.run(cli + ["submit", str(tmp_path / "job.yaml"), "--cluster", str(tmp_path / "cluster.yaml"),
                                   "--run-dir", str(run_dir), "--inject-fault", "kill_during_save@4:rank=supervisor"],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    storage = Storage(job["checkpoint"]["root"], endpoint_url=s3_server["endpoint_url"])
    assert checkpoint.latest_committed(storage) == "step_00000002"
    listed = {c["name"]: c["committed"] for c in checkpoint.list_checkpoints(storage)}
    aborted = [n for n, ok in listed.items() if not ok]
    assert len(aborted) == 1 and aborted[0].startswith("step_00000004.attempt-")

    resumed = subprocess.run(cli + ["resume", str(run_dir)], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = {m["step"]: m for m in metrics}
    assert all(last[s]["loss"] == reference[s]["loss"] for s in (3, 4, 5, 6))
    assert checkpoint.latest_committed(storage) == "step_00000006"
    assert not any(".attempt-" in c["name"] for c in checkpoint.list_checkpoints(storage))

    verify = subprocess.run(cli + ["ckpt", "verify", job["checkpoint"]["root"], "--endpoint-url",
                                   s3_server["endpoint_url"]], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    # Credentials never appear in the run directory (job.yaml, events, metrics, rank logs).
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert secret not in path.read_text(errors="ignore"), path
