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
import time
from dataclasses import dataclass
from pathlib import Path

import ray

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
              threads: int, backend: str, inject: list[str], env: dict[str, str]) -> dict:
        """Join a job as ``rank``; ``env`` carries credentials (set in this process, never logged)."""
        from v4train.orchestrator.faults import parse_fault
        from v4train.orchestrator.spec import JobSpec
        from v4train.orchestrator.trainer import RankTrainer

        os.environ.update(env)
        if self.trainer is not None:
            self.trainer.close()
        self.trainer = RankTrainer(
            JobSpec.model_validate(job), rank=rank, world_size=world_size, init_method=init_method,
            timeout_s=timeout_s, threads=threads, backend=backend, inject=[parse_fault(f) for f in inject],
        )
        return self.trainer.describe()

    @ray.method(concurrency_group="heartbeat")
    def heartbeat(self) -> dict:
        """Progress of the running call: step, a counter that moves as work is done, and the phase.

        Answered by the actor's own ``heartbeat`` thread while ``train_step`` runs on the default one.
        """
        return dict(self.trainer.heartbeat) if self.trainer is not None else {"step": 0, "progress": 0, "phase": "idle"}

    def train_step(self, plan: dict) -> dict:
        from v4train.orchestrator.curriculum import StepPlan

        return self.trainer.train_step(StepPlan(**plan))

    def evaluate(self, num_batches: int, global_batch: int, micro_batch_size: int, seq_len: int) -> dict:
        return self.trainer.evaluate(num_batches, global_batch, micro_batch_size, seq_len)

    def save(self, root: str, attempt: str, asynchronous: bool) -> dict:
        return self.trainer.save(root, attempt, asynchronous)

    def save_done(self) -> bool:
        return self.trainer.save_done()

    def wait_saved(self) -> None:
        self.trainer.wait_saved()

    def load(self, root: str, name: str, train_state: dict) -> int:
        return self.trainer.load(root, name, train_state)

    def rollback(self, newest_allowed: int, skip_data: bool) -> int:
        return self.trainer.rollback(newest_allowed, skip_data)

    def loader_state(self) -> dict:
        return self.trainer.loader_state()

    def set_loader_state(self, state: dict) -> None:
        self.trainer.set_loader_state(state)

    def close(self) -> None:
        if self.trainer is not None:
            self.trainer.close()
            self.trainer = None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for the gloo rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ray(num_cpus: int, object_store_memory_mb: int, address: str | None = None) -> None:
    """Start (or join) the embedded local Ray cluster as stack-notes section 7 prescribes.

    Token auth off for the local cluster, logical CPUs >= ranks, a small object store (only small control
    messages travel through Ray), no dashboard, worker logs kept out of the driver's terminal.

    ``address`` (or ``RAY_ADDRESS``, which Ray sets for a job's entrypoint) joins that running cluster
    instead; its resources are the cluster's own, so ``num_cpus`` and the object store size are not used.
    Without either a new local cluster always starts, never one found on this machine by ``ray start``.
    """

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is not None:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        return
    ray.init(
        address="local",
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
        timeout_s: bound on any call without progress: when no rank's heartbeat moves for this long, the
            call fails as a stall of the least advanced rank.
        poll_s: how often heartbeats are read while a call runs.
        grace_s: after a first failure, how long to wait for the others before naming the root cause.
        owned: whether :meth:`shutdown` kills the actors (False for actors borrowed from a longer-lived
            pool); :meth:`abort` kills them either way.
    """

    def __init__(self, actors: list, timeout_s: float, poll_s: float = 1.0, owned: bool = True,
                 grace_s: float = 3.0) -> None:
        self.actors = actors
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.grace_s = grace_s
        self.owned = owned
        self.placement_group = None

    @classmethod
    def create(cls, world_size: int, timeout_s: float, log_dir: str | None = None, gpus_per_rank: int = 0) -> "WorkerGroup":
        """Start ``world_size`` RankWorker actors in one placement group (one bundle per rank).

        ``gpus_per_rank`` (1 on a GPU cluster) makes each bundle and actor hold that many GPUs.
        """
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = {"CPU": 1, **({"GPU": gpus_per_rank} if gpus_per_rank else {})}
        pg = placement_group([bundle] * world_size, strategy="PACK")
        ray.get(pg.ready(), timeout=timeout_s)
        # The rank's work runs on one thread (torch's intra-op thread count is per thread: a thread pool
        # would change reduction orders between calls); heartbeats are answered by a second group.
        remote_cls = ray.remote(num_cpus=1, num_gpus=gpus_per_rank, max_restarts=0,
                                concurrency_groups={"heartbeat": 1})(RankWorker)
        actors = [
            remote_cls.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r),
            ).remote(str(Path(log_dir) / f"rank_{r}.log") if log_dir else None)
            for r in range(world_size)
        ]
        group = cls(actors, timeout_s)
        group.placement_group = pg
        return group

    def call(self, method: str, *args, per_rank_args: list | None = None, timeout_s: float | None = None) -> list:
        """Run ``method`` on every rank and return the results ordered by rank.

        Raises RankFailure for the first rank that raises or dies (as soon as Ray reports it), or, when no
        rank has made progress for ``timeout_s`` (default: the group's), a stall of the least advanced
        unfinished rank.
        """
        stall_after = self.timeout_s if timeout_s is None else timeout_s

        refs = [
            getattr(actor, method).remote(*(per_rank_args[r] if per_rank_args else args))
            for r, actor in enumerate(self.actors)
        ]
        rank_of = {ref: r for r, ref in enumerate(refs)}
        pending = list(refs)
        last_beats, last_change = None, time.monotonic()
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=self.poll_s)
            if done:
                failure = self._failure_of(done[0], rank_of[done[0]], method)
                if failure is not None:
                    raise self._root_failure(failure, pending, rank_of, method)
                last_change = time.monotonic()
                continue
            beats = self._heartbeats(sorted(rank_of[p] for p in pending), method)
            if beats != last_beats:
                last_beats, last_change = beats, time.monotonic()
            elif time.monotonic() - last_change > stall_after:
                rank = min(beats, key=lambda r: (beats[r]["step"], beats[r]["progress"]))
                raise RankFailure(rank, "stall", f"no progress for {stall_after:.0f} s "
                                  f"(step {beats[rank]['step']}, phase {beats[rank]['phase']})", method)
        return ray.get(refs)

    def _failure_of(self, ref, rank: int, method: str) -> RankFailure | None:

        try:
            ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            return RankFailure(rank, "died", _first_line(exc), method)
        except ray.exceptions.RayTaskError as exc:
            return RankFailure(rank, "exception", _root_cause(exc), method)
        return None

    def _root_failure(self, first: RankFailure, pending: list, rank_of: dict, method: str) -> RankFailure:
        """The root cause among the failures seen within ``grace_s`` of the first one.

        When a rank dies, its peers' collectives fail with connection errors, often before Ray reports
        the death; a dead rank or a rank's own exception outranks such consequences.
        """

        failures = [first]
        deadline = time.monotonic() + self.grace_s
        while pending and min(map(_severity, failures)) > 0 and time.monotonic() < deadline:
            finished, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            failures += [f for ref in finished if (f := self._failure_of(ref, rank_of[ref], method)) is not None]
        return min(failures, key=_severity)

    def _heartbeats(self, ranks: list[int], method: str) -> dict[int, dict]:
        """Heartbeats of ``ranks``; a rank that cannot answer within ``poll_s`` keeps its previous value."""

        refs = {r: self.actors[r].heartbeat.remote() for r in ranks}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=self.poll_s)
        beats = {}
        for r, ref in refs.items():
            if ref in ready:
                try:
                    beats[r] = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    raise RankFailure(r, "died", _first_line(exc), method) from None
            else:
                beats[r] = {"step": -1, "progress": -1, "phase": "unresponsive"}
        return beats

    def shutdown(self) -> None:
        """End of a job: kill the actors and release the placement group if this group owns them."""
        if self.owned:
            self.abort()

    def abort(self) -> None:
        """Kill every actor (survivors may be blocked in a collective) and release the placement group."""

        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        if self.placement_group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.placement_group)


# Messages of errors that are consequences of another rank's failure (a peer gone or silent).
_PEER_ERRORS = ("Connection closed by peer", "Connection reset", "Timed out", "timed out", "gloo", "Socket")


def _severity(failure: RankFailure) -> int:
    """Lower is more likely the root cause: a dead rank, a rank's own error, a stall, a peer's collective error."""
    if failure.kind == "died":
        return 0
    if failure.kind == "stall":
        return 2
    return 3 if any(p in failure.message for p in _PEER_ERRORS) else 1


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _root_cause(exc) -> str:
    cause = getattr(exc, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    return _first_line(exc)
