"""The ``v4train`` command line.

Commands: ``prepare-data`` (text to tokenizer to Parquet token shards), ``submit`` (validate a job and a
cluster, then train, or submit it as a Ray job when the cluster names an ``address``), ``status`` / ``logs``
/ ``stop`` (a submitted Ray job), ``plan`` (memory, bubble, communication and step time of a layout),
``report`` (a run's PNG and summary), ``resume`` (continue a run from a committed checkpoint),
``ckpt list|verify|inspect`` (recovery tooling over a checkpoint root), ``convert from-hf|to-hf``
(Hugging Face DeepSeek-V4 checkpoints in and out), ``sim-cluster up|down|exec`` (a multi-host Ray cluster in
network namespaces on this machine). Every command has
``--help``; errors exit non-zero with one line on stderr: 2 for bad input (before any actor starts),
1 for a failed run, 130 for an interrupted one.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path


def _interrupted_while_importing(signum, frame) -> None:
    """Ctrl-C or SIGTERM before ``main()`` runs: nothing has started yet, so leave at once."""
    print("v4train: interrupted", file=sys.stderr)
    os._exit(130)


# Ctrl-C stops the v4train program from its first import on (the imports below load torch: seconds of CPU),
# whatever the process inherited: a shell that starts a command in the background without job control
# (`make test &`) starts it with SIGINT ignored, and Python then leaves it ignored. main() then hands Ctrl-C to
# KeyboardInterrupt. Only when this module is the program (the console script or `python -m`), not a library.
if (__name__ == "__main__" or os.path.basename(sys.argv[0]) == "v4train") \
        and threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGINT, _interrupted_while_importing)
    signal.signal(signal.SIGTERM, _interrupted_while_importing)

import psutil  # noqa: E402

from v4train.orchestrator.spec import (SpecError, dump_job, job_warnings, load_cluster, load_job,  # noqa: E402
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
                             "kill_during_save, kill_during_upload; node_kill@STEP:node=N, partition@STEP:node=N")

    from v4train.orchestrator.tools import convert, jobs, plan_cli, report, sim_cluster

    convert.add_cli_arguments(sub)  # convert from-hf / to-hf (Hugging Face checkpoints)
    jobs.add_cli_arguments(sub)   # status, logs, stop (Ray Jobs on a running cluster)
    plan_cli.add_cli_arguments(sub)
    report.add_cli_arguments(sub)
    sim_cluster.add_cli_arguments(sub)  # sim-cluster up / down / exec (network namespaces, root)

    resume = sub.add_parser("resume", help="continue a run from its last committed checkpoint")
    resume.add_argument("target", metavar="RUN_DIR|JOB.yaml",
                        help="the run directory of an earlier submit; with --from, the job file")
    resume.add_argument("--from", dest="from_root", metavar="ROOT",
                        help="resume from this checkpoint root (a directory or s3://bucket/prefix) and the job file "
                             "alone, into a new run directory (needs --cluster)")
    resume.add_argument("--cluster", help="cluster YAML (default: the run directory's cluster.yaml)")
    resume.add_argument("--run-dir", help="with --from: the new run directory (default runs/<job name>-<timestamp>)")
    resume.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a job field, e.g. --set train.steps=400 to train further")
    resume.add_argument("--step", type=int, help="resume from this committed step (default: the newest); newer "
                                                 "committed checkpoints are set aside as <name>.superseded-<id>")

    ckpt = sub.add_parser("ckpt", help="list, verify and inspect checkpoints")
    ckpt_sub = ckpt.add_subparsers(dest="ckpt_command", required=True)
    ls = ckpt_sub.add_parser("list", help="every checkpoint under ROOT: step, committed, layout, size")
    verify = ckpt_sub.add_parser("verify", help="re-hash committed checkpoints against their manifests (exit 1 on "
                                                "any mismatch)")
    inspect = ckpt_sub.add_parser("inspect", help="train state and tensor list of a checkpoint")
    for p in (ls, verify, inspect):
        p.add_argument("root", help="checkpoint root: a directory or s3://bucket/prefix")
        p.add_argument("--endpoint-url", help="S3 endpoint (non-AWS services); credentials come from the environment")
    verify.add_argument("--step", type=int, help="the step to verify (default: every committed step)")
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
    for warning in job_warnings(job, cluster):
        print(f"v4train: warning: {warning}", file=sys.stderr)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(args.run_dir or f"runs/{job.name}-{stamp}")
    if run_dir.exists() and any(run_dir.iterdir()):
        if not args.overwrite:
            raise SpecError(f"--run-dir: {run_dir} exists and is not empty "
                            f"(use `v4train resume {run_dir}` or --overwrite)")
        shutil.rmtree(run_dir)
    faults = _parse_faults(args.faults)
    for fault in faults:
        if fault.node is not None and fault.node >= cluster.nodes:
            raise SpecError(f"--inject-fault {fault}: cluster {cluster.name} has nodes 0-{cluster.nodes - 1}")
    checked = _preflight(job, run_dir, resume_from=None)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "job.yaml").write_text(dump_job(job))
    shutil.copyfile(args.cluster, run_dir / "cluster.yaml")
    # where the driver's start went: from its process's start to main() (imports), and main() to here
    # (spec validation and the preflight)
    entered, entered_cpu = args.entered
    checked.update(imports_s=round(entered - psutil.Process().create_time(), 3), imports_cpu_s=round(entered_cpu, 3),
                   spec_and_preflight_s=round(time.time() - entered, 3))
    return _run(job, cluster, run_dir, resume_from=None, faults=faults, notes=[("preflight", 0, checked)])


def _preflight(job, run_dir: Path, resume_from: str | None) -> dict:
    """Every check before any rank starts (``orchestrator/control/preflight.py``); SpecError (exit 2) on the first
    that fails, with nothing written under the checkpoint root."""
    from v4train.orchestrator.control.preflight import preflight

    return preflight(job, job.checkpoint.root or str(run_dir), resume_from)


def _parse_faults(texts: list[str]):
    from v4train.orchestrator.faults import parse_fault

    try:
        return [parse_fault(t) for t in texts]
    except ValueError as exc:
        raise SpecError(f"--inject-fault {exc}") from None


def _resume(args) -> int:
    from v4train.orchestrator import checkpoint
    from v4train.orchestrator.checkpoint.storage import STORAGE_ERRORS

    if args.from_root is not None:
        job, cluster, run_dir = _fresh_run_dir(args)
    else:
        run_dir = Path(args.target)
        if not (run_dir / "job.yaml").is_file():
            raise SpecError(f"{run_dir}: not a run directory (no job.yaml); to resume from a checkpoint root "
                            "alone: v4train resume --from ROOT JOB.yaml --cluster CLUSTER.yaml")
        job = load_job(run_dir / "job.yaml", args.overrides)
        cluster = load_cluster(args.cluster or run_dir / "cluster.yaml")
    validate_against_cluster(job, cluster)
    c = job.checkpoint
    root = c.root or str(run_dir)
    storage = _checkpoint_storage(root, c.endpoint_url, c.region)
    try:
        if args.step is not None:
            name = checkpoint.step_name(args.step)
            if not storage.exists(f"{name}/COMMIT"):
                raise SpecError(f"--step: {storage.url_of(name)} is not a committed checkpoint")
        else:
            name = checkpoint.latest_committed(storage)
            if name is None:
                raise SpecError(f"{storage.url}: no committed checkpoint to resume from")
    except STORAGE_ERRORS as exc:  # refused credentials, a missing bucket, an unreachable endpoint
        field = "--from" if args.from_root is not None else "checkpoint.root"
        raise SpecError(f"{field}: cannot read {storage.url} ({_first_line(exc)})") from None
    notes = [("preflight", 0, _preflight(job, run_dir, resume_from=name))]
    if args.from_root is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(args.cluster, run_dir / "cluster.yaml")
    if args.overrides or args.from_root is not None:
        (run_dir / "job.yaml").write_text(dump_job(job))
    return _run(job, cluster, run_dir, resume_from=name, faults=[], notes=notes)


def _fresh_run_dir(args):
    """``resume --from ROOT JOB.yaml``: the job file with its checkpoint root set to ROOT, the cluster from
    ``--cluster``, and a new run directory (a checkpoint root holds everything a resume needs)."""
    if args.cluster is None:
        raise SpecError("--from: give the cluster too (--cluster CLUSTER.yaml)")
    job = load_job(args.target, [*args.overrides, f"checkpoint.root={args.from_root}"])
    cluster = load_cluster(args.cluster)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(args.run_dir or f"runs/{job.name}-{stamp}")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise SpecError(f"--run-dir: {run_dir} exists and is not empty")
    return job, cluster, run_dir


def _checkpoint_storage(root: str, endpoint_url: str | None = None, region: str | None = None):
    """The checkpoint root's Storage, or SpecError with one line when it cannot be reached or, local, does not
    exist (Storage creates a missing local root, as a run's first save needs; a mistyped one must not be)."""
    from v4train.orchestrator.checkpoint.storage import Storage

    if "://" not in root and not Path(root).is_dir():
        raise SpecError(f"{root}: no such checkpoint directory")
    try:
        return Storage(root, endpoint_url=endpoint_url, region=region)
    except Exception as exc:
        raise SpecError(f"{root}: cannot open the checkpoint root ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    """One line for an error: its message's first line, prefixed by its type unless it is one of ours."""
    from v4train.orchestrator.checkpoint import CheckpointError

    lines = str(exc).strip().splitlines()
    line = lines[0] if lines else ""
    return line if isinstance(exc, (CheckpointError, SpecError)) else f"{type(exc).__name__}: {line}".rstrip(": ")


def _ckpt(args) -> int:
    import json

    from v4train.orchestrator import checkpoint
    from v4train.orchestrator.checkpoint.storage import STORAGE_ERRORS

    storage = _checkpoint_storage(args.root, args.endpoint_url)
    try:
        if args.ckpt_command == "list":
            rows = checkpoint.list_checkpoints(storage)
            layouts = [_layout_text(r["layout"]) for r in rows]
            width = max([len("layout"), *map(len, layouts)])
            print(f"{'step':>10}  {'committed':<9}  {'layout':<{width}}  {'MB':>9}  name")
            for r, layout in zip(rows, layouts):
                committed = "yes" if r["committed"] else "no"
                print(f"{r['step']:>10}  {committed:<9}  {layout:<{width}}  {r['bytes'] / 1e6:>9.1f}  {r['name']}")
            return 0
        if args.ckpt_command == "verify":
            return _verify(storage, args.step)
        print(json.dumps(checkpoint.inspect(storage, checkpoint.step_name(args.step)), indent=1))
    except checkpoint.CheckpointError as exc:
        return _fail(_first_line(exc), 1)
    except STORAGE_ERRORS as exc:  # a missing file, refused credentials, an unreachable endpoint
        return _fail(f"{storage.url}: {_first_line(exc)}", 1)
    return 0


def _layout_text(layout: dict | None) -> str:
    """A checkpoint's layout as ``tp1 pp2 ep1 dp2``: sizes as saved, ``vp`` only when interleaved, the stage
    split only when explicit (``stages 3/1``); ``-`` when the checkpoint records none."""
    if not layout:
        return "-"
    parts = []
    for key, value in layout.items():
        if key == "stage_layers":
            if isinstance(value, list):
                parts.append("stages " + "/".join(map(str, value)))
        elif key != "vp" or value != 1:
            parts.append(f"{key}{value}")
    return " ".join(parts)


def _verify(storage, step: int | None) -> int:
    """``ckpt verify``: re-hash one committed step, or every committed step under the root, saying which;
    exit 1 if any fails."""
    from v4train.orchestrator import checkpoint
    from v4train.orchestrator.checkpoint.storage import STORAGE_ERRORS

    if step is not None:
        names = [checkpoint.step_name(step)]
    else:
        names = [r["name"] for r in checkpoint.list_checkpoints(storage) if r["committed"]]
        if not names:
            return _fail(f"{storage.url}: no committed checkpoint", 1)
    from v4train.orchestrator.checkpoint.completeness import check_referenced_shards

    bad = {}
    for name in names:
        try:
            state = checkpoint.verify(storage, name)
            check_referenced_shards(storage, name)
            print(f"{storage.url_of(name)}: OK (step {state['step']}, every file matches its manifest, every "
                  "shard is present)")
        except (checkpoint.CheckpointError, *STORAGE_ERRORS) as exc:
            bad[name] = _first_line(exc)
            print(f"{storage.url_of(name)}: FAILED ({bad[name]})")
    if len(names) == 1 and bad:
        return _fail(bad[names[0]], 1)
    if bad:
        return _fail(f"{len(bad)} of {len(names)} committed checkpoint(s) failed verification: {', '.join(bad)}", 1)
    if len(names) > 1:
        print(f"{storage.url}: all {len(names)} committed checkpoints verified")
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _import_all(*modules: str) -> None:
    for name in modules:
        importlib.import_module(name)


def _run(job, cluster, run_dir: Path, resume_from: str | None, faults: list, notes: list = ()) -> int:
    """Start Ray and the rank workers, run the supervisor, always tear down; returns the exit code.

    ``notes`` are events (name, step, fields) recorded before the run starts (the preflight's timings, the
    checkpoints a resume set aside).
    """
    import ray

    from v4train.orchestrator.control.telemetry import Telemetry

    # The supervisor and the rank group import torch's distributed stack and Megatron-core (seconds of CPU);
    # Ray's start mostly waits for its own processes, so the two overlap: the imports run on a thread while
    # this one starts Ray.
    importer = threading.Thread(target=_import_all, args=("v4train.orchestrator.control.supervisor",
                                                          "v4train.orchestrator.control.ray_group"),
                                name="import-supervisor", daemon=True)
    importer.start()
    from v4train.orchestrator.control.ray_start import start_ray

    started = time.perf_counter()
    world = job.parallel.world_size
    telemetry = Telemetry(run_dir, job.train.steps)
    for name, step, fields in notes:
        telemetry.event(name, step, **fields)
    supervisor = None

    def make_workers():  # a RayRankGroup
        return RayRankGroup.create(world, cluster.heartbeat_timeout_s, log_dir=str(run_dir / "logs"),
                                  gpus_per_rank=1 if cluster.device == "gpu" else 0,
                                  shares=cluster.ranks_per_node(world, job.parallel.tp))

    try:
        ray_started = time.perf_counter()
        start_ray(cluster.ray.num_cpus or max(world, 2), cluster.ray.object_store_memory_mb)
        telemetry.event("ray_started", 0, seconds=round(time.perf_counter() - ray_started, 3))
        importer.join()
        from v4train.orchestrator.control.ray_group import RayRankGroup
        from v4train.orchestrator.control.supervisor import Phase, Supervisor
        # SIGTERM (a scheduler stopping the driver) ends the run like Ctrl-C does; set after ray.init, which
        # installs its own SIGTERM handler (sys.exit) in the driver.
        signal.signal(signal.SIGTERM, _interrupt)
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
    """Entry point of the ``v4train`` console script; returns the process exit code (130 on Ctrl-C or SIGTERM)."""
    # Ctrl-C stops every command from here on, whatever this process inherited: a shell that starts a command in
    # the background without job control (`make test &`) starts it with SIGINT ignored, and Python then leaves
    # it ignored. The preflight alone reads the whole dataset.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, _interrupt)  # a scheduler stopping the driver: as Ctrl-C (set again after Ray)
    args = _parser().parse_args(argv)
    args.entered = (time.time(), time.process_time())  # the submit's start-time record (imports done by now)
    try:
        return _dispatch(args)
    except KeyboardInterrupt:  # before the ranks start (preflight) or after they stopped (a second Ctrl-C)
        print("v4train: interrupted", file=sys.stderr)
        return 130


def _dispatch(args) -> int:
    """Run the command ``args`` names; its exit code (SpecError: 2, with one line)."""
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
        if args.command == "sim-cluster":
            from v4train.orchestrator.tools import sim_cluster

            return sim_cluster.run_cli(args)
        if args.command == "report":
            from v4train.orchestrator.tools import report

            return report.run_cli(args)
    except SpecError as exc:
        return _fail(str(exc))
    return _fail(f"unknown command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
