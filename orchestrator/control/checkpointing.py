"""The coordinator's side of checkpoints: when the ranks save, when a save is committed, what a restore
loads (docs/architecture.md principle 4, commit then believe; the protocol itself is
``orchestrator/checkpoint/commit.py``).

:class:`CheckpointCoordinator` opens an attempt directory, has every rank write its shards into it, and
commits it (manifest, ``COMMIT``, ``latest``) once every rank has persisted: at once for a synchronous save,
or at the first step boundary after the asynchronous writes finished. A restore verifies a committed
checkpoint against its manifest, refuses one of another format or model before any rank loads it, loads it
on every rank and checks that all of them reached its step. Every file operation runs once per job
(:meth:`RankGroup.coordinate`), whichever process drives the ranks.

Retention (deleting abandoned attempts and committed checkpoints beyond ``checkpoint.keep``) is decided when a
commit returns and carried out on a thread of its own (:class:`Retention`), so a save is complete, COMMIT and
``latest`` durable, without waiting for a whole step directory's unlinks; every later storage operation of the
coordinator (the next save's attempt, a restore, a listing) and the end of the run wait for it first.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from dataclasses import dataclass

from v4train.orchestrator import checkpoint
from v4train.orchestrator.control.rank_group import RankFailure, RankGroup
from v4train.orchestrator.control.run_state import RunState, SavedState, read_train_state
from v4train.orchestrator.faults import SUPERVISOR, Fault, die
from v4train.orchestrator.recovery.fault_taxonomy import classify
from v4train.orchestrator.spec import JobSpec
from v4train.orchestrator.checkpoint.storage import Storage

__all__ = ["CheckpointCoordinator", "Retention"]

log = logging.getLogger(__name__)


@dataclass
class _PendingSave:
    step: int
    attempt: str
    requested: float  # time.perf_counter() when the save was asked for
    blocked_s: float  # how long training waited for the ranks to copy their state
    train_state: dict
    persisted: bool  # every rank's shards are durable already (a synchronous save returns only then)


class Retention:
    """Deletes expired checkpoint directories on one background thread, one batch at a time.

    A deletion that fails (a storage error past its retries) is logged and left: the next commit's retention
    lists the same directories again (:func:`checkpoint.expired`).
    """

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="checkpoint-retention")
        self._pending: concurrent.futures.Future | None = None

    def start(self, names: list[str]) -> None:
        """Delete ``names`` (directories relative to the root) in the background."""
        self.wait()
        if names:
            self._pending = self._thread.submit(self._remove, names)

    def wait(self) -> None:
        """Block until the deletions started last have finished."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _remove(self, names: list[str]) -> None:
        for name in names:
            try:
                self.storage.remove(name)
            except OSError as exc:
                log.warning("checkpoint retention: %s not deleted (%s); retried after the next commit",
                            self.storage.url_of(name), exc)


