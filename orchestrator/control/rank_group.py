"""The interface between the supervisor and its ranks: one typed call per thing a rank does.

A :class:`RankGroup` runs each operation on every rank of a job and returns the results ordered by rank, or
raises :class:`RankFailure` naming the rank that failed first. Three implementations:

- :class:`orchestrator.control.ray_group.RayRankGroup`: Ray actors driven from one supervisor process, with
  heartbeats that turn a stall into a failure;
- :class:`orchestrator.control.torchrun_group.TorchrunRankGroup`: the processes torchrun or srun started;
  every process runs the same supervisor loop on its own rank, and results are all-gathered;
- :class:`orchestrator.control.fake_group.FakeRankGroup`: an in-process fake with scripted losses and
  failures, for fast tests of the supervisor's decisions.

Side effects that must happen once per job (opening a checkpoint attempt, committing it, writing the run
directory) go through :meth:`RankGroup.coordinate`, which runs a function once and hands every caller its
result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from v4train.orchestrator.control.decisions import EvalRequest
from v4train.orchestrator.curriculum import StepPlan
from v4train.orchestrator.spec import JobSpec

__all__ = ["RankFailure", "RankGroup", "RankInfo", "RankSave", "SetupRequest"]

T = TypeVar("T")


@dataclass(frozen=True)
class RankFailure(Exception):
    """A rank failed: ``kind`` is ``exception``, ``died``, ``stall``, ``node_lost`` (every rank of its node
    died at once) or ``unreachable`` (its node cannot reach the rendezvous or the checkpoint root:
    deterministic, never retried); ``message`` is the root cause; ``method`` the operation it failed in."""

    rank: int
    kind: str
    message: str
    method: str

    def __str__(self) -> str:
        return f"rank {self.rank} {self.kind} in {self.method}: {self.message}"


@dataclass(frozen=True)
class SetupRequest:
    """What every rank needs to join a job: the spec, the bound on collectives (seconds), intra-op CPU
    threads, the torch.distributed backend, the device kind (``cpu`` / ``gpu``), the faults to inject
    (``KIND@STEP[:rank=R]``), environment variables to set first (storage credentials; never logged), the
    data-plane network interface of the cluster file (None: the one holding the node's Ray address), the
    checkpoint root every node must reach (checked before setup) and the supervisor's Ray node id (a rank
    on another node owns its host)."""

    job: JobSpec
    collective_timeout_s: float
    threads: int = 1
    backend: str = "gloo"
    device: str = "cpu"
    faults: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    interface: str | None = None
    checkpoint_root: str | None = None
    supervisor_node: str | None = None


@dataclass(frozen=True)
class RankInfo:
    """One rank after setup: its layout coordinates, whether it is the reporter (the rank whose metrics
    the run records: last stage, data-, context- and tensor-parallel rank 0), its stage's optimizer table
    (one rank per pipeline stage carries it, else None) and the node it runs on (its address; empty where
    the launcher does not say)."""

    rank: int
    pp_rank: int
    dp_rank: int
    tp_rank: int
    stage_params: int
    reporter: bool
    optimizer_assignment: str | None = None
    node: str = ""
    cp_rank: int = 0


@dataclass(frozen=True)
class RankSave:
    """What one rank reports after writing its checkpoint shards: its data-parallel rank, the global loader
    cursor, its RNG state (base64) and its rows of the anticipatory-routing tape
    ``{step: {layer: encoded [rows, seq, top-k]}}``."""

    rank: int
    dp_rank: int
    loader: dict
    rng: str
    routing: dict


class RankGroup(Protocol):
    """The ranks of one job. Every operation runs on all ranks and returns their results ordered by rank;
    any failure raises :class:`RankFailure`."""

    world_size: int
    launcher: str  # "ray", "torchrun" or "fake": recorded in the start event

    def setup(self, request: SetupRequest, timeout_s: float) -> list[RankInfo]:
        """Join the job: process groups, model stage, optimizer, data loader."""

    def train_step(self, plan: StepPlan) -> list[dict]:
        """Run one optimizer step; each rank's metrics (the reporter's are the run's)."""

    def evaluate(self, request: EvalRequest) -> list[dict]:
        """Validation loss ``{"val_loss", "val_batches"}`` per rank."""

    def save(self, root: str, attempt: str, asynchronous: bool, timeout_s: float) -> list[RankSave]:
        """Write each rank's shards into checkpoint directory ``attempt`` under ``root``."""

    def save_done(self, timeout_s: float) -> bool:
        """Whether every rank's pending asynchronous save has persisted."""

    def wait_saved(self, timeout_s: float) -> None:
        """Block until every rank's pending save has persisted."""

    def load(self, root: str, name: str, train_state: dict, timeout_s: float) -> list[int]:
        """Restore committed checkpoint ``name``; the step each rank restored."""

    def rollback(self, newest_allowed: int, skip_data: bool) -> list[int]:
        """Restore each rank's newest in-memory snapshot at or before ``newest_allowed`` (-1: none)."""

    def loader_state(self) -> dict:
        """The global data-loader cursor (the same on every rank)."""

    def set_loader_state(self, state: dict) -> None:
        """Move every rank's loader to a global cursor."""

    def coordinate(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` once for the whole job and return its result to every caller."""

    def shutdown(self) -> None:
        """End of the job: release the ranks."""

    def abort(self) -> None:
        """After a failure: kill or release every rank at once (survivors may be blocked in a collective)."""

    def rejoin(self, failure: RankFailure, timeout_s: float) -> bool:
        """After ``failure``: keep the healthy ranks' processes for the next :meth:`setup` and replace the
        failed rank's; False when the group cannot (the supervisor then aborts it and makes a new one)."""
