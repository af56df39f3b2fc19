"""Checkpoint and recovery benchmark, on the simulated cluster, measured side by side in one run.

1. Save throughput: a synchronous step checkpoint of the job (DCP shards from every rank, manifest hashing,
   COMMIT) against a plain sequential write (+fsync) of the same number of bytes to the same disk.
2. Training stall: how long the training loop is blocked by an asynchronous save, against the same save
   done synchronously.
3. Recovery: time from a rank's SIGKILL (injected at the start of a step) to the first completed step
   after the restart from the last committed checkpoint.

Usage: python benchmarks/checkpoint_recovery.py [--data datasets/shakespeare] [--preset nano]
Prints a Markdown table (paste into BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from v4train.orchestrator.faults import parse_fault
from v4train.orchestrator.spec import ClusterSpec, JobSpec
from v4train.orchestrator.control.supervisor import Phase, Supervisor
from v4train.orchestrator.control.telemetry import Telemetry
from v4train.orchestrator.control.ray_group import RayRankGroup, start_ray


def _job(data: str, preset: str, steps: int, every: int, asynchronous: bool) -> JobSpec:
    return JobSpec.model_validate({
        "name": "bench", "model": {"preset": preset}, "data": {"path": data, "seq_len": 256},
        "train": {"steps": steps, "global_batch": 16, "micro_batch_size": 4, "lr": 3e-3, "eval_batches": 0,
                  "max_restarts": 1},
        "parallel": {"pp": 2, "dp": 2},
        "checkpoint": {"every_steps": every, "at_end": False, "async_save": asynchronous},
    })


def _run(job: JobSpec, run_dir: Path, faults=()) -> tuple[list[dict], list[dict]]:
    cluster = ClusterSpec(name="sim4", devices_per_node=4)
    telemetry = Telemetry(run_dir, job.train.steps, live=False, print_every=1000)
    sup = Supervisor(job, cluster, str(run_dir), lambda: RayRankGroup.create(4, 120.0), telemetry, faults=list(faults))
    phase = sup.run()
    telemetry.close()
    assert phase is Phase.FINISHED, sup.failure
    read = lambda name: [json.loads(x) for x in (run_dir / name).read_text().splitlines()]  # noqa: E731
    return read("metrics.jsonl"), read("events.jsonl")


def _sequential_write_mb_s(directory: Path, nbytes: int) -> float:
    chunk = os.urandom(1 << 20)
    path = directory / "plain.bin"
    start = time.perf_counter()
    with path.open("wb") as f:
        for _ in range(max(1, nbytes >> 20)):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return nbytes / 1e6 / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="datasets/shakespeare")
    parser.add_argument("--preset", default="nano")
    args = parser.parse_args()
    start_ray(8, 512)
    Path("runs").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir="runs") as tmp:  # the same disk as run directories
        tmp = Path(tmp)
        _, sync_events = _run(_job(args.data, args.preset, 4, 2, asynchronous=False), tmp / "sync")
        _, async_events = _run(_job(args.data, args.preset, 4, 2, asynchronous=True), tmp / "async")
        metrics, kill_events = _run(_job(args.data, args.preset, 6, 2, asynchronous=True), tmp / "kill",
                                    faults=[parse_fault("kill@4:rank=1")])
        committed = next(e for e in sync_events if e["event"] == "checkpoint_committed" and e["step"] == 2)
        nbytes = sum(p.stat().st_size for p in (tmp / "sync" / "step_00000002").rglob("*") if p.is_file())
        plain = _sequential_write_mb_s(tmp, nbytes)
        ckpt_mb_s = nbytes / 1e6 / committed["seconds"]
        blocked = next(e for e in async_events if e["event"] == "checkpoint_persisted" and e["step"] == 2)
        failure = next(e for e in kill_events if e["event"] == "failure")
        killed_at = max(m["time"] for m in metrics if m["restarts"] == 0)  # the kill comes right after this step
        first_after = min(m["time"] for m in metrics if m["restarts"] == 1)
    print("| measure | v4train | baseline | ratio |\n|---|---|---|---|")
    print(f"| save throughput, {nbytes / 1e6:.0f} MB step checkpoint (4 ranks, DCP + sha256 manifest + COMMIT) "
          f"vs plain sequential write + fsync | {ckpt_mb_s:.0f} MB/s | {plain:.0f} MB/s | {ckpt_mb_s / plain:.2f} |")
    print(f"| training blocked by a save: asynchronous vs synchronous | {blocked['training_blocked_s']:.3f} s | "
          f"{committed['seconds']:.3f} s | {blocked['training_blocked_s'] / committed['seconds']:.2f} |")
    print(f"| rank SIGKILL to failure detected (root cause named) | {failure['time'] - killed_at:.2f} s | | |")
    print(f"| rank SIGKILL to first step after recovery (detect, tear down, new actors, restore, 1 step) | "
          f"{first_after - killed_at:.1f} s | | |")


if __name__ == "__main__":
    main()
