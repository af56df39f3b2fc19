"""Rank entry point without Ray: ``torchrun`` (or Slurm's ``srun``) starts one process per rank.

    torchrun --nproc-per-node 4 -m v4train.orchestrator.launch configs/demo.yaml --run-dir runs/demo-torchrun
    srun --ntasks 16 python -m v4train.orchestrator.launch job.yaml --run-dir /shared/runs/x --cluster clusters/c.yaml

The rank and world size come from torchrun's ``RANK`` / ``WORLD_SIZE`` (else Slurm's ``SLURM_PROCID`` /
``SLURM_NTASKS``), the rendezvous from ``MASTER_ADDR`` / ``MASTER_PORT``. Every rank runs the same loop as the
Ray supervisor drives, on the same engine: :class:`orchestrator.trainer.RankTrainer` takes the step plans of
:func:`orchestrator.curriculum.plan_at`; each step's metrics are gathered to rank 0 over a gloo group and
written by :class:`orchestrator.telemetry.Telemetry` (``metrics.jsonl``, ``events.jsonl``); checkpoints use
the same commit protocol (:mod:`orchestrator.checkpoint`, synchronous saves), so ``v4train resume`` and
``--resume`` here both continue from them. What it leaves out is the control plane: no heartbeats, no
automatic recovery (a failed rank ends the job; rerun with ``--resume``), no spike guard.

It is also the baseline that measures what the Ray control plane costs (``benchmarks/control_plane.py``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

__all__ = ["main", "rank_env"]


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
    p.add_argument("--cluster", help="cluster YAML: backend, collective timeout, threads per rank (default gloo, 300 s, 1)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--resume", action="store_true", help="continue from the newest committed checkpoint of the run")
    p.add_argument("--overwrite", action="store_true", help="delete an existing run directory first (rank 0)")
    return p


def _train_state(job, step: int, consumed: tuple[int, int], stage, rank_states: list[dict]) -> dict:
    from v4train.orchestrator import checkpoint

    return {
        "step": step, "consumed_tokens": consumed[0], "consumed_samples": consumed[1],
        "layout": job.parallel.model_dump(), "model": job.model.model_dump(), "data_path": job.data.path,
        "loader": rank_states[0]["loader"], "rng": {str(s["rank"]): s["rng"] for s in rank_states},
        "ranks": len(rank_states), "curriculum": {"stage": stage}, "spike_guard": {},
        "anticipatory_routing": {"remaining": 0, "delay_steps": 1, "rows": checkpoint.merge_routing(rank_states)},
    }


def main(argv: list[str] | None = None) -> int:
    """Run this rank of the job; returns the exit code (2: bad input, 1: a failure)."""
    args = _parser().parse_args(argv)
    from v4train.orchestrator.spec import SpecError, load_cluster, load_job

    try:
        rank, world, init_method = rank_env()
        job = load_job(args.job, args.overrides)
        cluster = load_cluster(args.cluster) if args.cluster else None
        if job.parallel.world_size != world:
            raise SpecError(f"parallel: tp x cp x pp x dp = {job.parallel.world_size} but {world} ranks were started")
        run_dir = Path(args.run_dir)
        if not args.resume and not args.overwrite and run_dir.exists() and any(run_dir.iterdir()):
            raise SpecError(f"--run-dir: {run_dir} exists and is not empty (use --resume or --overwrite)")
    except (SpecError, ValueError) as exc:
        print(f"v4train launch: error: {exc}", file=sys.stderr)
        return 2
    return _run(job, cluster, run_dir, rank, world, init_method, args)


def _run(job, cluster, run_dir: Path, rank: int, world: int, init_method: str, args) -> int:
    import torch.distributed as dist

    from v4train.orchestrator import checkpoint
    from v4train.orchestrator.curriculum import plan_at
    from v4train.orchestrator.spec import dump_job
    from v4train.orchestrator.storage import Storage
    from v4train.orchestrator.telemetry import Telemetry
    from v4train.orchestrator.trainer import RankTrainer

    timeout = cluster.collective_timeout_s if cluster else 300.0
    trainer = RankTrainer(job, rank=rank, world_size=world, init_method=init_method, timeout_s=timeout,
                          threads=cluster.threads_per_rank if cluster else 1, backend=cluster.backend if cluster else "gloo")
    control = dist.new_group(backend="gloo")  # metrics and small state to rank 0, whatever the data-plane backend

    def gather(obj) -> list | None:
        out = [None] * world if rank == 0 else None
        dist.gather_object(obj, out, dst=0, group=control)
        return out

    c = job.checkpoint
    storage = Storage(c.root or str(run_dir), endpoint_url=c.endpoint_url, region=c.region)
    telemetry = None
    if rank == 0:
        if args.overwrite and run_dir.exists():
            shutil.rmtree(run_dir)
        telemetry = Telemetry(run_dir, job.train.steps)
        (run_dir / "job.yaml").write_text(dump_job(job))
    flags = gather(trainer.is_reporter)  # collective: every rank calls it
    reporter = flags.index(True) if rank == 0 else None
    step = consumed_tokens = consumed_samples = 0
    stage = None
    started = time.perf_counter()
    try:
        if args.resume:
            name = checkpoint.latest_committed(storage)
            if name is not None:
                state = checkpoint.verify(storage, name) if rank == 0 else checkpoint.read_train_state(storage, name)
                step = trainer.load(storage.url, name, state)
                consumed_tokens, consumed_samples = int(state["consumed_tokens"]), int(state["consumed_samples"])
        if telemetry:
            telemetry.resume_at(step)
            telemetry.event("start", step, world_size=world, layout=job.parallel.model_dump(), launcher="torchrun",
                            setup_s=round(time.perf_counter() - started, 2))
        while step < job.train.steps:
            plan = plan_at(job, step + 1, consumed_tokens)
            if telemetry and plan.stage != stage and (stage is not None or plan.stage):
                telemetry.event("stage_change", step, stage=plan.stage, seq_len=plan.seq_len)
            stage = plan.stage
            results = gather(trainer.train_step(plan))
            step, consumed_tokens, consumed_samples = plan.step, consumed_tokens + plan.global_batch_tokens, \
                consumed_samples + plan.global_batch
            if telemetry:
                record = dict(results[reporter])
                record["peak_rss_mb"] = max(r["peak_rss_mb"] for r in results)
                record.update(consumed_tokens=consumed_tokens, consumed_samples=consumed_samples, restarts=0,
                              time=time.time())
                telemetry.metrics(record)
            if (c.every_steps and step % c.every_steps == 0) or (c.at_end and step == job.train.steps):
                _save(trainer, storage, job, step, (consumed_tokens, consumed_samples), stage, telemetry, gather, control)
        t = job.train
        if t.eval_batches:
            result = gather(trainer.evaluate(t.eval_batches, t.global_batch, t.micro_batch_size, job.data.seq_len))
            if telemetry:
                telemetry.event("eval", step, **result[reporter])
        if telemetry:
            telemetry.event("finish", step, wall_s=round(time.perf_counter() - started, 1))
    finally:
        if telemetry:
            telemetry.close()
        trainer.close()
    return 0


def _save(trainer, storage, job, step: int, consumed, stage, telemetry, gather, control) -> None:
    """A synchronous checkpoint: rank 0 opens the attempt, every rank writes its shards, rank 0 commits."""
    import torch.distributed as dist

    from v4train.orchestrator import checkpoint

    names = [checkpoint.begin_attempt(storage, step) if telemetry else None]
    dist.broadcast_object_list(names, src=0, group=control)
    rank_states = gather(trainer.save(storage.url, names[0], False))
    if telemetry:
        final = checkpoint.commit(storage, names[0], step, _train_state(job, step, consumed, stage, rank_states))
        checkpoint.apply_retention(storage, job.checkpoint.keep)
        telemetry.event("checkpoint_committed", step, path=storage.url_of(final))
    dist.barrier(group=control)


if __name__ == "__main__":
    sys.exit(main())
