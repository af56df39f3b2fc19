"""orchestrator.rank.devices: device, data plane, kernels and FP8 chosen as configured, or one-line errors."""

import os
import subprocess
import sys

import pytest
import torch
import yaml

from support.jobs import tiny_job
from v4train.orchestrator.rank.devices import PlacementError, resolve_placement

ALL = {"triton", "transformer_engine"}


def gpu(backend="nccl", fp8=False, *, environ=None, count=8, nccl=True, modules=ALL):
    return resolve_placement("gpu", backend, fp8, environ=environ or {}, cuda_available=True, device_count=count,
                             nccl_available=nccl, module_available=lambda name: name in modules)


def test_cpu_ranks_use_gloo_and_the_torch_kernels(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    p = resolve_placement("cpu", "gloo", False)
    assert (p.device, p.backend, p.kernels, p.fp8) == (torch.device("cpu"), "gloo", "torch", "off")
    assert resolve_placement("cpu", "gloo", True).fp8 == "emulation"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_placement("cpu", "gloo", False).kernels == "triton-interpreter"


def test_gpu_ranks_pin_local_rank_and_use_nccl_triton_and_te():
    p = gpu(environ={"LOCAL_RANK": "3"}, fp8=True)
    assert (p.device, p.backend, p.kernels, p.fp8) == (torch.device("cuda", 3), "nccl", "triton", "transformer_engine")
    assert gpu().device == torch.device("cuda", 0)        # a Ray actor sees only its own GPU
    assert "device cuda:3, data plane nccl" in p.describe()


@pytest.mark.parametrize("call, field, missing", [
    (lambda: resolve_placement("cpu", "nccl", False), "cluster.backend", "needs cluster.device: gpu"),
    (lambda: resolve_placement("gpu", "nccl", False, cuda_available=False), "cluster.device", "no CUDA device"),
    (lambda: gpu("gloo"), "cluster.backend", "set backend: nccl"),
    (lambda: gpu(nccl=False), "cluster.backend", "no NCCL"),
    (lambda: gpu(environ={"LOCAL_RANK": "8"}), "LOCAL_RANK=8", "sees 8 CUDA device"),
    (lambda: gpu(modules={"transformer_engine"}), "cluster.device", "triton is not importable"),
    (lambda: gpu(fp8=True, modules={"triton"}), "train.fp8", "transformer_engine is not importable"),
])
def test_an_impossible_choice_fails_with_one_line_naming_it(call, field, missing):
    with pytest.raises(PlacementError) as info:
        call()
    message = str(info.value)
    assert message.startswith(field) and missing in message and "\n" not in message


@pytest.mark.timeout(300)
def test_launch_stops_at_start_with_one_line(tiny_dataset, tmp_path):
    """A GPU job on a machine without CUDA: exit 2 and one error line, before any rank joins."""
    job, cluster = tmp_path / "job.yaml", tmp_path / "cluster.yaml"
    job.write_text(yaml.safe_dump(tiny_job(tiny_dataset)))
    cluster.write_text(yaml.safe_dump({"name": "g", "devices_per_node": 1, "device": "gpu", "simulated": False,
                                       "backend": "nccl"}))
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29391",
               CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "v4train.orchestrator.launch", str(job), "--run-dir",
                           str(tmp_path / "run"), "--cluster", str(cluster)], capture_output=True, text=True,
                          env=env, timeout=240)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "v4train launch: error: cluster.device: gpu but this process sees no CUDA device "
        f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}; CUDA_VISIBLE_DEVICES=)"]
