"""The ``v4train`` command line.

Commands: ``prepare-data`` (text to tokenizer to Parquet token shards), ``submit`` (validate a job and a
cluster, then train), ``resume`` (continue a run from its last committed checkpoint). Every command has
``--help``; errors exit non-zero with one line on stderr: 2 for bad input (before any actor starts),
1 for a failed run, 130 for an interrupted one.
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import signal
import sys
import time
from pathlib import Path

from orchestrator.spec import SpecError, dump_job, load_cluster, load_job, validate_against_cluster

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    from data.prepare import add_cli_arguments

    parser = argparse.ArgumentParser(prog="v4train", description="Train DeepSeek-V4-style models on a (simulated) cluster.")
    sub = parser.add_subparsers(dest="command", required=True)

    prep = sub.add_parser("prepare-data", help="tokenize a corpus into Parquet token shards")
    add_cli_arguments(prep)

    submit = sub.add_parser("submit", help="validate a job and a cluster, then train")
    submit.add_argument("job", help="job YAML (sections model, data, train, parallel, checkpoint)")
    submit.add_argument("--cluster", required=True, help="cluster YAML (e.g. clusters/local-sim.yaml)")
    submit.add_argument("--run-dir", help="run directory (default runs/<job name>-<timestamp>)")
    submit.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a job field by dotted key, e.g. --set train.steps=20 (repeatable)")
    submit.add_argument("--overwrite", action="store_true", help="delete an existing run directory first")

    resume = sub.add_parser("resume", help="continue a run from its last committed checkpoint")
    resume.add_argument("run_dir", help="the run directory of an earlier submit")
    resume.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a job field, e.g. --set train.steps=400 to train further")
    return parser


def _fail(message: str, code: int = 2) -> int:
    print(f"v4train: error: {message}", file=sys.stderr)
    return code


def _submit(args) -> int:
    job = load_job(args.job, args.overrides)
    cluster = load_cluster(args.cluster)
    validate_against_cluster(job, cluster)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(args.run_dir or f"runs/{job.name}-{stamp}")
    if run_dir.exists() and any(run_dir.iterdir()):
        if not args.overwrite:
            raise SpecError(f"--run-dir: {run_dir} exists and is not empty (use `v4train resume {run_dir}` or --overwrite)")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "job.yaml").write_text(dump_job(job))
    shutil.copyfile(args.cluster, run_dir / "cluster.yaml")
    return _run(job, cluster, run_dir, resume_from=None)


def _resume(args) -> int:
    from orchestrator import checkpoint

    run_dir = Path(args.run_dir)
    if not (run_dir / "job.yaml").is_file():
        raise SpecError(f"{run_dir}: not a run directory (no job.yaml)")
    job = load_job(run_dir / "job.yaml", args.overrides)
    cluster = load_cluster(run_dir / "cluster.yaml")
    validate_against_cluster(job, cluster)
    root = Path(job.checkpoint.root) if job.checkpoint.root else run_dir
    latest = checkpoint.latest_committed(root)
    if latest is None:
        raise SpecError(f"{root}: no committed checkpoint to resume from")
    if args.overrides:
        (run_dir / "job.yaml").write_text(dump_job(job))
    return _run(job, cluster, run_dir, resume_from=latest)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _run(job, cluster, run_dir: Path, resume_from) -> int:
    """Start Ray and the rank workers, run the supervisor, always tear down; returns the exit code."""
    import ray

    from orchestrator.supervisor import Phase, Supervisor
    from orchestrator.telemetry import Telemetry
    from orchestrator.worker import WorkerGroup, start_ray

    # SIGTERM (a scheduler stopping the driver) ends the run like Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.perf_counter()
    world = job.parallel.world_size
    telemetry = Telemetry(run_dir, job.train.steps)
    workers = supervisor = None
    try:
        start_ray(cluster.ray.num_cpus or max(world, 2), cluster.ray.object_store_memory_mb)
        workers = WorkerGroup.create(world, cluster.collective_timeout_s, log_dir=str(run_dir / "logs"))
        supervisor = Supervisor(job, cluster, run_dir, workers, telemetry, resume_from=resume_from)
        phase = supervisor.run()
    except KeyboardInterrupt:
        step = supervisor.step_count if supervisor else 0
        last = supervisor.last_committed if supervisor else None
        telemetry.event("stopped", step, reason="interrupted", last_committed=last)
        print(f"v4train: interrupted at step {step}; last committed checkpoint: {last}; "
              f"continue with: v4train resume {run_dir}", file=sys.stderr)
        return 130
    finally:
        if workers is not None:
            workers.shutdown()
        telemetry.close()
        if ray.is_initialized():
            ray.shutdown()
    wall = time.perf_counter() - started
    if phase is Phase.FAILED:
        return _fail(f"run failed: {supervisor.failure} (run dir {run_dir})", 1)
    print(f"v4train: finished {job.name} at step {supervisor.step_count} in {wall:.0f} s; "
          f"val_loss {supervisor.val_loss}; run dir {run_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``v4train`` console script; returns the process exit code."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "prepare-data":
            from data.prepare import run_cli

            return run_cli(args)
        if args.command == "submit":
            return _submit(args)
        if args.command == "resume":
            return _resume(args)
    except SpecError as exc:
        return _fail(str(exc))
    return _fail(f"unknown command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
