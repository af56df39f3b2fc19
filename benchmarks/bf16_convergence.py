"""bf16 mixed precision against fp32 on the demo's budget: the final validation loss of each.

    python benchmarks/bf16_convergence.py                      # the demo as configured (300 steps each)
    python benchmarks/bf16_convergence.py --steps 60 --json out.json
    python benchmarks/bf16_convergence.py --precisions bf16 --keep runs/bf16   # one arm, its run kept

Both runs are ``v4train submit configs/demo.yaml --cluster clusters/local-sim.yaml`` through the whole stack
(Ray rank workers, PP 2 x DP 2, the demo's model, data, seed, curriculum and optimizer), one with
``train.precision: fp32`` and one with ``bf16`` (``parallel/mixed_precision.py``: bf16 compute copies, fp32
masters and gradients), one after the other in fresh processes, without periodic checkpoints. Reported: the
final validation loss (nats, the run's closing evaluation over ``train.eval_batches`` fixed batches), the
difference (goal: within 0.05 nats), the last training loss and the median step time. ``--steps`` overrides
``train.steps`` (the learning-rate schedule is that of a run of that length). The dataset must exist
(``v4train prepare-data --source shakespeare --out datasets/shakespeare``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(precision: str, steps: int | None, run_dir: Path, timeout: float) -> dict:
    """One demo run at ``precision``; its final validation loss, last training loss and median step time."""
    cmd = [sys.executable, "-m", "v4train.orchestrator.tools.cli", "submit", "configs/demo.yaml", "--cluster",
           "clusters/local-sim.yaml", "--run-dir", str(run_dir), "--overwrite",
           "--set", f"train.precision={precision}", "--set", "checkpoint.every_steps=0",
           "--set", "checkpoint.at_end=false"]
    if steps is not None:
        cmd += ["--set", f"train.steps={steps}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{precision} run failed ({proc.returncode}): {proc.stderr[-2000:]}")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    finish = next(e for e in reversed(events) if e["event"] == "finish")
    return {"precision": precision, "steps": metrics[-1]["step"], "val_loss": finish["val_loss"],
            "last_loss": metrics[-1]["loss"], "step_time_s": statistics.median(m["step_time_s"] for m in metrics[1:])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, help="override train.steps (default: the demo's)")
    parser.add_argument("--timeout", type=float, default=7200.0, help="seconds per run")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--precisions", default="fp32,bf16",
                        help="comma-separated arms to run (default both; one arm's row can be set beside an "
                             "earlier run of the same job, e.g. the fp32 arm of sparse_vs_dense_demo.py)")
    parser.add_argument("--keep", help="keep the runs' directories under this folder (default: a temporary one)")
    args = parser.parse_args()
    precisions = args.precisions.split(",")
    print(f"load before: {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="v4train-bf16-") as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        rows = []
        for precision in precisions:
            rows.append(run(precision, args.steps, root / precision, args.timeout))
            print(rows[-1], flush=True)
    print(f"load after: {os.getloadavg()}")
    print("\n| precision | steps | final val loss | last train loss | step time |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['precision']} | {r['steps']} | {r['val_loss']:.4f} | {r['last_loss']:.4f} "
              f"| {r['step_time_s']:.2f} s |")
    arms = {r["precision"]: r for r in rows}
    if {"fp32", "bf16"} <= arms.keys():
        fp32, bf16 = arms["fp32"], arms["bf16"]
        print(f"\nbf16 - fp32 final validation loss: {bf16['val_loss'] - fp32['val_loss']:+.4f} nats "
              "(goal: within 0.05)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
