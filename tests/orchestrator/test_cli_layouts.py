"""Through the CLI: the demo job on 8 simulated devices (TP2 x PP2 x DP2) logs the same per-step
losses as on one device. Slow (8 rank processes on the CI machine's 2 cores): ``make test-slow``."""

from __future__ import annotations

import json
import subprocess

import pytest

from support.cli import V4TRAIN, cli_env
from support.paths import REPO_ROOT

pytestmark = pytest.mark.slow


@pytest.mark.timeout(1800)
def test_demo_on_eight_devices_logs_the_one_device_losses(tmp_path):
    if not (REPO_ROOT / "datasets" / "shakespeare" / "dataset.json").exists():
        pytest.skip("needs the demo dataset: v4train prepare-data --source shakespeare --out datasets/shakespeare")
    losses = {}
    for devices, (tp, pp, dp) in ((8, (2, 2, 2)), (1, (1, 1, 1))):
        run_dir = tmp_path / f"sim{devices}"
        layout = [f"--set=parallel.{k}={v}" for k, v in (("tp", tp), ("pp", pp), ("ep", 1), ("dp", dp))]
        subprocess.run([*V4TRAIN, "submit", "configs/demo.yaml", "--cluster", f"clusters/local-sim-{devices}.yaml",
                        *layout, "--set=train.steps=3", "--set=train.eval_batches=0", "--run-dir", str(run_dir)],
                       cwd=REPO_ROOT, env=cli_env(), check=True, timeout=1500)
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        losses[devices] = [(r["step"], r["loss"]) for r in records]
    assert [s for s, _ in losses[1]] == [1, 2, 3]
    for (step, ref), (_, got) in zip(losses[1], losses[8], strict=True):
        assert got == pytest.approx(ref, rel=1e-5), step
