"""Ray Job Submission: run a job's supervisor on a running Ray cluster (``v4train submit`` with an ``address``).

A cluster file whose ``address`` names a Ray cluster's job server (its dashboard, ``http://HEAD:8265``)
makes ``v4train submit`` validate the job here, then hand it to that cluster as a Ray job:

- the **working directory** shipped with the job's runtime environment is the v4train checkout this module
  was imported from (the directory holding ``pyproject.toml``), less :data:`DEFAULT_EXCLUDES` (virtual
  environments, ``runs/``, ``datasets/``, caches, ``.git``) and the cluster's ``ray.excludes``; Ray also
  honours ``.gitignore``. Without a checkout (a wheel install) nothing is shipped and the cluster's own
  v4train is used.
- the **resolved job and cluster** travel as YAML in the environment variables :data:`JOB_ENV` and
  :data:`CLUSTER_ENV` (a few KB; credentials never do: ranks read them from the cluster's environment).
- the **entrypoint** is ``python -m v4train.orchestrator.tools.job_entry --run-dir RUN_DIR`` on the head node,
  run by the interpreter ``ray start`` ran in. It writes the specs to files and calls ``v4train submit`` on them
  with the address removed: the same supervisor as a local run, whose ``ray.init`` joins the cluster through the
  ``RAY_ADDRESS`` Ray sets for every job entrypoint (``orchestrator.control.ray_group.start_ray``).
- **paths**: a relative ``data.path`` and the run directory are made absolute against the submitter's
  current directory, so they must be visible at the same path on the cluster (a shared filesystem, or the
  same machine); checkpoints can go to ``s3://`` instead.

``status``, ``logs`` and ``stop`` are thin wrappers over ``ray.job_submission.JobSubmissionClient``.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import shlex
import sys
import time
import uuid
from pathlib import Path

import yaml

from v4train.orchestrator.spec import ClusterSpec, JobSpec, SpecError, dump_job
from v4train.orchestrator.tools.report import read_run

__all__ = ["JobsError", "DEFAULT_EXCLUDES", "JOB_ENV", "CLUSTER_ENV", "TERMINAL", "submit", "job_status", "wait",
           "job_logs", "follow_logs", "stop", "format_status", "resolve_address", "project_root", "submit_from_cli",
           "add_cli_arguments", "run_cli"]

JOB_ENV = "V4TRAIN_JOB_YAML"
ENTRYPOINT_MODULE = "v4train.orchestrator.tools.job_entry"
CLUSTER_ENV = "V4TRAIN_CLUSTER_YAML"
# Left out of the shipped working directory (gitignore syntax), besides what .gitignore already names.
DEFAULT_EXCLUDES = [".git", ".venv", "venv", "env", "runs", "datasets", "__pycache__", "*.pyc", "*.egg-info",
                    ".pytest_cache", "build", "dist", "tmp*"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class JobsError(RuntimeError):
    """The job server cannot be reached, or knows no such job; the message is one line."""


def project_root() -> Path | None:
    """The checkout v4train runs from (holds ``pyproject.toml`` and ``orchestrator/``), or None."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "orchestrator").is_dir() else None


def resolve_address(cluster: ClusterSpec | None, address: str | None) -> str:
    """The job server address: ``--address``, else the cluster file's, else ``RAY_API_SERVER_ADDRESS``.

    Raises SpecError when none is given.
    """
    found = address or (cluster.address if cluster is not None else None) or os.environ.get("RAY_API_SERVER_ADDRESS")
    if not found:
        raise SpecError("no job server: give --cluster FILE (with an address) or --address http://HEAD:8265")
    return found


def _client(address: str):
    from ray.job_submission import JobSubmissionClient

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # ConnectionError, requests errors, version checks: one line for the user
        raise JobsError(f"cannot reach the Ray job server at {address}: {str(exc).splitlines()[0]}") from None


def _absolute(path: str) -> str:
    return path if "://" in path or os.path.isabs(path) else str(Path(path).resolve())


