"""The ranks as the processes torchrun (or Slurm's srun) started, each running the same supervisor loop.

Every process holds one rank (:class:`orchestrator.rank.trainer.RankTrainer`) and one
:class:`TorchrunRankGroup`: an operation runs on the local rank, and the results of all ranks are
all-gathered over a gloo group of their own, so every process sees the same results and takes the same
decisions in the same order. Rank 0 is the coordinator: it writes telemetry and commits checkpoints, and
:meth:`TorchrunRankGroup.coordinate` broadcasts what it computed. A rank's exception reaches every process
as the same :class:`RankFailure`; there are no heartbeats (a stalled peer is bounded by the collective
timeout) and no replacement of a failed process.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from v4train.orchestrator.control.decisions import EvalRequest
from v4train.orchestrator.control.elastic_restart import attempt_store
from v4train.orchestrator.control.rank_group import RankFailure, RankInfo, RankSave, SetupRequest
from v4train.orchestrator.curriculum import StepPlan
from v4train.orchestrator.faults import parse_fault
from v4train.orchestrator.rank.trainer import RankTrainer

__all__ = ["TorchrunRankGroup"]


class TorchrunRankGroup:
    """This process's rank of a job of ``world_size`` ranks, rendezvousing at ``init_method``.

    ``on_joined`` runs on rank 0 once every rank has joined (the end of :meth:`setup`), and its exception
    reaches every rank: what rank 0 writes there (the run directory) cannot race another process's checks of
    it before the rendezvous. ``restart`` is torchrun's restart count: a restarted attempt joins through a store
    of its own (:func:`orchestrator.control.elastic_restart.attempt_store`).
    """

    launcher = "torchrun"

    def __init__(self, rank: int, world_size: int, init_method: str,
                 on_joined: Callable[[], None] | None = None, restart: int = 0) -> None:
        self.rank = rank
        self.restart = restart
        self.world_size = world_size
        self.init_method = init_method
        self.on_joined = on_joined
        self.trainer: RankTrainer | None = None
        self.control = None

    def coordinate(self, fn):
        """``fn()`` on rank 0, its result (or its exception) on every rank."""
        box = [None]
        if self.rank == 0:
            try:
                box[0] = (True, fn())
            except (Exception, CheckpointException) as exc:  # re-raised on every rank below
                box[0] = (False, exc)
        dist.broadcast_object_list(box, src=0, group=self.control)
        ok, value = box[0]
        if not ok:
            raise value
        return value

    def setup(self, request: SetupRequest, timeout_s: float) -> list[RankInfo]:
        store = None
        if self.restart:
            store = attempt_store(self.init_method, self.rank, self.world_size, request.collective_timeout_s,
                                  self.restart)
        self.trainer = RankTrainer(
            request.job, rank=self.rank, world_size=self.world_size, init_method=self.init_method,
            timeout_s=request.collective_timeout_s, threads=request.threads, backend=request.backend,
            device=request.device,
            inject=[parse_fault(f) for f in request.faults], store=store,
        )
        # metrics and small state between the processes, whatever the data-plane backend
        self.control = dist.new_group(backend="gloo",
                                      timeout=datetime.timedelta(seconds=request.collective_timeout_s))
        infos = self._all(lambda: self.trainer.describe(), "setup")
        if self.on_joined is not None:
            self.coordinate(self.on_joined)
        return infos

    def train_step(self, plan: StepPlan) -> list[dict]:
        return self._run(RankTrainer.train_step, plan)

    def evaluate(self, request: EvalRequest) -> list[dict]:
        return self._run(RankTrainer.evaluate, request)

    def save(self, root: str, attempt: str, asynchronous: bool, timeout_s: float) -> list[RankSave]:
        return self._run(RankTrainer.save, root, attempt, asynchronous)

    def save_done(self, timeout_s: float) -> bool:
        return all(self._run(RankTrainer.save_done))

    def wait_saved(self, timeout_s: float) -> None:
        self._run(RankTrainer.wait_saved)

    def load(self, root: str, name: str, train_state: dict, timeout_s: float) -> list[int]:
        return self._run(RankTrainer.load, root, name, train_state)

    def rollback(self, newest_allowed: int, skip_data: bool) -> list[int]:
        return self._run(RankTrainer.rollback, newest_allowed, skip_data)

    def loader_state(self) -> dict:
        return self._run(RankTrainer.loader_state)[0]

    def set_loader_state(self, state: dict) -> None:
        self._run(RankTrainer.set_loader_state, state)

    def shutdown(self) -> None:
        if self.trainer is not None:
            self.trainer.close()
            self.trainer = None

    def abort(self) -> None:
        self.shutdown()

    def rejoin(self, failure: RankFailure, timeout_s: float) -> bool:
        """Never: torchrun's elastic agent restarts every process of the job after a failure."""
        return False

    def _run(self, fn: Callable, *args) -> list:
        return self._all(lambda: fn(self.trainer, *args), fn.__name__)

    def _all(self, local: Callable, method: str) -> list:
        """``local()`` on this rank; every rank's result, or the same RankFailure on every rank."""
        try:
            outcome = (True, local())
        except (Exception, CheckpointException) as exc:  # every process must learn of it: they all take the next
            outcome = (False, f"{type(exc).__name__}: {exc}")  # decision (DCP's errors are BaseExceptions)
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, outcome, group=self.control)
        for rank, (ok, value) in enumerate(gathered):
            if not ok:
                raise RankFailure(rank, "exception", value, method)
        return [value for _, value in gathered]
