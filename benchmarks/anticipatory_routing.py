"""Step-time overhead of anticipatory routing (V4 reports about 20%), measured side by side in one run.

One job on the 4-rank simulated cluster (PP=2 x DP=2): anticipatory routing is switched on (the
`anticipatory` drill) for the middle third of the steps; the mean step time of those steps is compared
with the mean of the steps before and after it in the same run. Each anticipatory step adds one
routing-only forward pass over the next step's batch (no backward), so the expected overhead is roughly
the forward's share of a step.

Usage: python benchmarks/anticipatory_routing.py [--data datasets/shakespeare] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from v4train.orchestrator.faults import parse_fault
from v4train.orchestrator.spec import ClusterSpec, JobSpec
from v4train.orchestrator.control.supervisor import Phase, Supervisor
from v4train.orchestrator.control.telemetry import Telemetry
from v4train.orchestrator.control.ray_group import RayRankGroup, start_ray


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="datasets/shakespeare")
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    third = args.steps // 3
    job = JobSpec.model_validate({
        "name": "ar-bench", "model": {"preset": args.preset}, "data": {"path": args.data, "seq_len": 256},
        "train": {"steps": args.steps, "global_batch": 16, "micro_batch_size": 4, "lr": 3e-3, "eval_batches": 0},
        "parallel": {"pp": 2, "dp": 2},
        "checkpoint": {"every_steps": 0, "at_end": False},
        "spike_guard": {"anticipatory_steps": third},
    })
    start_ray(8, 512)
    Path("runs").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir="runs") as tmp:
        telemetry = Telemetry(tmp, job.train.steps, live=False, print_every=1000)
        drill = parse_fault(f"anticipatory@{third + 1}")
        sup = Supervisor(job, ClusterSpec(name="sim4", devices_per_node=4), tmp,
                         lambda: RayRankGroup.create(4, 120.0), telemetry, faults=[drill])
        assert sup.run() is Phase.FINISHED, sup.failure
        telemetry.close()
        metrics = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    warm = [m for m in metrics if m["step"] > 2]  # the first steps pay one-time costs
    on = [m["step_time_s"] for m in warm if "routing_fingerprint" in m]
    off = [m["step_time_s"] for m in warm if "routing_fingerprint" not in m]
    print("| steps | mean step time | ratio |\n|---|---|---|")
    print(f"| anticipatory routing off ({len(off)} steps) | {statistics.mean(off):.3f} s | 1.00 |")
    print(f"| anticipatory routing on ({len(on)} steps) | {statistics.mean(on):.3f} s | "
          f"{statistics.mean(on) / statistics.mean(off):.2f} |")


if __name__ == "__main__":
    main()