def submit(job: JobSpec, cluster: ClusterSpec, run_dir: Path, *, overwrite: bool = False,
           faults: list[str] = ()) -> str:
    """Submit ``job`` to ``cluster.address``; returns the job id (Ray's submission id).

    ``run_dir`` is made absolute and must be reachable from the cluster at that path.
    """
    job = job.model_copy(update={"data": job.data.model_copy(update={"path": _absolute(job.data.path)})})
    inner = cluster.model_copy(update={"address": None})
    run_dir = Path(run_dir).resolve()
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    job_id = f"v4train-{job.name}-{stamp}-{uuid.uuid4().hex[:6]}"
    args = ["--run-dir", str(run_dir)] + (["--overwrite"] if overwrite else [])
    for fault in faults:
        args += ["--inject-fault", fault]
    runtime_env: dict = {
        "env_vars": {JOB_ENV: dump_job(job),
                     CLUSTER_ENV: yaml.safe_dump(inner.model_dump(mode="json"), sort_keys=False),
                     "RAY_DEDUP_LOGS": "1", "PYTHONUNBUFFERED": "1"},
    }
    root = project_root()
    if root is not None:
        runtime_env["working_dir"] = str(root)
        runtime_env["excludes"] = DEFAULT_EXCLUDES + list(cluster.ray.excludes)
    client = _client(cluster.address)
    try:
        return client.submit_job(
            entrypoint=" ".join(["python", "-m", ENTRYPOINT_MODULE] + [shlex.quote(a) for a in args]),
            submission_id=job_id,
            runtime_env=runtime_env,
            metadata={"v4train_job": job.name, "run_dir": str(run_dir), "cluster": cluster.name},
        )
    except Exception as exc:
        raise JobsError(f"{cluster.address}: submission refused: {str(exc).splitlines()[0]}") from None


def job_status(address: str, job_id: str) -> dict:
    """``{job_id, status, message, run_dir, start, end, entrypoint}`` of a job (times as datetimes or None)."""
    client = _client(address)
    try:
        info = client.get_job_info(job_id)
    except Exception as exc:
        raise JobsError(f"{address}: no job {job_id} ({str(exc).splitlines()[0]})") from None

    def when(ms):
        return datetime.datetime.fromtimestamp(ms / 1000) if ms else None

    return {"job_id": job_id, "status": str(info.status.value if hasattr(info.status, "value") else info.status),
            "message": (info.message or "").splitlines()[0] if info.message else "",
            "run_dir": (info.metadata or {}).get("run_dir"), "start": when(info.start_time),
            "end": when(info.end_time), "entrypoint": info.entrypoint}


def wait(address: str, job_id: str, timeout_s: float, poll_s: float = 1.0) -> dict:
    """Poll until the job is terminal (or ``timeout_s`` passes); returns the last status."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = job_status(address, job_id)
        if state["status"] in TERMINAL or time.monotonic() > deadline:
            return state
        time.sleep(poll_s)


def job_logs(address: str, job_id: str) -> str:
    """Everything the job's entrypoint (the supervisor) has printed so far."""
    try:
        return _client(address).get_job_logs(job_id)
    except JobsError:
        raise
    except Exception as exc:
        raise JobsError(f"{address}: no logs for job {job_id} ({str(exc).splitlines()[0]})") from None


def follow_logs(address: str, job_id: str, out=sys.stdout) -> dict:
    """Stream the job's logs to ``out`` until it ends; returns its final status."""
    client = _client(address)

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(tail())
    return job_status(address, job_id)


def stop(address: str, job_id: str, wait_s: float = 60.0) -> dict:
    """Ask the job to stop (SIGTERM to the supervisor, which tears its ranks down) and wait for it to end."""
    client = _client(address)
    try:
        client.stop_job(job_id)
    except Exception as exc:
        raise JobsError(f"{address}: cannot stop job {job_id} ({str(exc).splitlines()[0]})") from None
    return wait(address, job_id, wait_s)


def format_status(state: dict) -> str:
    """Lines for ``v4train status``: the job's state, and when the run directory is visible here its progress
    (step, loss, throughput, restarts) and its last event (with the cause of a failure)."""
    lines = [f"job       {state['job_id']}", f"status    {state['status']}"]
    if state["message"]:
        lines.append(f"message   {state['message']}")
    if state["run_dir"]:
        lines.append(f"run dir   {state['run_dir']}")
    if state["start"]:
        ended = f"   ended {state['end']:%H:%M:%S}" if state["end"] else ""
        lines.append(f"started   {state['start']:%Y-%m-%d %H:%M:%S}" + ended)
    import json

    run_dir = Path(state["run_dir"] or "/nonexistent")
    if (run_dir / "metrics.jsonl").is_file():
        rows = read_run(run_dir)[0]  # the current trajectory (a resume to an earlier step abandons the rest)
        if rows:
            last = rows[-1]
            lines.append(f"progress  step {last['step']}  loss {last['loss']:.4f}  {last['tokens_per_s']:.0f} tok/s  "
                         f"restarts {last.get('restarts', 0)}")
    if (run_dir / "events.jsonl").is_file():
        rows = (run_dir / "events.jsonl").read_text().splitlines()
        if rows:
            last = json.loads(rows[-1])
            cause = f": {last['cause']}" if "cause" in last else ""
            lines.append(f"event     {last['event']} at step {last['step']}{cause}")
    return "\n".join(lines)


