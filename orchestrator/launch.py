"""Rank entry point without Ray: ``torchrun`` (or Slurm's ``srun``) starts one process per rank.

    torchrun --nproc-per-node 4 -m v4train.orchestrator.launch configs/demo.yaml --run-dir runs/demo-torchrun
    srun --ntasks 16 python -m v4train.orchestrator.launch job.yaml --run-dir /shared/runs/x --cluster clusters/c.yaml

The rank and world size come from torchrun's ``RANK`` / ``WORLD_SIZE`` (else Slurm's ``SLURM_PROCID`` /
``SLURM_NTASKS``), the rendezvous from ``MASTER_ADDR`` / ``MASTER_PORT``. Every process runs the supervisor
of ``v4train submit`` (:class:`orchestrator.control.supervisor.Supervisor`) over a
:class:`orchestrator.control.torchrun_group.TorchrunRankGroup`: the same plans, decisions (evaluation,
checkpoints, spike rollback, non-finite handling, anticipatory routing), metrics and events, and the same
commit protocol, so ``v4train resume`` and ``--resume`` here both continue from its checkpoints. Rank 0
writes ``metrics.jsonl`` and ``events.jsonl``. Before joining, every process runs the job's preflight and its
node's: the cluster file's ``interface`` exists on this host (gloo and NCCL use it) and the rendezvous host
answers; a process that fails one exits 2 with one line naming its host. What it leaves out: heartbeats (a
stalled peer is bounded by the collective timeout) and in-place recovery: a failed rank ends the attempt, and
``torchrun --max-restarts N`` starts every process again from the newest commit
(:mod:`orchestrator.control.elastic_restart`; a deterministic fault is not trained again), else rerun with
``--resume``.

It is also the baseline that measures what the Ray control plane costs (``benchmarks/control_plane.py``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

__all__ = ["main", "rank_env"]

# How long the rendezvous host may take to answer this node's probe before the node cannot join (seconds).
REACH_TIMEOUT_S = 10.0


def rank_env(environ=os.environ) -> tuple[int, int, str]:
    """``(rank, world_size, init_method)`` from torchrun's or Slurm's environment; ValueError if absent."""
    rank = environ.get("RANK", environ.get("SLURM_PROCID"))
    world = environ.get("WORLD_SIZE", environ.get("SLURM_NTASKS"))
    addr, port = environ.get("MASTER_ADDR"), environ.get("MASTER_PORT")
    if rank is None or world is None or not addr or not port:
        raise ValueError("RANK/WORLD_SIZE (or SLURM_PROCID/SLURM_NTASKS) and MASTER_ADDR/MASTER_PORT must be set: "
                         "start this with torchrun or srun")
    return int(rank), int(world), f"tcp://{addr}:{port}"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m v4train.orchestrator.launch", description=__doc__.splitlines()[0])
    p.add_argument("job", help="job YAML")
    p.add_argument("--run-dir", required=True, help="run directory (on a filesystem every rank sees)")
    p.add_argument("--cluster",
                   help="cluster YAML: backend, collective timeout, threads per rank (default gloo, 300 s, 1)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--resume", action="store_true", help="continue from the newest committed checkpoint of the run")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run directory first (rank 0)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run this rank of the job; returns the exit code (2: bad input, 1: a failure)."""
    args = _parser().parse_args(argv)
    from v4train.orchestrator.control import elastic_restart
    from v4train.orchestrator.control.rendezvous import PreflightError
    from v4train.orchestrator.rank.devices import PlacementError, resolve_placement
    from v4train.orchestrator.spec import SpecError, load_cluster, load_job

    try:
        rank, world, init_method = rank_env()
        job = load_job(args.job, args.overrides)
        cluster = load_cluster(args.cluster) if args.cluster else None
        if job.parallel.world_size != world:
            raise SpecError(f"parallel: tp x cp x pp x dp = {job.parallel.world_size} but {world} ranks were started")
        run_dir = Path(args.run_dir)
        restart = elastic_restart.restart_count()
        if restart:  # torchrun started every process again after a failure: continue the run, never delete it
            previous = elastic_restart.previous_attempts(run_dir)
            refused = elastic_restart.refusal(previous)
            if refused:
                print(f"v4train launch: rank {rank}: not restarted (torchrun restart {restart}): {refused}",
                      file=sys.stderr)
                return 1
            args.resume, args.overwrite = True, False
            job = job.model_copy(update={"faults": elastic_restart.unfired_faults(job.faults, previous.last_step)})
        from v4train.orchestrator.control.preflight import PROBE_PREFIX, preflight

        # Nothing is written to the run directory before every rank has joined (rank 0 prepares it then), so
        # every process sees it as it was; only the peers' preflight probes may come and go.
        in_use = run_dir.exists() and any(not p.name.startswith(PROBE_PREFIX) for p in run_dir.iterdir())
        if in_use and not args.resume and not args.overwrite:
            raise SpecError(f"--run-dir: {run_dir} exists and is not empty (use --resume or --overwrite)")

        # every process checks (it reads the dataset anyway), so none is left waiting at the rendezvous
        preflight(job, job.checkpoint.root or str(run_dir))
        _node_preflight(cluster)
        # what this process cannot run as configured stops it here, in one line (the rank checks again)
        placement = resolve_placement(cluster.device if cluster else "cpu", cluster.backend if cluster else "gloo",
                                      job.train.fp8)
    except (SpecError, ValueError, PlacementError, PreflightError) as exc:
        print(f"v4train launch: error: {exc}", file=sys.stderr)
        return 2
    if rank == 0:
        print(f"v4train launch: {placement.describe()}", file=sys.stderr)
    return _run(job, cluster, run_dir, rank, world, init_method, args, restart)