class CheckpointCoordinator:
    """Saves and restores of one job under its checkpoint root.

    Args:
        job: the job spec (checkpoint policy, model, layout).
        telemetry: receives ``checkpoint_requested``, ``checkpoint_persisted``, ``checkpoint_committed``, and
            ``checkpoint_failed`` when committing hit a storage error that outlived its retries (a transient
            fault: the run goes on, ``latest`` unchanged).
        io_timeout_s: bound on calls that make no step progress (save, load).
        faults: the supervisor's pending faults (``kill_during_save`` with ``rank=supervisor`` fires
            between the last shard and ``COMMIT``).
    """

    def __init__(self, job: JobSpec, storage: Storage, telemetry, io_timeout_s: float, faults: list[Fault]):
        self.job = job
        self.storage = storage
        self.telemetry = telemetry
        self.io_timeout_s = io_timeout_s
        self.faults = faults
        self.pending: _PendingSave | None = None
        self.retention = Retention(storage)

    # ---------------------------------------------------------------- queries (once per job)
    def latest(self, group: RankGroup) -> str | None:
        """The newest committed step directory, or None."""
        return group.coordinate(lambda: self._settled(checkpoint.latest_committed))

    def step_of(self, group: RankGroup, name: str) -> int:
        return int(group.coordinate(lambda: self._settled(checkpoint.read_train_state, name))["step"])

    def _settled(self, fn, *args):
        """``fn(self.storage, *args)`` once retention's deletions are done (never racing them)."""
        self.retention.wait()
        return fn(self.storage, *args)

    # ---------------------------------------------------------------- saves
    def request(self, group: RankGroup, state: RunState) -> RunState:
        """Have every rank save the state after ``state.step``; commit now, or later if asynchronous."""
        state = self.commit_pending(group, state, wait=True)
        step = state.step
        attempt = group.coordinate(lambda: self._settled(checkpoint.begin_attempt, step))
        asynchronous = self.job.checkpoint.async_save and step < self.job.train.steps
        self.telemetry.event("checkpoint_requested", step, path=self.storage.url_of(attempt), asynchronous=asynchronous)
        started = time.perf_counter()
        saves = group.save(self.storage.url, attempt, asynchronous, self.io_timeout_s)
        saved = SavedState(loader=saves[0].loader, rng={str(s.rank): s.rng for s in saves}, ranks=len(saves),
                           routing_rows=checkpoint.merge_routing(saves))
        self.pending = _PendingSave(step, attempt, started, time.perf_counter() - started,
                                    state.to_train_state(self.job, saved), persisted=not asynchronous)
        return state if asynchronous else self.commit_pending(group, state, wait=True)

    def commit_pending(self, group: RankGroup, state: RunState, wait: bool) -> RunState:
        """Commit the requested save once every rank has persisted its shards (``wait``: block for that)."""
        pending = self.pending
        if pending is None:
            return state
        if not pending.persisted:  # a synchronous save returned with every rank's shards durable: no round trip
            if wait:
                group.wait_saved(self.io_timeout_s)
            elif not group.save_done(self.io_timeout_s):
                return state
        step = pending.step
        # after_step: the last step trained while the save was in the background (the C16 benchmark charges a
        # save the extra time of those steps and of the next one, which holds the commit)
        self.telemetry.event("checkpoint_persisted", step, seconds=round(time.perf_counter() - pending.requested, 2),
                             training_blocked_s=round(pending.blocked_s, 3), after_step=state.step)
        self.pending = None
        try:
            final, deleted = group.coordinate(lambda: self._commit(pending))
        except OSError as exc:  # storage; a refused credential or a missing bucket is deterministic
            verdict = classify(exc)
            if verdict.deterministic:
                raise
            # A storage error that outlived its retries: this save is lost, the run is not. ``latest`` still
            # names the previous commit; the attempt is deleted by retention after the next commit.
            self.telemetry.event("checkpoint_failed", step, error=verdict.cause, latest=self.latest(group))
            return state
        self.telemetry.event("checkpoint_committed", step, path=self.storage.url_of(final),
                             seconds=round(time.perf_counter() - pending.requested, 2), deleted=deleted)
        return state.replace(last_committed=step)

    def _commit(self, pending: _PendingSave) -> tuple[str, list[str]]:
        if any(f.kind == "kill_during_save" and f.rank == SUPERVISOR and f.step == pending.step for f in self.faults):
            die()
        self.retention.wait()  # the listing below must not see a deletion half done
        # the attempt's name tells a rank that kept a copy of what it wrote there that the copy is this commit
        final = checkpoint.commit(self.storage, pending.attempt, pending.step,
                                  {**pending.train_state, "attempt": pending.attempt})
        deleted = checkpoint.expired(self.storage, self.job.checkpoint.keep)
        self.retention.start(deleted)
        return final, deleted

    # ---------------------------------------------------------------- restores
    def restore(self, group: RankGroup, state: RunState, name: str) -> tuple[RunState, str]:
        """Verify and load committed checkpoint ``name`` on every rank; the restored state and its URL.

        Raises CheckpointError when it fails verification, lacks state, was saved for another model, or a
        rank refuses it (none of which a restart would fix).
        """
        where = self.storage.url_of(name)

        def verified() -> dict:
            return read_train_state(self._settled(checkpoint.verify, name), where, self.job)

        train_state = group.coordinate(verified)
        try:
            steps = group.load(self.storage.url, name, train_state, self.io_timeout_s)
        except RankFailure as exc:
            if exc.message.startswith("CheckpointError"):  # a rank refused the checkpoint: not recoverable
                raise checkpoint.CheckpointError(f"rank {exc.rank}: {exc.message}") from None
            raise
        if set(steps) != {int(train_state["step"])}:
            raise checkpoint.CheckpointError(f"{where}: ranks restored steps {steps}")
        self.telemetry.resume_at(int(train_state["step"]))
        return state.restored(train_state), where

    def supersede_after(self, group: RankGroup, state: RunState) -> tuple[RunState, list[str]]:
        """Set aside committed checkpoints newer than ``state.step`` (a rollback abandoned their trajectory)."""

        def move() -> tuple[list[str], int | None]:
            moved = self._settled(checkpoint.supersede_after, state.step)
            latest = checkpoint.latest_committed(self.storage)
            newest = int(checkpoint.read_train_state(self.storage, latest)["step"]) if latest else None
            return moved, newest

        moved, newest = group.coordinate(move)
        return (state.replace(last_committed=newest) if moved else state), moved
