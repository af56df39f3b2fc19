"""C15: a checkpoint on object storage is self-contained. Train with the checkpoint root on S3 (moto), delete
the run directory, and resume on a fresh directory from the S3 root and the job file alone
(`v4train resume --from s3://bucket/prefix JOB.yaml`): the losses after the checkpoint equal the straight
run's bit for bit. Resuming step 2 while step 4 is committed also sets step 4 aside on S3."""

from __future__ import annotations

import json
import shutil
import subprocess
import uuid

import pytest
import yaml

from support.cli import V4TRAIN, cli_env
from support.jobs import tiny_job
from support.paths import REPO_ROOT
from v4train.orchestrator import checkpoint
from v4train.orchestrator.checkpoint.storage import Storage
from v4train.orchestrator.control.run_state import TRAIN_STATE_KEYS


def _metrics(run_dir) -> dict[int, dict]:
    return {m["step"]: m for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_c15_resume_from_an_s3_root_and_the_job_file_alone_continues_bitwise(tiny_dataset, s3_server, tmp_path):
    root = f"s3://{s3_server['bucket']}/c15-{uuid.uuid4().hex[:8]}"
    job = tiny_job(tiny_dataset, parallel={"dp": 2}, train={"steps": 4, "warmup_steps": 1},
                   checkpoint={"every_steps": 2, "at_end": False, "root": root,
                               "endpoint_url": s3_server["endpoint_url"]})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump({"name": "sim2", "devices_per_node": 2,
                                                           "collective_timeout_s": 300}))
    first = tmp_path / "first"
    run = subprocess.run(V4TRAIN + ["submit", str(tmp_path / "job.yaml"), "--cluster", str(tmp_path / "cluster.yaml"),
                                    "--run-dir", str(first)], cwd=REPO_ROOT, env=cli_env(), capture_output=True,
                         text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-2000:]
    straight = _metrics(first)
    shutil.rmtree(first)

    storage = Storage(root, endpoint_url=s3_server["endpoint_url"])
    names = set(storage.listdir())
    assert {"step_00000002", "step_00000004", "latest"} <= names
    state = json.loads(storage.read_text("step_00000002/train_state.json"))
    assert set(TRAIN_STATE_KEYS) <= set(state) and state["rng"] and state["loader"]
    assert {"COMMIT", "manifest.json", "train_state.json", ".metadata"} <= set(storage.files("step_00000002"))

    second = tmp_path / "second"
    resumed = subprocess.run(V4TRAIN + ["resume", "--from", root, str(tmp_path / "job.yaml"), "--step", "2",
                                        "--cluster", str(tmp_path / "cluster.yaml"), "--run-dir", str(second)],
                             cwd=REPO_ROOT, env=cli_env(), capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    after = _metrics(second)
    assert sorted(after) == [3, 4]
    for step, m in after.items():
        for key in ("loss", "grad_norm", "lr", "consumed_tokens"):
            assert m[key] == straight[step][key], (key, step)
    start = next(json.loads(line) for line in (second / "events.jsonl").read_text().splitlines()
                 if json.loads(line)["event"] == "start")
    assert [s.split(".")[0] for s in start["superseded"]] == ["step_00000004"]
    assert checkpoint.latest_committed(storage) == "step_00000004"
    assert checkpoint.verify(storage, "step_00000004")["step"] == 4
