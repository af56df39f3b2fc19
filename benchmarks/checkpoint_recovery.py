"""Checkpoint and recovery benchmark, on the simulated cluster, every figure measured side by side in one run.

1. Save throughput: a synchronous step checkpoint of the job (DCP shards from every rank, hashed by the
   ranks as they write, manifest, COMMIT) against a plain sequential write (+fsync) of the same number of
   bytes to the same disk.
2. Training stall (case C16): with a checkpoint every ``--every`` steps, the extra wall time of the steps
   trained while each asynchronous save was in the background (each step's wall interval minus the median
   interval of steps without a save in flight), plus the time training was blocked by the request; against
   the synchronous save's blocking time, per save and as a share of the median step.
3. Recovery: a rank SIGKILLed at the start of a step, to the next completed step, split into detection,
   teardown, rank start, restore and first step, three ways: a full restart (every rank process replaced:
   the group has no spare, so it is released and a new one started); in place as first built (healthy
   ranks kept and the dead one replaced by a spare started ahead of time, but the survivors left to reach
   a collective with the dead rank on their own, and every rank reading the checkpoint from storage:
   :class:`_FirstInPlace`); and in place now (survivors told to abandon their step at once, and restoring
   the commit from their in-memory copy of what they wrote; only the spare reads storage).

Usage: python benchmarks/checkpoint_recovery.py [--data datasets/shakespeare] [--preset nano] [--only recovery|saves]
(``--only saves``: sections 1 and 2; ``benchmarks/checkpoint_save.py`` measures the save path alone.)
Prints Markdown tables (paste into BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from checkpoint_save import plain_write_s  # this script's folder is on sys.path when run

from v4train.orchestrator.control.ray_group import RayRankGroup, start_ray
from v4train.orchestrator.control.supervisor import Phase, Supervisor
from v4train.orchestrator.control.telemetry import Telemetry
from v4train.orchestrator.faults import parse_fault
from v4train.orchestrator.spec import ClusterSpec, JobSpec


def _job(data: str, preset: str, steps: int, every: int, asynchronous: bool) -> JobSpec:
    return JobSpec.model_validate({
        "name": "bench", "model": {"preset": preset}, "data": {"path": data, "seq_len": 256},
        "train": {"steps": steps, "global_batch": 16, "micro_batch_size": 4, "lr": 3e-3, "eval_batches": 0,
                  "max_restarts": 1},
        "parallel": {"pp": 2, "dp": 2},
        "checkpoint": {"every_steps": every, "at_end": False, "async_save": asynchronous, "keep": 2},
    })


class _FirstInPlace(RayRankGroup):
    """In-place recovery as first built, for comparison: survivors are not told to abandon their step (each
    fails at its next collective with the dead rank), and every rank restores from storage (the checkpoint's
    train_state is passed on without the attempt that would match a rank's in-memory copy)."""

    def _abort_calls(self, ranks: list[int]) -> None:
        pass

    def load(self, root: str, name: str, train_state: dict, timeout_s: float) -> list[int]:
        return super().load(root, name, {k: v for k, v in train_state.items() if k != "attempt"}, timeout_s)


def _run(job: JobSpec, run_dir: Path, faults=(), spares: int = 1,
         group: type[RayRankGroup] = RayRankGroup) -> tuple[list[dict], list[dict]]:
    cluster = ClusterSpec(name="sim4", devices_per_node=4)
    telemetry = Telemetry(run_dir, job.train.steps, live=False, print_every=1000)
    sup = Supervisor(job, cluster, str(run_dir), lambda: group.create(4, 120.0, spares=spares), telemetry,
                     faults=list(faults))
    phase = sup.run()
    telemetry.close()
    assert phase is Phase.FINISHED, sup.failure
    read = lambda name: [json.loads(x) for x in (run_dir / name).read_text().splitlines()]  # noqa: E731
    return read("metrics.jsonl"), read("events.jsonl")


def _save_stall(metrics: list[dict], events: list[dict]) -> tuple[float, float, int]:
    """(median step wall interval, mean extra seconds per save, saves): the extra wall time of the steps
    trained while each save was in flight (requested after step s, persisted after step a: steps s+1..a,
    and the request itself, which falls in step s+1's interval), over the median interval of the others."""
    times = {m["step"]: m["time"] for m in metrics if m["restarts"] == 0}
    interval = {s: times[s] - times[s - 1] for s in times if s - 1 in times}
    persisted = {e["step"]: e["after_step"] for e in events if e["event"] == "checkpoint_persisted"}
    overlapped = {s for step, after in persisted.items() for s in range(step + 1, max(after, step + 1) + 1)}
    median = statistics.median(v for s, v in interval.items() if s not in overlapped)
    extra = [sum(interval[s] - median for s in range(step + 1, max(after, step + 1) + 1) if s in interval)
             for step, after in persisted.items() if step + 1 in interval]
    return median, statistics.fmean(extra), len(extra)


def _recovery(metrics: list[dict], events: list[dict]) -> dict:
    """Seconds from the SIGKILL (at the start of the step after the last one completed) to the next
    completed step, and its parts."""
    killed_at = max(m["time"] for m in metrics if m["restarts"] == 0)
    failure = next(e for e in events if e["event"] == "failure")
    restart = next(e for e in events if e["event"] == "restart")
    start = [e for e in events if e["event"] == "start"][1]
    first_after = min(m["time"] for m in metrics if m["restarts"] == 1)
    return {"detection": failure["time"] - killed_at, "teardown": restart["teardown_s"],
            "rank start": start["setup_s"], "restore": start.get("restore_s", 0.0),
            "first step": first_after - start["time"], "total": first_after - killed_at,
            "kept": restart["ranks_kept"], "median step": statistics.median(m["step_time_s"] for m in metrics)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="datasets/shakespeare")
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--steps", type=int, default=24, help="steps of the stall runs")
    parser.add_argument("--every", type=int, default=6, help="checkpoint interval of the stall runs")
    parser.add_argument("--only", choices=["recovery", "saves"], help="run only this section (saves: 1 and 2)")
    args = parser.parse_args()
    start_ray(8, 512)
    Path("runs").mkdir(exist_ok=True)
    if args.only == "recovery":
        _print_recovery(_recoveries(args))
        return
    with tempfile.TemporaryDirectory(dir="runs") as tmp:  # the same disk as run directories
        tmp = Path(tmp)
        sync_metrics, sync_events = _run(_job(args.data, args.preset, args.steps, args.every, False), tmp / "sync")
        async_metrics, async_events = _run(_job(args.data, args.preset, args.steps, args.every, True), tmp / "async")
        committed = [e for e in sync_events if e["event"] == "checkpoint_committed"]
        step_dir = tmp / "sync" / f"step_{committed[-1]['step']:08d}"
        nbytes = sum(p.stat().st_size for p in step_dir.rglob("*") if p.is_file())
        plain = nbytes / 1e6 / plain_write_s(tmp / "plain.bin", nbytes)
    sync_s = statistics.median(e["seconds"] for e in committed)
    ckpt_mb_s = nbytes / 1e6 / sync_s
    blocked = statistics.fmean(e["training_blocked_s"] for e in async_events if e["event"] == "checkpoint_persisted")
    median_step, extra, saves = _save_stall(async_metrics, async_events)
    sync_median = statistics.median(m["step_time_s"] for m in sync_metrics)
    async_cost = blocked + extra
    print("| measure | v4train | baseline | ratio |\n|---|---|---|---|")
    print(f"| save throughput, {nbytes / 1e6:.0f} MB step checkpoint (4 ranks, DCP hashed while written + manifest "
          f"+ COMMIT; median of {len(committed)}) vs plain sequential write + fsync | {ckpt_mb_s:.0f} MB/s | "
          f"{plain:.0f} MB/s | {ckpt_mb_s / plain:.2f} |")
    print(f"| training blocked by the save request: asynchronous vs synchronous save | {blocked:.3f} s | "
          f"{sync_s:.3f} s | {blocked / sync_s:.2f} |")
    print(f"| extra wall time of the steps trained while an asynchronous save persists, per save ({saves} saves) "
          f"vs median step ({median_step:.2f} s) | {extra:.3f} s | {median_step:.3f} s | {extra / median_step:.3f} |")
    print(f"| asynchronous save's whole cost (blocked + extra) vs synchronous save, per save | {async_cost:.3f} s | "
          f"{sync_s:.3f} s | {async_cost / sync_s:.2f} |")
    print(f"\nmedian step time (rank-measured): synchronous run {sync_median:.3f} s\n")
    if args.only != "saves":
        _print_recovery(_recoveries(args))


def _recoveries(args) -> list:
    """The load average at the start, then the three recoveries from the same SIGKILL, one after the other
    (full restart first), as (name, figures)."""
    kill = [parse_fault("kill@5:rank=1")]
    runs = (("full restart: every rank process replaced", 0, RayRankGroup),
            ("in place as first built: survivors not aborted, every rank reads storage", 1, _FirstInPlace),
            ("in place now: survivors aborted, restored from their in-memory copies", 1, RayRankGroup))
    out = [("load average (1 min) at the start", os.getloadavg()[0])]
    with tempfile.TemporaryDirectory(dir="runs") as tmp:
        for i, (name, spares, group) in enumerate(runs):
            job = _job(args.data, args.preset, 6, 2, True)
            out.append((name, _recovery(*_run(job, Path(tmp) / f"r{i}", kill, spares=spares, group=group))))
    return out


def _print_recovery(recoveries: list) -> None:
    (label, load), *recoveries = recoveries
    print(f"{label}: {load:.1f}, at the end: {os.getloadavg()[0]:.1f}")
    print("| SIGKILL of rank 1 to the next completed step (s) | detection | teardown | rank start | restore | "
          "first step | total | median step |\n|---|---|---|---|---|---|---|---|")
    for name, r in recoveries:
        print(f"| {name} (ranks kept: {r['kept']}) | " + " | ".join(
            f"{r[k]:.2f}" for k in ("detection", "teardown", "rank start", "restore", "first step", "total",
                                    "median step")) + " |")


if __name__ == "__main__":
    main()
