"""The Ray actor shell of one rank: owns a :class:`orchestrator.rank.trainer.RankTrainer` and runs what
:class:`orchestrator.control.ray_group.RayRankGroup` asks of it.

Operations arrive as functions of the trainer (``RankTrainer.train_step`` and its siblings, pickled by
reference), so the actor has no forwarding method per operation and every call is type-checked where it
is written. Heartbeats are answered on their own concurrency group while a step runs.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import ray

from v4train.orchestrator.control.rank_group import RankInfo, SetupRequest
from v4train.orchestrator.faults import parse_fault
from v4train.orchestrator.rank.trainer import RankTrainer

__all__ = ["RankWorker"]

T = TypeVar("T")


class RankWorker:
    """One rank (a Ray actor).

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
        self.trainer: RankTrainer | None = None

    def pid(self) -> int:
        return os.getpid()

    def setup(self, request: SetupRequest, rank: int, world_size: int, init_method: str) -> RankInfo:
        """Join a job as ``rank`` (credentials in ``request.env`` are set in this process, never logged)."""
        os.environ.update(request.env)
        self.close()
        self.trainer = RankTrainer(
            request.job, rank=rank, world_size=world_size, init_method=init_method,
            timeout_s=request.collective_timeout_s, threads=request.threads, backend=request.backend,
            device=request.device,
            inject=[parse_fault(f) for f in request.faults],
        )
        return self.trainer.describe()

    def run(self, operation: Callable[..., T], *args) -> T:
        """``operation(trainer, *args)``: one of the trainer's methods, passed as a function."""
        return operation(self.trainer, *args)

    @ray.method(concurrency_group="heartbeat")
    def heartbeat(self) -> dict:
        """Progress of the running call: step, a counter that moves as work is done, and the phase.

        Answered by the actor's own ``heartbeat`` thread while ``train_step`` runs on the default one.
        """
        return dict(self.trainer.heartbeat) if self.trainer is not None else {"step": 0, "progress": 0, "phase": "idle"}

    def close(self) -> None:
        if self.trainer is not None:
            self.trainer.close()
            self.trainer = None