def _node_preflight(cluster) -> None:
    """This node's part of the setup checks: the cluster file's data-plane ``interface`` exists here (gloo and
    NCCL are pointed at it) and the rendezvous host answers (:func:`rendezvous.reach_host`). Raises
    ValueError or PreflightError naming this host: a node that cannot join fails at once, not at the
    rendezvous timeout."""
    from v4train.orchestrator.control import rendezvous

    if cluster is not None and cluster.interface is not None:
        rendezvous.interface_address(cluster.interface)
        os.environ.update(rendezvous.socket_env(cluster.interface))
    rendezvous.reach_host(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), REACH_TIMEOUT_S)


def _run(job, cluster, run_dir: Path, rank: int, world: int, init_method: str, args, restart: int) -> int:
    """Run this process's rank under the same supervisor loop as ``v4train submit``; rank 0 reports.
    ``restart``: torchrun's restart count (:mod:`orchestrator.control.elastic_restart`), 0 for the first attempt."""
    from v4train.orchestrator import checkpoint
    from v4train.orchestrator.control.supervisor import Phase, Supervisor
    from v4train.orchestrator.control.telemetry import NullTelemetry, Telemetry
    from v4train.orchestrator.control.torchrun_group import TorchrunRankGroup
    from v4train.orchestrator.spec import ClusterSpec, dump_job
    from v4train.orchestrator.checkpoint.storage import Storage

    cluster = cluster or ClusterSpec(name="torchrun", devices_per_node=world)
    resume_from, from_step = None, 0
    if args.resume and rank == 0:  # the others restore what rank 0 finds (Supervisor._resume_target)
        c = job.checkpoint
        storage = Storage(c.root or str(run_dir), endpoint_url=c.endpoint_url, region=c.region)
        resume_from = checkpoint.latest_committed(storage)
        from_step = int(checkpoint.read_train_state(storage, resume_from)["step"]) if resume_from else 0
    telemetry = Telemetry(run_dir, job.train.steps) if rank == 0 else NullTelemetry()

    def prepare_run_dir() -> None:
        """Rank 0, once every rank has joined: no peer is still checking the directory."""
        if args.overwrite and run_dir.exists():
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "job.yaml").write_text(dump_job(job))
        if restart:
            telemetry.event("restart", from_step, restart=restart, launcher="torchrun", from_checkpoint=resume_from)

    group = TorchrunRankGroup(rank, world, init_method, on_joined=prepare_run_dir, restart=restart)
    made = []

    def make_workers() -> TorchrunRankGroup:
        if made:  # a failed process cannot be replaced from inside the job: rerun with --resume
            raise RuntimeError("torchrun ranks cannot be restarted in place")
        made.append(group)
        return group

    # No in-place restarts: a failed rank ends this attempt; torchrun's --max-restarts (or a rerun with --resume)
    # starts the next one.
    supervisor = Supervisor(job, cluster, str(run_dir), make_workers, telemetry, resume_from=resume_from,
                            max_restarts=0, restarts=restart)
    try:
        phase = supervisor.run()
    finally:
        telemetry.close()
    if phase is Phase.FAILED:
        print(f"v4train launch: rank {rank}: run failed: {supervisor.failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
