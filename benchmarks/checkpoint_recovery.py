"""Checkpoint and recovery benchmark, on the simulated cluster, every figure measured side by side in one run.

1. Save throughput: a synchronous step checkpoint of the job (DCP shards from every rank, hashed by the
   ranks as they write, manifest, COMMIT) against a plain sequential write (+fsync) of the same number of
   bytes to the same disk.
2. Training stall (case C16): with a checkpoint every ``--every`` steps, the time each asynchronous save's
   request blocked training, and the extra wall time of the steps it touched after that (its background write
   and its commit), against the mean interval of the steps no save touched (:func:`_save_stall`); against the
   synchronous save's blocking time, per save and as a share of a step.
3. Recovery: a rank SIGKILLed at the start of a step, to the next completed step, split into detection,
   teardown, rank start, restore and first step, three ways: a full restart (every rank process replaced:
   the group has no spare, so it is released and a new one started); in place as first built (healthy
   ranks kept and the dead one replaced by a spare started ahead of time, but the survivors left to reach
   a collective with the dead rank on their own, and every rank reading the checkpoint from storage:
   :class:`_FirstInPlace`); and in place now (survivors told to abandon their step at once, and restoring
   the commit from their in-memory copy of what they wrote; only the spare reads storage).

Usage: python benchmarks/checkpoint_recovery.py [--data datasets/shakespeare] [--preset nano] [--only recovery|saves]
[--steps N] [--sync-steps N] [--every K]
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


def _save_stall(metrics: list[dict], events: list[dict]) -> dict:
    """What each asynchronous save cost the training steps, against the steps no save touched.

    A save requested after step ``s`` and found persisted after step ``a`` touches the step intervals
    ``s+1 .. a+1``: ``s+1`` holds the request (training blocked) and the background work, ``a+1`` the commit
    between steps ``a`` and ``a+1``. Its cost is the sum of those intervals minus as many times the mean interval
    of the untouched steps (mean against mean: step times are skewed by the machine's stalls, so a median
    baseline would charge a save for the skew). The group's first save (DCP's full plan, ``save_plan.py``) is
    reported on its own; the others as mean with its standard error and median, so that a run shows whether
    its saves' cost stands out from the step-to-step noise.
    """
    times = {m["step"]: m["time"] for m in metrics if m["restarts"] == 0}
    interval = {s: times[s] - times[s - 1] for s in times if s - 1 in times}
    saves = [e for e in events if e["event"] == "checkpoint_persisted" and e["step"] + 1 in interval]
    touched = {e["step"]: range(e["step"] + 1, e["after_step"] + 2) for e in saves}
    clean = [v for s, v in interval.items() if not any(s in r for r in touched.values())]
    base = statistics.fmean(clean)
    cost = {e["step"]: sum(interval[s] - base for s in touched[e["step"]] if s in interval) for e in saves}
    blocked = {e["step"]: e["training_blocked_s"] for e in saves}
    first, *rest = sorted(cost)
    extra = [cost[s] - blocked[s] for s in rest]  # background work and commit, the request's blocking excluded
    return {"step": base, "step_sd": statistics.stdev(clean), "clean": len(clean), "saves": len(rest),
            "first": cost[first], "blocked": statistics.fmean(blocked[s] for s in rest),
            "extra": statistics.fmean(extra), "extra_se": statistics.stdev(extra) / len(extra) ** 0.5,
            "extra_median": statistics.median(extra), "cost": statistics.fmean(cost[s] for s in rest)}


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
    parser.add_argument("--steps", type=int, default=24, help="steps of the asynchronous (stall) run")
    parser.add_argument("--sync-steps", type=int, default=24, help="steps of the synchronous (throughput) run")
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
        sync_metrics, sync_events = _run(_job(args.data, args.preset, args.sync_steps, args.every, False),
                                        tmp / "sync")
        async_metrics, async_events = _run(_job(args.data, args.preset, args.steps, args.every, True), tmp / "async")
        committed = [e for e in sync_events if e["event"] == "checkpoint_committed"]
        step_dir = tmp / "sync" / f"step_{committed[-1]['step']:08d}"
        nbytes = sum(p.stat().st_size for p in step_dir.rglob("*") if p.is_file())
        # the disk's speed moves from one write to the next: as many plain writes as saves, medians compared
        plains = max(3, len(committed))
        plain = nbytes / 1e6 / statistics.median(plain_write_s(tmp / "plain.bin", nbytes) for _ in range(plains))
    sync_s = statistics.median(e["seconds"] for e in committed)
    ckpt_mb_s = nbytes / 1e6 / sync_s
    stall = _save_stall(async_metrics, async_events)
    step = stall["step"]
    print("| measure | v4train | baseline | ratio |\n|---|---|---|---|")
    print(f"| save throughput, {nbytes / 1e6:.0f} MB step checkpoint (4 ranks, DCP hashed while written + manifest "
          f"+ COMMIT; median of {len(committed)}) vs plain sequential write + fsync (median of {plains}) | "
          f"{ckpt_mb_s:.0f} MB/s | "
          f"{plain:.0f} MB/s | {ckpt_mb_s / plain:.2f} |")
    print(f"| training blocked by the save request: asynchronous (mean of {stall['saves']}) vs synchronous save | "
          f"{stall['blocked']:.3f} s | {sync_s:.3f} s | {stall['blocked'] / sync_s:.2f} |")
    print(f"| extra time of the following steps (background write, commit) per asynchronous save, mean +- standard "
          f"error of {stall['saves']} saves, vs mean step ({stall['clean']} steps no save touched, sd "
          f"{stall['step_sd']:.3f} s) | {stall['extra']:.3f} +- {stall['extra_se']:.3f} s | {step:.3f} s | "
          f"{stall['extra'] / step:.3f} |")
    print(f"| the same, median of the saves | {stall['extra_median']:.3f} s | {step:.3f} s | "
          f"{stall['extra_median'] / step:.3f} |")
    print(f"| asynchronous save's whole cost to training (blocked + following steps) vs synchronous save, per save "
          f"| {stall['cost']:.3f} s | {sync_s:.3f} s | {stall['cost'] / sync_s:.2f} |")
    print(f"| the save group's first asynchronous save (DCP's full plan, on the writer thread), whole cost | "
          f"{stall['first']:.3f} s | {step:.3f} s | {stall['first'] / step:.3f} |")
    sync_median = statistics.median(m["step_time_s"] for m in sync_metrics)
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
