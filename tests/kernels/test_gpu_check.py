"""benchmarks/gpu_check.py --device cpu: the device check's whole logic at tiny sizes, so it cannot rot."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.ci
@pytest.mark.timeout(900)
def test_gpu_check_runs_end_to_end_on_cpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=840)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    # the parts in the order that puts the most important figures first
    assert [(p["part"], p["outcome"]) for p in data["parts"]] == [
        ("environment", "done"), ("kernels T=[64]", "done"), ("train bf16, fp8 off", "done"),
        ("train bf16, fp8 on", "done"), ("sweep", "done"), ("train fp32, fp8 off", "done")]
    sections = data["sections"]
    for name in ("environment", "kernels", "train", "sweep"):
        assert "error" not in sections[name], sections[name]
    assert sections["environment"]["torch"].startswith("2.")
    (row,) = sections["kernels"]["rows"]
    assert "error" not in row, row
    # the interpreted Triton kernels against the torch reference: same picks, bf16 tolerance on o/dq/dkv/dsink
    assert row["idx_same"] == 1.0 and row["within_tol"] == [True] * 4
    # every launch candidate runs and gives the default configuration's result up to bf16 rounding
    sweep = sections["sweep"]["rows"]
    assert {r["kind"] for r in sweep} == {"fwd", "fwd+bwd"} and all("error" not in r for r in sweep), sweep
    assert max(r["max_diff"] for r in sweep) <= 2e-2
    base, fp8, fp32 = sections["train"]["runs"]
    assert [(r["precision"], r["fp8"]) for r in (base, fp8, fp32)] == [("bf16", False), ("bf16", True),
                                                                       ("fp32", False)]
    assert base["exit_code"] == fp8["exit_code"] == fp32["exit_code"] == 0, (base, fp8, fp32)
    assert base["placement"] == "device cpu, data plane gloo, attention kernels torch, fp8 off"
    assert fp8["placement"].endswith("fp8 emulation")
    steps = sections["train"]["config"]["steps"]
    assert len(base["losses"]) == len(fp8["losses"]) == len(fp32["losses"]) == steps
    # the FP8 emulation and bf16 each move the loss a little, never a lot
    assert 0 < sections["train"]["fp8_vs_base_max_rel_loss_diff"] < 1e-2
    assert 0 < sections["train"]["bf16_vs_fp32_max_rel_loss_diff"] < 1e-2
    assert base["step_time_s"] > 0 and base["model_tflop_per_step"] > 0
    # the planner counts bf16 copies next to the fp32 masters: more than fp32 alone
    assert base["planned_peak_gib"] > fp32["planned_peak_gib"] > 0
    table = (tmp_path / "gpu_check.md").read_text()
    for header in ("| T | K | indexer ms |", "| fp8 | precision |", "| T | pass | config |", "| part | seconds |"):
        assert header in table


@pytest.mark.timeout(300)
def test_parts_past_the_time_budget_are_skipped_and_recorded(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu",
                           "--out", str(tmp_path), "--budget-s", "0", "--sections", "kernels", "sweep"],
                          capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [(p["part"], p["outcome"]) for p in data["parts"]] == [
        ("kernels T=[64]", "skipped: past the 0 s budget"), ("sweep", "skipped: past the 0 s budget")]
    assert data["sections"] == {}
