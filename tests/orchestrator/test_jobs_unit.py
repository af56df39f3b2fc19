"""Ray Job Submission without a cluster: what `v4train submit` sends, address resolution, one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from support.paths import REPO_ROOT
from v4train.orchestrator.tools import jobs
from v4train.orchestrator.tools.cli import main
from v4train.orchestrator.spec import ClusterSpec, SpecError, load_cluster
from v4train.orchestrator.control.rendezvous import free_port



class _FakeClient:
    def __init__(self):
        self.calls = []

    def submit_job(self, **kwargs):
        self.calls.append(kwargs)
        return kwargs["submission_id"]


def _cluster_file(tmp_path, address: str) -> Path:
    data = yaml.safe_load((REPO_ROOT / "clusters/local-sim.yaml").read_text())
    data.update(name="remote", address=address)
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_submit_ships_the_checkout_and_the_resolved_job(tmp_path, tiny_dataset, monkeypatch, capsys):
    fake = _FakeClient()
    monkeypatch.setattr(jobs, "_client", lambda address: fake)
    monkeypatch.chdir(tiny_dataset.parent)  # a relative data.path is resolved against the submitter's directory
    cluster = _cluster_file(tmp_path, "http://127.0.0.1:1")
    code = main(["submit", str(REPO_ROOT / "configs/demo.yaml"), "--cluster", str(cluster),
                 "--set", "data.path=dataset", "--set", "train.steps=3", "--run-dir", "rel-run",
                 "--inject-fault", "kill@2:rank=1"])
    assert code == 0
    job_id = capsys.readouterr().out.strip()
    (call,) = fake.calls
    assert call["submission_id"] == job_id and job_id.startswith("v4train-demo-")
    assert call["entrypoint"].startswith("python -m v4train.orchestrator.tools.job_entry --run-dir ")
    assert str(tiny_dataset.parent / "rel-run") in call["entrypoint"]
    assert "--inject-fault kill@2:rank=1" in call["entrypoint"]
    env = call["runtime_env"]["env_vars"]
    job = yaml.safe_load(env[jobs.JOB_ENV])
    assert job["data"]["path"] == str(tiny_dataset) and job["train"]["steps"] == 3
    inner = yaml.safe_load(env[jobs.CLUSTER_ENV])
    assert inner["address"] is None and inner["name"] == "remote"
    assert call["runtime_env"]["working_dir"] == str(REPO_ROOT)
    assert {".venv", "runs", "datasets", ".git"} <= set(call["runtime_env"]["excludes"])
    assert call["metadata"]["run_dir"] == str(tiny_dataset.parent / "rel-run")
    assert not any(k.startswith("AWS_") for k in env)  # credentials never travel with the job


def test_bad_job_fails_before_contacting_the_server(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(jobs, "_client", lambda address: pytest.fail("contacted the server"))
    cluster = _cluster_file(tmp_path, "http://127.0.0.1:1")
    demo = str(REPO_ROOT / "configs/demo.yaml")
    assert main(["submit", demo, "--cluster", str(cluster), "--set", "parallel.pp=3"]) == 2
    assert "ranks exceed the cluster's" in capsys.readouterr().err


def test_unreachable_server_is_one_line(tmp_path, capsys):
    address = f"http://127.0.0.1:{free_port()}"
    assert main(["status", "v4train-x", "--address", address]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("v4train: error: cannot reach the Ray job server") and "\n" not in err


def test_address_resolution(monkeypatch):
    cluster = ClusterSpec(name="c", devices_per_node=1, address="http://head:8265")
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    assert jobs.resolve_address(cluster, None) == "http://head:8265"
    assert jobs.resolve_address(cluster, "http://other:1") == "http://other:1"
    with pytest.raises(SpecError, match="no job server"):
        jobs.resolve_address(None, None)
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://env:2")
    assert jobs.resolve_address(None, None) == "http://env:2"


def test_entrypoint_needs_the_job_in_its_environment():
    env = {k: v for k, v in os.environ.items() if k not in (jobs.JOB_ENV, jobs.CLUSTER_ENV)}
    proc = subprocess.run([sys.executable, "-m", "v4train.orchestrator.tools.job_entry", "--run-dir", "x"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and jobs.JOB_ENV in proc.stderr


def test_shipped_cluster_files_validate():
    for path in sorted((REPO_ROOT / "clusters").glob("*.yaml")):
        cluster = load_cluster(path)
        assert cluster.hardware.peak_tflops > 0, path
    assert load_cluster(REPO_ROOT / "clusters/local-sim-8.yaml").world_size == 8
    assert load_cluster(REPO_ROOT / "clusters/sim-3host-spread.yaml").ranks_per_node(8, 2) == (4, 2, 2)
    assert load_cluster(REPO_ROOT / "clusters/h200-pro.yaml").backend == "nccl"