# ------------------------------------------------------------------ command line (v4train submit/status/logs/stop)
def submit_from_cli(args, cluster: ClusterSpec) -> int:
    """``v4train submit JOB --cluster FILE`` for a cluster with an ``address``: validate here, submit, print the id.

    The dataset directory is checked here when it is visible here; otherwise the job checks it on the
    cluster before any rank starts.
    """
    from v4train.orchestrator.spec import load_job, validate_against_cluster

    job = load_job(args.job, args.overrides, check_data=False)
    if Path(_absolute(job.data.path)).exists():
        job = load_job(args.job, args.overrides)
    validate_against_cluster(job, cluster)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(args.run_dir or f"runs/{job.name}-{stamp}").resolve()
    if run_dir.exists() and any(run_dir.iterdir()) and not args.overwrite:
        raise SpecError(f"--run-dir: {run_dir} exists and is not empty (use --overwrite)")
    faults = list(args.faults)
    if faults:
        from v4train.orchestrator.faults import parse_fault

        try:
            [parse_fault(f) for f in faults]
        except ValueError as exc:
            raise SpecError(f"--inject-fault {exc}") from None
    try:
        job_id = submit(job, cluster, run_dir, overwrite=args.overwrite, faults=faults)
    except JobsError as exc:
        print(f"v4train: error: {exc}", file=sys.stderr)
        return 1
    print(job_id)
    print(f"v4train: submitted {job.name} to {cluster.address} (run dir {run_dir}); follow with "
          f"`v4train status {job_id} --cluster {args.cluster} --wait` or `v4train logs {job_id} "
          f"--cluster {args.cluster} --follow`", file=sys.stderr)
    return 0


def add_cli_arguments(sub) -> None:
    """Add ``status``, ``logs`` and ``stop`` to the ``v4train`` subcommands."""
    status = sub.add_parser("status", help="state of a job submitted to a Ray cluster (--wait: until it ends)")
    logs = sub.add_parser("logs", help="what a submitted job's supervisor printed (--follow: stream until it ends)")
    stop_ = sub.add_parser("stop", help="stop a submitted job: its supervisor tears the ranks down")
    for p in (status, logs, stop_):
        p.add_argument("job_id", help="the id `v4train submit` printed")
        p.add_argument("--cluster", help="cluster YAML whose address names the job server")
        p.add_argument("--address", help="job server address, e.g. http://127.0.0.1:8265 (default: the cluster's, "
                                         "else RAY_API_SERVER_ADDRESS)")
    status.add_argument("--wait", action="store_true", help="block until the job ends; exit 0 only if it succeeded")
    status.add_argument("--timeout", type=float, default=24 * 3600.0, help="seconds --wait waits at most")
    logs.add_argument("--follow", action="store_true", help="stream the logs until the job ends")
    stop_.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the job to end")


def run_cli(args) -> int:
    """Run ``status``, ``logs`` or ``stop``; exit 1 when the server is unreachable or the job unknown."""
    from v4train.orchestrator.spec import load_cluster

    cluster = load_cluster(args.cluster) if args.cluster else None
    address = resolve_address(cluster, args.address)
    try:
        if args.command == "status":
            state = wait(address, args.job_id, args.timeout) if args.wait else job_status(address, args.job_id)
            print(format_status(state))
            return 0 if not args.wait or state["status"] == "SUCCEEDED" else 1
        if args.command == "logs":
            if args.follow:
                state = follow_logs(address, args.job_id)
                return 0 if state["status"] == "SUCCEEDED" else 1
            sys.stdout.write(job_logs(address, args.job_id))
            return 0
        state = stop(address, args.job_id, args.timeout)
        print(format_status(state))
        return 0 if state["status"] in TERMINAL else 1
    except JobsError as exc:
        print(f"v4train: error: {exc}", file=sys.stderr)
        return 1
