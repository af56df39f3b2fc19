"""The ``v4train`` command line.

Commands: ``prepare-data`` (text to tokenizer to Parquet token shards), ``submit`` (validate a job and a
cluster, then train, or submit it as a Ray job when the cluster names an ``address``), ``status`` / ``logs``
/ ``stop`` (a submitted Ray job), ``plan`` (memory, bubble, communication and step time of a layout),
``report`` (a run's PNG and summary), ``resume`` (continue a run from a committed checkpoint),
``ckpt list|verify|inspect`` (recovery tooling over a checkpoint root), ``convert from-hf|to-hf``
(Hugging Face DeepSeek-V4 checkpoints in and out). Every command has
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

from v4train.orchestrator.spec import (SpecError, dump_job, job_warnings, load_cluster, load_job,
                                       validate_against_cluster)

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    from v4train.data.prepare import add_cli_arguments

    parser = argparse.ArgumentParser(prog="v4train",
                                     description="Train DeepSeek-V4-style models on a (simulated) cluster.")
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
    submit.add_argument("--inject-fault", dest="faults", action="append", default=[], metavar="KIND@STEP[:rank=R]",
                        help="inject a fault for a recovery drill (repeatable): kill, raise, stall, nan_grad, "
                             "kill_during_save, kill_during_upload")

    from v4train.orchestrator.tools import convert, jobs, plan_cli, report

    convert.add_cli_arguments(sub)  # convert from-hf / to-hf (Hugging Face checkpoints)
    jobs.add_cli_arguments(sub)   # status, logs, stop (Ray Jobs on a running cluster)
    plan_cli.add_cli_arguments(sub)
    report.add_cli_arguments(sub)

    resume = sub.add_parser("resume", help="continue a run from its last committed checkpoint")
    resume.add_argument("run_dir", help="the run directory of an earlier submit")
    resume.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a job field, e.g. --set train.steps=400 to train further")
    resume.add_argument("--step", type=int, help="resume from this committed step (default: the newest)")

    ckpt = sub.add_parser("ckpt", help="list, verify and inspect checkpoints")
    ckpt_sub = ckpt.add_subparsers(dest="ckpt_command", required=True)
    ls = ckpt_sub.add_parser("list", help="every checkpoint under ROOT: step, committed, layout, size")
    verify = ckpt_sub.add_parser("verify", help="re-hash a checkpoint against its manifest (exit 1 on any mismatch)")
    inspect = ckpt_sub.add_parser("inspect", help="train state and tensor list of a checkpoint")
    for p in (ls, verify, inspect):
        p.add_argument("root", help="checkpoint root: a directory or s3://bucket/prefix")
        p.add_argument("--endpoint-url", help="S3 endpoint (non-AWS services); credentials come from the environment")
    verify.add_argument("--step", type=int, help="the step to verify (default: the newest committed)")
    inspect.add_argument("--step", type=int, required=True, help="the step to inspect")
    return parser


def _fail(message: str, code: int = 2) -> int:
    print(f"v4train: error: {message}", file=sys.stderr)
    return code


def _submit(args) -> int:
    cluster = load_cluster(args.cluster)
    if cluster.address is not None:  # a running Ray cluster: submit the supervisor there as a Ray job
        from v4train.orchestrator.tools import jobs

        return jobs.submit_from_cli(args, cluster)
    job = load_job(args.job, args.overrides)
    validate_against_cluster(job, cluster)
    for warning in job_warnings(job):
        print(f"v4train: warning: {warning}", file=sys.stderr)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(args.run_dir or f"runs/{job.name}-{stamp}")
    if run_dir.exists() and any(run_dir.iterdir()):
        if not args.overwrite:
            raise SpecError(f"--run-dir: {run_dir} exists and is not empty "
                            f"(use `v4train resume {run_dir}` or --overwrite)")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    faults = _parse_faults(args.faults)
    (run_dir / "job.yaml").write_text(dump_job(job))
    shutil.copyfile(args.cluster, run_dir / "cluster.yaml")
    return _run(job, cluster, run_dir, resume_from=None, faults=faults)


def _parse_faults(texts: list[str]):
    from v4train.orchestrator.faults import parse_fault

    try:
        return [parse_fault(t) for t in texts]
    except ValueError as exc:
        raise SpecError(f"--inject-fault {exc}") from None


def _resume(args) -> int:
    from v4train.orchestrator import checkpoint
    from v4train.orchestrator.checkpoint.storage import Storage

    run_dir = Path(args.run_dir)
    if not (run_dir / "job.yaml").is_file():
        raise SpecError(f"{run_dir}: not a run directory (no job.yaml)")
    job = load_job(run_dir / "job.yaml", args.overrides)
    cluster = load_cluster(run_dir / "cluster.yaml")
    validate_against_cluster(job, cluster)
    c = job.checkpoint
    storage = Storage(c.root or str(run_dir), endpoint_url=c.endpoint_url, region=c.region)
    if args.step is not None:
        name = checkpoint.step_name(args.step)
        if not storage.exists(f"{name}/COMMIT"):
            raise SpecError(f"--step: {storage.url_of(name)} is not a committed checkpoint")
    else:
        name = checkpoint.latest_committed(storage)
        if name is None:
            raise SpecError(f"{storage.url}: no committed checkpoint to resume from")
    if args.overrides:
        (run_dir / "job.yaml").write_text(dump_job(job))
    return _run(job, cluster, run_dir, resume_from=name, faults=[])


def _ckpt(args) -> int:
    import json

    from v4train.orchestrator import checkpoint
    from v4train.orchestrator.checkpoint.storage import Storage

    storage = Storage(args.root, endpoint_url=args.endpoint_url)
    if args.ckpt_command == "list":
        rows = checkpoint.list_checkpoints(storage)
        print(f"{'step':>10}  {'committed':<9}  {'layout':<24}  {'MB':>9}  name")
        for r in rows:
            layout = " ".join(f"{k}{v}" for k, v in (r["layout"] or {}).items()) or "-"
            committed = "yes" if r["committed"] else "no"
            print(f"{r['step']:>10}  {committed:<9}  {layout:<24}  {r['bytes'] / 1e6:>9.1f}  {r['name']}")
        return 0
    name = checkpoint.step_name(args.step) if args.step is not None else checkpoint.latest_committed(storage)
    if name is None:
        return _fail(f"{storage.url}: no committed checkpoint", 1)
    try:
        if args.ckpt_command == "verify":
            state = checkpoint.verify(storage, name)
            print(f"{storage.url_of(name)}: OK (step {state['step']}, every file matches its manifest)")
        else:
            print(json.dumps(checkpoint.inspect(storage, name), indent=1))
    except (checkpoint.CheckpointError, FileNotFoundError) as exc:
        return _fail(str(exc), 1)
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _run(job, cluster, run_dir: Path, resume_from: str | None, faults: list) -> int:
    """Start Ray and the rank workers, run the supervisor, always tear down; returns the exit code."""
    import ray

    from v4train.orchestrator.control.supervisor import Phase, Supervisor
    from v4train.orchestrator.control.telemetry import Telemetry
    from v4train.orchestrator.control.ray_group import RayRankGroup, start_ray

    # SIGTERM (a scheduler stopping the driver) ends the run like Ctrl-C does.
    signal.signal(signal.SIGTERM, _interrupt)
    started = time.perf_counter()
    world = job.parallel.world_size
    telemetry = Telemetry(run_dir, job.train.steps)
    supervisor = None

    def make_workers() -> RayRankGroup:
        return RayRankGroup.create(world, cluster.heartbeat_timeout_s, log_dir=str(run_dir / "logs"),
                                  gpus_per_rank=1 if cluster.device == "gpu" else 0)

    try:
        start_ray(cluster.ray.num_cpus or max(world, 2), cluster.ray.object_store_memory_mb)
        supervisor = Supervisor(job, cluster, str(run_dir), make_workers, telemetry,
                                resume_from=resume_from, faults=faults)
        phase = supervisor.run()
    except KeyboardInterrupt:
        step = supervisor.step_count if supervisor else 0
        last = supervisor.last_committed if supervisor else None
        telemetry.event("stopped", step, reason="interrupted", last_committed=last)
        print(f"v4train: interrupted at step {step}; last committed checkpoint: {last}; "
              f"continue with: v4train resume {run_dir}", file=sys.stderr)
        return 130
    finally:
        telemetry.close()
        if ray.is_initialized():
            ray.shutdown()
    wall = time.perf_counter() - started
    if phase is Phase.FAILED:
        return _fail(f"run failed: {supervisor.failure} (run dir {run_dir})", 1)
    print(f"v4train: finished {job.name} at step {supervisor.step_count} in {wall:.0f} s; "
          f"val_loss {supervisor.val_loss}; restarts {supervisor.restarts}; run dir {run_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``v4train`` console script; returns the process exit code."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "prepare-data":
            from v4train.data.prepare import run_cli

            return run_cli(args)
        if args.command == "submit":
            return _submit(args)
        if args.command == "resume":
            return _resume(args)
        if args.command == "ckpt":
            return _ckpt(args)
        if args.command == "convert":
            from v4train.orchestrator.tools import convert

            return convert.run_cli(args)
        if args.command in ("status", "logs", "stop"):
            from v4train.orchestrator.tools import jobs

            return jobs.run_cli(args)
        if args.command == "plan":
            from v4train.orchestrator.tools import plan_cli

            return plan_cli.run_cli(args)
        if args.command == "report":
            from v4train.orchestrator.tools import report

            return report.run_cli(args)
    except SpecError as exc:
        return _fail(str(exc))
    return _fail(f"unknown command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
