"""The supervisor: a small state machine that drives the rank workers through a job (DESIGN section 3).

``Supervisor.step()`` advances one transition::

    STARTING -> RUNNING -> (CHECKPOINTING -> RUNNING)* -> FINISHING -> FINISHED
                                   any failure -> FAILED

Decisions (is a checkpoint due? what does step N run?) come from pure functions of the spec and the
global counters (:func:`checkpoint_due`, :func:`orchestrator.curriculum.plan_step`); the supervisor acts on
them. The worker group is injected, so tests can hand it an existing pool of ranks or a fake.
Automatic recovery from rank failures (restart from the last commit) is issue 6; here a failure ends the
run with the rank and root cause, and ``v4train resume`` continues from the last committed checkpoint.
"""

from __future__ import annotations

import enum
import time
from pathlib import Path

from orchestrator import checkpoint
from orchestrator.curriculum import plan_step
from orchestrator.spec import ClusterSpec, JobSpec
from orchestrator.telemetry import Telemetry
from orchestrator.worker import RankFailure, WorkerGroup, free_port

__all__ = ["Phase", "Supervisor", "checkpoint_due"]


class Phase(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    CHECKPOINTING = "checkpointing"
    FINISHING = "finishing"
    FINISHED = "finished"
    FAILED = "failed"


def checkpoint_due(step: int, job: JobSpec) -> bool:
    """Whether a checkpoint is taken after optimizer ``step`` (every ``checkpoint.every_steps``, and at the end)."""
    every = job.checkpoint.every_steps
    if every and step % every == 0:
        return True
    return job.checkpoint.at_end and step == job.train.steps


class Supervisor:
    """Runs one job on a worker group.

    Args:
        job, cluster: validated specs.
        run_dir: the run directory (``job.yaml`` and telemetry go there).
        workers: the rank workers, one per rank of ``job.parallel``; not owned (the caller shuts them down).
        telemetry: where metrics and events go.
        resume_from: a committed step directory to restore before step 1 of this session, or None.
    """

    def __init__(
        self,
        job: JobSpec,
        cluster: ClusterSpec,
        run_dir: str | Path,
        workers: WorkerGroup,
        telemetry: Telemetry,
        resume_from: str | Path | None = None,
    ) -> None:
        self.job = job
        self.cluster = cluster
        self.run_dir = Path(run_dir)
        self.ckpt_root = Path(job.checkpoint.root) if job.checkpoint.root else self.run_dir
        self.workers = workers
        self.telemetry = telemetry
        self.resume_from = Path(resume_from) if resume_from else None
        self.phase = Phase.STARTING
        self.step_count = 0
        self.consumed_tokens = 0
        self.consumed_samples = 0
        self.last_committed: int | None = None
        self.failure: RankFailure | str | None = None
        self.val_loss: float | None = None

    # ------------------------------------------------------------------ transitions
    def run(self) -> Phase:
        """Step until FINISHED or FAILED; returns the terminal phase."""
        while self.phase not in (Phase.FINISHED, Phase.FAILED):
            self.step()
        return self.phase

    def step(self) -> None:
        """Advance one transition; a RankFailure or CheckpointError moves to FAILED with the cause recorded."""
        handlers = {
            Phase.STARTING: self._start,
            Phase.RUNNING: self._train_one,
            Phase.CHECKPOINTING: self._checkpoint,
            Phase.FINISHING: self._finish,
        }
        try:
            handlers[self.phase]()
        except (RankFailure, checkpoint.CheckpointError) as exc:
            self.failure = exc
            fields = {"cause": str(exc)}
            if isinstance(exc, RankFailure):
                fields.update(rank=exc.rank, kind=exc.kind)
            self.telemetry.event("failure", self.step_count, **fields)
            self.phase = Phase.FAILED

    def _start(self) -> None:
        world = self.job.parallel.world_size
        init_method = f"tcp://127.0.0.1:{free_port()}"
        started = time.perf_counter()
        infos = self.workers.call(
            "setup",
            per_rank_args=[
                (self.job.model_dump(mode="json"), r, world, init_method, self.cluster.collective_timeout_s,
                 self.cluster.threads_per_rank, self.cluster.backend)
                for r in range(world)
            ],
        )
        self.reporter = next(i["rank"] for i in infos if i["reporter"])
        fields = {"world_size": world, "layout": self.job.parallel.model_dump(),
                  "setup_s": round(time.perf_counter() - started, 2)}
        if self.resume_from is not None:
            state = checkpoint.verify(self.resume_from)
            self._check_resumable(state)
            self.workers.call("load", str(self.resume_from), state)
            self.step_count = int(state["step"])
            self.consumed_tokens = int(state["consumed_tokens"])
            self.consumed_samples = int(state["consumed_samples"])
            self.last_committed = self.step_count
            self.telemetry.resume_at(self.step_count)
            fields["resumed_from"] = str(self.resume_from)
        self.telemetry.event("start", self.step_count, **fields)
        self.phase = Phase.RUNNING if self.step_count < self.job.train.steps else Phase.FINISHING

    def _check_resumable(self, state: dict) -> None:
        """Refuse, before step 1, a checkpoint whose model or data does not match this job."""
        for key in ("step", "consumed_tokens", "consumed_samples", "ranks", "model", "data_path"):
            if key not in state:
                raise checkpoint.CheckpointError(f"{self.resume_from}/train_state.json: lacks {key!r}")
        model_now = self.job.model.model_dump()
        if state["model"] != model_now:
            raise checkpoint.CheckpointError(
                f"{self.resume_from}: saved for model {state['model']}, this job has {model_now}"
            )

    def _train_one(self) -> None:
        plan = plan_step(self.job, self.step_count + 1)
        results = self.workers.call("train_step", plan.to_dict())
        record = dict(results[self.reporter])
        self.step_count = plan.step
        self.consumed_tokens += plan.global_batch_tokens
        self.consumed_samples += plan.global_batch
        record["consumed_tokens"] = self.consumed_tokens
        record["consumed_samples"] = self.consumed_samples
        self.telemetry.metrics(record)
        if self.job.train.eval_every and self.step_count % self.job.train.eval_every == 0:
            self._evaluate()
        if checkpoint_due(self.step_count, self.job):
            self.phase = Phase.CHECKPOINTING
        elif self.step_count >= self.job.train.steps:
            self.phase = Phase.FINISHING

    def _checkpoint(self) -> None:
        step = self.step_count
        started = time.perf_counter()
        attempt = checkpoint.begin_attempt(self.ckpt_root, step)
        self.telemetry.event("checkpoint_requested", step, path=str(attempt))
        rank_states = self.workers.call("save", str(attempt))
        train_state = {
            "step": step,
            "consumed_tokens": self.consumed_tokens,
            "consumed_samples": self.consumed_samples,
            "layout": self.job.parallel.model_dump(),
            "model": self.job.model.model_dump(),
            "data_path": self.job.data.path,
            "loader": rank_states[0]["loader"],
            "rng": {str(s["rank"]): s["rng"] for s in rank_states},
            "ranks": len(rank_states),
        }
        final = checkpoint.commit(attempt, step, train_state)
        self.last_committed = step
        deleted = checkpoint.apply_retention(self.ckpt_root, self.job.checkpoint.keep)
        self.telemetry.event(
            "checkpoint_committed", step, path=str(final), seconds=round(time.perf_counter() - started, 2),
            bytes=checkpoint.describe_bytes(final), deleted=[p.name for p in deleted],
        )
        self.phase = Phase.RUNNING if step < self.job.train.steps else Phase.FINISHING

    def _evaluate(self) -> None:
        t = self.job.train
        result = self.workers.call("evaluate", t.eval_batches, t.global_batch, t.micro_batch_size, self.job.data.seq_len)
        self.val_loss = result[self.reporter]["val_loss"]
        self.telemetry.event("eval", self.step_count, **result[self.reporter])

    def _finish(self) -> None:
        if self.job.train.eval_batches and not (
            self.job.train.eval_every and self.step_count % self.job.train.eval_every == 0
        ):
            self._evaluate()
        self.telemetry.event("finish", self.step_count, val_loss=self.val_loss, last_committed=self.last_committed)
        self.phase = Phase.FINISHED
