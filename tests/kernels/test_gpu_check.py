"""benchmarks/gpu_check.py --device cpu: the device check's whole logic at tiny sizes, so it cannot rot."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(900)
def test_gpu_check_runs_end_to_end_on_cpu(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cpu",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=840)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    sections = data["sections"]
    for name in ("environment", "kernels", "train"):
        assert "error" not in sections[name], sections[name]
    assert sections["environment"]["torch"].startswith("2.")
    (row,) = sections["kernels"]["rows"]
    assert "error" not in row, row
    # the interpreted Triton kernels against the torch reference: same picks, bf16 tolerance on o/dq/dkv/dsink
    assert row["idx_same"] == 1.0 and row["within_tol"] == [True] * 4
    base, fp8 = sections["train"]["runs"]
    assert base["exit_code"] == 0 and fp8["exit_code"] == 0, (base, fp8)
    assert base["placement"] == "device cpu, data plane gloo, attention kernels torch, fp8 off"
    assert fp8["placement"].endswith("fp8 emulation")
    assert len(base["losses"]) == len(fp8["losses"]) == sections["train"]["config"]["steps"]
    # the FP8 emulation moves the loss a little, never a lot
    assert 0 < sections["train"]["fp8_vs_base_max_rel_loss_diff"] < 1e-2
    assert base["step_time_s"] > 0 and base["model_tflop_per_step"] > 0 and base["planned_peak_gib"] > 0
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| T | K | indexer ms |" in table and "| fp8 | precision |" in table
