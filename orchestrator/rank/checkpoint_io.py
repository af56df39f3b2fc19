"""Rank-side checkpoint I/O: write this rank's shards into a checkpoint attempt, read them back.

Tensors go through torch DCP by global name (``orchestrator/checkpoint/shards.py``: :func:`shard_state`,
:func:`load_shards`), so any layout reads any other's checkpoint. The state written is the host copy the rank
keeps of each save (``saved_copies.py``), which training never touches: an asynchronous save writes that copy
on a background thread while training goes on, with no second staging copy; that thread runs at the lowest CPU
priority (:func:`background_priority`), so its file writes, hashing and planning take the CPU time the training
step leaves idle instead of slowing the step. Its collectives run on a gloo
group of their own, so they never interleave with the training step's on the default group. Saves on one
group after its first replay that save's layout without DCP's collectives
(``orchestrator/checkpoint/save_plan.py``; a new group plans afresh). The
coordinator commits the attempt once every rank reports its save persisted
(``orchestrator/control/checkpointing.py``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import os
import weakref

import torch
import torch.distributed as dist

from v4train.orchestrator import checkpoint, faults
from v4train.orchestrator.checkpoint import save_plan
from v4train.orchestrator.checkpoint.dcp_storage import save as dcp_save
from v4train.orchestrator.checkpoint.storage import Storage
from v4train.orchestrator.spec import JobSpec

__all__ = ["RankCheckpointIO", "background_priority"]


def background_priority() -> None:
    """Put the calling thread (only it) in Linux's ``SCHED_IDLE`` class: it runs when a core has nothing else to
    run, so an asynchronous save's work does not take CPU from the training step (``nice`` cannot do it when the
    rank already runs at nice 19). The big writes and sha256 updates release the GIL, so the step's thread
    seldom waits for this one. A no-op where the platform lacks ``SCHED_IDLE``."""
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


class RankCheckpointIO:
    """This rank's checkpoint writes and reads.

    Args:
        job: the job spec (its checkpoint section locates S3 endpoints).
        inject: this rank's injected faults by (kind, step) (``kill_during_save``, ``kill_during_upload``).
        timeout_s: bound on the save group's collectives (seconds).
    """

    def __init__(self, job: JobSpec, inject: dict, timeout_s: float) -> None:
        self.job = job
        self.faults = inject
        self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
        self.generation = save_plan.new_generation()  # this group's save plans, never another group's
        weakref.finalize(self, save_plan.forget, self.generation)
        self.pending = None  # (step, future) of an asynchronous save
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="checkpoint-writer",
                                                             initializer=background_priority)

    def storage(self, root: str) -> Storage:
        c = self.job.checkpoint
        return Storage(root, endpoint_url=c.endpoint_url, region=c.region)

    def write(self, root: str, attempt: str, step: int, state: dict[str, torch.Tensor], asynchronous: bool) -> None:
        """Write ``state`` (this rank's tensors by global name) into ``attempt`` under ``root`` (collective);
        with ``asynchronous`` in the background (:meth:`done`, :meth:`wait`), in which case nothing may
        modify ``state`` until it has persisted (the trainer passes its saved copy)."""
        writer = self.storage(root).dcp_writer(attempt)
        if ("kill_during_upload", step) in self.faults:
            writer = faults.dying_writer(writer)
        planner = save_plan.CachedSavePlanner(self.generation)
        if asynchronous:
            future = self._writer.submit(dcp_save, state, storage_writer=writer, planner=planner,
                                         process_group=self.group)
            self.pending = (step, future)
        else:
            dcp_save(state, storage_writer=writer, planner=planner, process_group=self.group)
            self._after_persisted(step)

    def done(self) -> bool:
        """Whether the pending asynchronous save (if any) has persisted; re-raises its error."""
        if self.pending is not None and self.pending[1].done():
            self.wait()
        return self.pending is None

    def wait(self) -> None:
        """Block until the pending asynchronous save has persisted; re-raises its error."""
        if self.pending is not None:
            step, future = self.pending
            future.result()
            self.pending = None
            self._after_persisted(step)

    def _after_persisted(self, step: int) -> None:
        if ("kill_during_save", step) in self.faults:
            faults.die()

    def read(self, root: str, name: str, stage, optimizer, tp) -> None:
        """Load model and optimizer state of committed checkpoint ``name`` into this rank's stage
        (collective); raises CheckpointError naming missing or mis-shaped tensors before changing anything."""
        checkpoint.load_shards(self.storage(root), name, stage, optimizer, tp)
