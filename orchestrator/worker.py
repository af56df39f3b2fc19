"""Rank workers on Ray (the control plane) and the group the supervisor drives.

:class:`RankWorker` is the Ray actor, one per rank, a thin shell around :class:`orchestrator.trainer.RankTrainer`.
:class:`WorkerGroup` runs one method on every rank and turns any failure into a :class:`RankFailure` that names
the rank: an exception or a dead actor is reported as soon as Ray sees it (the other ranks may still be blocked
in a collective), a stall when ``timeout_s`` passes with some ranks unfinished.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

__all__ = ["RankFailure", "RankWorker", "WorkerGroup", "start_ray", "free_port"]


@dataclass(frozen=True)
class RankFailure(Exception):
    """A rank failed: ``kind`` is ``exception``, ``died`` or ``stall``; ``message`` is the root cause."""

    rank: int
    kind: str
    message: str
    method: str

    def __str__(self) -> str:
        return f"rank {self.rank} {self.kind} in {self.method}: {self.message}"


class RankWorker:
    """One rank. Methods mirror :class:`RankTrainer`; arguments and results are small picklable values.

    Args:
        log_path: file receiving this rank's stdout/stderr and logging (None keeps Ray's defaults).
    """

    def __init__(self, log_path: str | None = None) -> None:
        if log_path:
            Path(log_path).parent.mkdir(parents=True, exist_ok=True)
            stream = open(log_path, "a", buffering=1)  # noqa: SIM115 - lives as long as the actor
            os.dup2(stream.fileno(), 1)
            os.dup2(stream.fileno(), 2)
            sys.stdout = sys.stderr = stream
            logging.basicConfig(stream=stream, level=logging.INFO, force=True)
        self.trainer = None

    def pid(self) -> int:
        return os.getpid()

    def setup(self, job: dict, rank: int, world_size: int, init_method: str, timeout_s: float,
              threads: int, backend: str) -> dict:
        from orchestrator.spec import JobSpec
        from orchestrator.trainer import RankTrainer

        if self.trainer is not None:
            self.trainer.close()
        self.trainer = RankTrainer(
            JobSpec.model_validate(job), rank=rank, world_size=world_size, init_method=init_method,
            timeout_s=timeout_s, threads=threads, backend=backend,
        )
        return self.trainer.describe()

    def train_step(self, plan: dict) -> dict:
        from orchestrator.curriculum import StepPlan

        return self.trainer.train_step(StepPlan(**plan))

    def evaluate(self, num_batches: int, global_batch: int, micro_batch_size: int, seq_len: int) -> dict:
        return self.trainer.evaluate(num_batches, global_batch, micro_batch_size, seq_len)

    def save(self, path: str) -> dict:
        return self.trainer.save(path)

    def load(self, path: str, train_state: dict) -> int:
        self.trainer.load(path, train_state)
        return self.trainer.step

    def close(self) -> None:
        if self.trainer is not None:
            self.trainer.close()
            self.trainer = None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for the gloo rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ray(num_cpus: int, object_store_memory_mb: int) -> None:
    """Start (or join) the embedded local Ray cluster as stack-notes section 7 prescribes.

    Token auth off for the local cluster, logical CPUs >= ranks, a small object store (only small control
    messages travel through Ray), no dashboard, worker logs kept out of the driver's terminal.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        object_store_memory=object_store_memory_mb * 1024 * 1024,
        log_to_driver=False,
        logging_level=logging.WARNING,
    )


class WorkerGroup:
    """The rank actors of one job, addressed together.

    Args:
        actors: one RankWorker actor handle per rank (index = rank).
        timeout_s: default bound on any call; ranks still running after it are reported as a stall.
    """

    def __init__(self, actors: list, timeout_s: float) -> None:
        self.actors = actors
        self.timeout_s = timeout_s

    @classmethod
    def create(cls, world_size: int, timeout_s: float, log_dir: str | None = None) -> "WorkerGroup":
        """Start ``world_size`` RankWorker actors in one placement group (one bundle per rank)."""
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        pg = placement_group([{"CPU": 1}] * world_size, strategy="PACK")
        ray.get(pg.ready(), timeout=timeout_s)
        remote_cls = ray.remote(num_cpus=1, max_restarts=0)(RankWorker)
        actors = [
            remote_cls.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r),
                name=None,
            ).remote(str(Path(log_dir) / f"rank_{r}.log") if log_dir else None)
            for r in range(world_size)
        ]
        group = cls(actors, timeout_s)
        group.placement_group = pg
        return group

    def call(self, method: str, *args, per_rank_args: list | None = None, timeout_s: float | None = None) -> list:
        """Run ``method`` on every rank and return the results ordered by rank.

        Raises RankFailure for the first rank that raises or dies, or for the first unfinished rank after
        ``timeout_s`` (a stall).
        """
        import ray

        refs = [
            getattr(actor, method).remote(*(per_rank_args[r] if per_rank_args else args))
            for r, actor in enumerate(self.actors)
        ]
        rank_of = {ref: r for r, ref in enumerate(refs)}
        pending = list(refs)
        timeout = self.timeout_s if timeout_s is None else timeout_s
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=timeout)
            if not done:
                raise RankFailure(rank_of[pending[0]], "stall", f"no answer within {timeout:.0f} s", method)
            try:
                ray.get(done[0])
            except ray.exceptions.RayActorError as exc:
                raise RankFailure(rank_of[done[0]], "died", _first_line(exc), method) from None
            except ray.exceptions.RayTaskError as exc:
                raise RankFailure(rank_of[done[0]], "exception", _root_cause(exc), method) from None
        return ray.get(refs)

    def shutdown(self) -> None:
        """Kill every actor (survivors may be blocked in a collective) and release the placement group."""
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        pg = getattr(self, "placement_group", None)
        if pg is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(pg)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _root_cause(exc) -> str:
    cause = getattr(exc, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    return _first_line(exc)
