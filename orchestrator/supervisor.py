"""The supervisor: a small state machine that drives the rank workers through a job (DESIGN section 3).

``Supervisor.step()`` advances one transition::

    STARTING -> RUNNING -> (CHECKPOINTING -> RUNNING)* -> FINISHING -> FINISHED
        any rank failure -> RECOVERING -> STARTING (from the last committed checkpoint)
                         -> FAILED once train.max_restarts recoveries are spent

Decisions come from pure functions of the spec and the global counters (:func:`checkpoint_due`,
:func:`orchestrator.curriculum.plan_at`, :func:`recovery_decision`); the supervisor acts on them. The
worker group comes from an injected factory, so tests can hand it an existing pool of ranks or a fake.

On a failure (an exception, a dead actor, or a stall seen through heartbeats) every actor is killed,
because survivors may be blocked in a collective; a new group starts, restores the newest committed
checkpoint (verified against its manifest, and the restored step checked on every rank) and continues.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import time
from pathlib import Path
from collections.abc import Callable

from v4train.orchestrator import checkpoint
from v4train.orchestrator.curriculum import plan_at
from v4train.orchestrator.faults import SPIKE_LR_FACTOR, SUPERVISOR, Fault, die, parse_fault
from v4train.orchestrator.spike_guard import SpikeGuard
from v4train.orchestrator.spec import ClusterSpec, JobSpec
from v4train.orchestrator.storage import CREDENTIAL_ENV_VARS, Storage
from v4train.orchestrator.telemetry import Telemetry
from v4train.orchestrator.worker import RankFailure, WorkerGroup, free_port

__all__ = ["Phase", "Supervisor", "checkpoint_due", "recovery_decision"]


class Phase(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    CHECKPOINTING = "checkpointing"
    RECOVERING = "recovering"
    FINISHING = "finishing"
    FINISHED = "finished"
    FAILED = "failed"


def checkpoint_due(step: int, job: JobSpec) -> bool:
    """Whether a checkpoint is taken after optimizer ``step`` (every ``checkpoint.every_steps``, and at the end)."""
    every = job.checkpoint.every_steps
    if every and step % every == 0:
        return True
    return job.checkpoint.at_end and step == job.train.steps


def recovery_decision(restarts_so_far: int, job: JobSpec) -> Phase:
    """RECOVERING while the restart budget lasts, else FAILED."""
    return Phase.RECOVERING if restarts_so_far < job.train.max_restarts else Phase.FAILED


def _model_wide(stage_metrics) -> dict:
    """Auxiliary metrics of the whole model from one rank per pipeline stage (each reports its own layers):
    losses and dead experts summed, the worst load kept, router entropy averaged over stages."""
    rows = list(stage_metrics)
    out = {}
    for key in ("balance_loss", "moe_dead_experts"):
        if any(key in r for r in rows):
            out[key] = sum(r.get(key, 0.0) for r in rows)
    for key, combine in (("moe_max_load", max), ("moe_max_violation", max)):
        values = [r[key] for r in rows if key in r]
        if values:
            out[key] = combine(values)
    entropy = [r["moe_router_entropy"] for r in rows if "moe_router_entropy" in r]
    if entropy:
        out["moe_router_entropy"] = sum(entropy) / len(entropy)
    return out


class Supervisor:
    """Runs one job.

    Args:
        job, cluster: validated specs.
        run_dir: the run directory (telemetry; the default checkpoint root).
        make_workers: returns a fresh worker group with one rank per device of the layout; called at start
            and after every failure (the previous group is shut down first).
        telemetry: where metrics and events go.
        resume_from: name of a committed step directory under the checkpoint root to restore at start.
        faults: injected faults (``orchestrator/faults.py``), in addition to the job's ``faults``.
    """

    def __init__(
        self,
        job: JobSpec,
        cluster: ClusterSpec,
        run_dir: str,
        make_workers: Callable[[], WorkerGroup],
        telemetry: Telemetry,
        resume_from: str | None = None,
        faults: list[Fault] = (),
    ) -> None:
        self.job = job
        self.cluster = cluster
        self.run_dir = Path(run_dir)
        c = job.checkpoint
        self.storage = Storage(c.root or str(run_dir), endpoint_url=c.endpoint_url, region=c.region)
        self.make_workers = make_workers
        self.workers: WorkerGroup | None = None
        self.telemetry = telemetry
        self.resume_from = resume_from
        self.pending_faults = [parse_fault(f) for f in job.faults] + list(faults)
        self.phase = Phase.STARTING
        self.step_count = 0
        self.consumed_tokens = 0
        self.consumed_samples = 0
        self.last_committed: int | None = None
        self.restarts = 0
        self.failure: Exception | None = None
        self.val_loss: float | None = None
        self.consecutive_nonfinite = 0
        self.pending_save: dict | None = None
        self.curriculum_stage: int | None = None
        self.guard = SpikeGuard(job.spike_guard) if job.spike_guard.enabled else None
        self.counters_at: dict[int, tuple[int, int]] = {}  # snapshot step -> (consumed tokens, samples)
        self.ar_remaining = 0  # steps left with anticipatory routing on

    # ------------------------------------------------------------------ transitions
    def run(self) -> Phase:
        """Step until FINISHED or FAILED; returns the terminal phase. Always releases the workers."""
        try:
            while self.phase not in (Phase.FINISHED, Phase.FAILED):
                self.step()
        except BaseException:
            self._release_workers(abort=True)
            raise
        self._release_workers(abort=self.phase is Phase.FAILED)
        return self.phase

    def step(self) -> None:
        """Advance one transition; a failure moves to RECOVERING or FAILED with the cause recorded."""
        handlers = {
            Phase.STARTING: self._start,
            Phase.RUNNING: self._train_one,
            Phase.CHECKPOINTING: self._checkpoint,
            Phase.RECOVERING: self._recover,
            Phase.FINISHING: self._finish,
        }
        try:
            handlers[self.phase]()
        except RankFailure as exc:
            self._on_failure(exc, {"rank": exc.rank, "kind": exc.kind})
        except checkpoint.CheckpointError as exc:
            # A checkpoint that cannot be restored is not fixed by restarting: stop with its cause.
            self.failure = exc
            self.telemetry.event("failure", self.step_count, cause=str(exc), kind="checkpoint")
            self.phase = Phase.FAILED

    def _on_failure(self, exc: Exception, fields: dict) -> None:
        self.failure = exc
        self.pending_save = None  # its attempt stays uncommitted; retention deletes it after a successor
        self.pending_faults = [f for f in self.pending_faults if not self._fired(f)]
        self.telemetry.event("failure", self.step_count, cause=str(exc), restarts=self.restarts, **fields)
        self._release_workers(abort=True)
        self.phase = recovery_decision(self.restarts, self.job)

    def _fired(self, fault: Fault) -> bool:
        """Whether ``fault`` has had its chance in this attempt (so a recovered run must not meet it again)."""
        in_flight = self.step_count if self.phase is Phase.CHECKPOINTING else self.step_count + 1
        save_kind = fault.kind in ("kill_during_save", "kill_during_upload")
        return fault.step < in_flight or (fault.step == in_flight and save_kind == (self.phase is Phase.CHECKPOINTING))

    def _release_workers(self, abort: bool) -> None:
        if self.workers is not None:
            self.workers.abort() if abort else self.workers.shutdown()
            self.workers = None

    def _record_optimizer_assignment(self, infos: list[dict]) -> None:
        """Write every stage's parameter-to-optimizer-group table to ``RUN_DIR/optimizer.txt`` and print
        each stage's group summary (the table's head) with the file's path."""
        tables = [(i["pp_rank"], i["optimizer_assignment"]) for i in infos if i.get("optimizer_assignment")]
        text = "\n\n".join(f"pipeline stage {pp}\n{table}" for pp, table in sorted(tables))
        path = self.run_dir / "optimizer.txt"
        path.write_text(text + "\n")
        for pp, table in sorted(tables):
            lines = table.splitlines()
            summary = [line for line in lines[1:] if line.startswith("  ") and "params" in line]
            self.telemetry.console.print(f"stage {pp}: {lines[0]}", highlight=False, markup=False)
            for line in summary:
                self.telemetry.console.print(line, highlight=False, markup=False)
        self.telemetry.console.print(f"every parameter's group: {path}", highlight=False, markup=False)

    def _start(self) -> None:
        world = self.job.parallel.world_size
        init_method = f"tcp://127.0.0.1:{free_port()}"
        started = time.perf_counter()
        self.workers = self.make_workers()
        job = self.job.model_dump(mode="json")
        faults = [str(f) for f in self.pending_faults if f.rank != SUPERVISOR]
        env = {k: os.environ[k] for k in CREDENTIAL_ENV_VARS if k in os.environ}
        c = self.cluster
        # Setup (imports, rendezvous, model build) makes no step progress: bounded by the collective timeout.
        infos = self.workers.call(
            "setup",
            per_rank_args=[(job, r, world, init_method, c.collective_timeout_s, c.threads_per_rank, c.backend,
                            faults, env) for r in range(world)],
            timeout_s=self._io_timeout_s,
        )
        self.reporter = next(i["rank"] for i in infos if i["reporter"])
        # one rank per pipeline stage (data-parallel rank 0) for the model-wide auxiliary metrics
        self.stage_heads = [i["rank"] for i in sorted(infos, key=lambda i: i["pp_rank"]) if i["dp_rank"] == 0 and i["tp_rank"] == 0]
        self._record_optimizer_assignment(infos)
        fields = {"world_size": world, "layout": self.job.parallel.model_dump(),
                  "setup_s": round(time.perf_counter() - started, 2)}
        if self.resume_from is not None:
            fields["resumed_from"] = self._restore(self.resume_from)
        self.telemetry.event("start", self.step_count, **fields)
        self.phase = Phase.RUNNING if self.step_count < self.job.train.steps else Phase.FINISHING

    def _restore(self, name: str) -> str:
        """Verify and load committed checkpoint ``name`` on every rank; returns its URL."""
        state = checkpoint.verify(self.storage, name)
        self._check_resumable(name, state)
        try:
            steps = self.workers.call("load", self.storage.url, name, state, timeout_s=self._io_timeout_s)
        except RankFailure as exc:
            if exc.message.startswith("CheckpointError"):  # a rank refused the checkpoint: not recoverable
                raise checkpoint.CheckpointError(f"rank {exc.rank}: {exc.message}") from None
            raise
        if set(steps) != {int(state["step"])}:
            raise checkpoint.CheckpointError(f"{self.storage.url_of(name)}: ranks restored steps {steps}")
        self.step_count = int(state["step"])
        self.consumed_tokens = int(state["consumed_tokens"])
        self.consumed_samples = int(state["consumed_samples"])
        self.last_committed = self.step_count
        if self.guard is not None and state.get("spike_guard"):
            self.guard.load_state_dict(state["spike_guard"])
        self.ar_remaining = int(state["anticipatory_routing"].get("remaining", 0))
        self.telemetry.resume_at(self.step_count)
        return self.storage.url_of(name)

    def _check_resumable(self, name: str, state: dict) -> None:
        """Refuse, before step 1, a checkpoint that lacks state or was saved for another model or dataset."""
        for key in ("step", "consumed_tokens", "consumed_samples", "loader", "rng", "model", "data_path",
                    "curriculum", "anticipatory_routing"):
            if key not in state:
                raise checkpoint.CheckpointError(f"{self.storage.url_of(name)}/train_state.json: lacks {key!r}")
        if state["model"] != self.job.model.model_dump():
            raise checkpoint.CheckpointError(
                f"{self.storage.url_of(name)}: saved for model {state['model']}, this job has {self.job.model.model_dump()}"
            )

    @property
    def _io_timeout_s(self) -> float:
        """Bound on calls that make no step progress (setup, load, save): rendezvous and I/O, not heartbeats."""
        return max(self.cluster.collective_timeout_s, self.cluster.heartbeat_timeout_s)

    def _take_fault(self, kind: str, step: int) -> bool:
        """Remove and report a pending supervisor-side fault (``spike``, ``anticipatory``) for ``step``."""
        fault = next((f for f in self.pending_faults if f.kind == kind and f.step == step), None)
        if fault is not None:
            self.pending_faults.remove(fault)
        return fault is not None

    def _recover(self) -> None:
        """Count the restart and go back to STARTING from the newest committed checkpoint (or step 0)."""
        self.restarts += 1
        latest = checkpoint.latest_committed(self.storage)
        self.resume_from = latest
        from_step = int(checkpoint.read_train_state(self.storage, latest)["step"]) if latest else 0
        if latest is None:
            self.step_count = self.consumed_tokens = self.consumed_samples = 0
        self.telemetry.event("restart", from_step, restart=self.restarts, max_restarts=self.job.train.max_restarts,
                             from_checkpoint=self.storage.url_of(latest) if latest else None)
        self.phase = Phase.STARTING

    def _train_one(self) -> None:
        plan = plan_at(self.job, self.step_count + 1, self.consumed_tokens)
        if plan.stage != self.curriculum_stage:
            if self.curriculum_stage is not None or plan.stage:
                self.telemetry.event("stage_change", self.step_count, stage=plan.stage, seq_len=plan.seq_len,
                                     global_batch=plan.global_batch, micro_batch_size=plan.micro_batch_size,
                                     attention_mode=plan.attention_mode)
            self.curriculum_stage = plan.stage
        if self._take_fault("spike", plan.step):
            plan = dataclasses.replace(plan, lr=plan.lr * SPIKE_LR_FACTOR)
        if self._take_fault("anticipatory", plan.step):
            self.ar_remaining = self.job.spike_guard.anticipatory_steps
            self.telemetry.event("anticipatory_routing_on", self.step_count, steps=self.ar_remaining, delay_steps=1)
        if self.ar_remaining > 0:
            following = None
            if self.ar_remaining > 1 and plan.step < self.job.train.steps:
                following = plan_at(self.job, plan.step + 1, self.consumed_tokens + plan.global_batch_tokens).to_dict()
            plan = dataclasses.replace(plan, anticipatory_routing=True, prefetch_routing=following)
        results = self.workers.call("train_step", plan.to_dict())
        if plan.anticipatory_routing:
            self.ar_remaining -= 1
            if self.ar_remaining == 0:
                self.telemetry.event("anticipatory_routing_off", plan.step)
        record = dict(results[self.reporter])
        record["peak_rss_mb"] = max(r["peak_rss_mb"] for r in results)  # the largest rank's resident peak
        record.update(_model_wide(results[r] for r in self.stage_heads))
        self.step_count = plan.step
        self.consumed_tokens += plan.global_batch_tokens
        self.consumed_samples += plan.global_batch
        record.update(consumed_tokens=self.consumed_tokens, consumed_samples=self.consumed_samples,
                      restarts=self.restarts, time=time.time())
        self.telemetry.metrics(record)
        self._commit_pending(wait=False)
        if self.guard is not None and self._guard(record):
            return
        if record["skipped"]:
            self.consecutive_nonfinite += 1
            self.telemetry.event("nonfinite_grad", plan.step, grad_norm=record["grad_norm"],
                                 consecutive=self.consecutive_nonfinite)
            if self.consecutive_nonfinite >= self.job.train.max_consecutive_nonfinite:
                if self.job.train.nonfinite_policy == "rollback":
                    self._rollback_nonfinite(plan.step)
                    return
                self.failure = RuntimeError(f"{self.consecutive_nonfinite} consecutive steps with a non-finite gradient")
                self.telemetry.event("failure", plan.step, cause=str(self.failure), kind="nonfinite")
                self.phase = Phase.FAILED
                return
        else:
            self.consecutive_nonfinite = 0
        if self.job.train.eval_every and self.step_count % self.job.train.eval_every == 0:
            self._evaluate()
        if checkpoint_due(self.step_count, self.job):
            self.phase = Phase.CHECKPOINTING
        elif self.step_count >= self.job.train.steps:
            self.phase = Phase.FINISHING

    def _guard(self, record: dict) -> bool:
        """Feed the spike guard; on a spike roll back and return True (the step's results are discarded)."""
        step = record["step"]
        decision = self.guard.observe(record["loss"], record["grad_norm"])
        if not decision.spike:
            if step % self.job.spike_guard.snapshot_every == 0:
                self.counters_at[step] = (self.consumed_tokens, self.consumed_samples)
            return False
        self.telemetry.event("spike", step, loss=record["loss"], ema=decision.ema, reason=decision.reason)
        self._commit_pending(wait=True)
        skip = self.job.spike_guard.skip_data
        restored = set(self.workers.call("rollback", step - 2, skip))
        if len(restored) == 1 and (target := restored.pop()) >= 0:
            self.step_count = target
            self.consumed_tokens, self.consumed_samples = self.counters_at[target]
            source = "memory"
        else:
            latest = checkpoint.latest_committed(self.storage)
            if latest is None or int(checkpoint.read_train_state(self.storage, latest)["step"]) > step - 2:
                raise checkpoint.CheckpointError(f"spike at step {step}: no snapshot or checkpoint before step {step - 1}")
            self._restore(latest)
            source, skip = "checkpoint", False
        superseded = checkpoint.supersede_after(self.storage, self.step_count)
        if superseded:
            latest = checkpoint.latest_committed(self.storage)
            self.last_committed = int(checkpoint.read_train_state(self.storage, latest)["step"]) if latest else None
        self.telemetry.event("rollback", self.step_count, from_step=step, source=source, skipped_data=skip,
                             superseded=superseded)
        self.ar_remaining = self.job.spike_guard.anticipatory_steps
        if self.ar_remaining:
            self.telemetry.event("anticipatory_routing_on", self.step_count, steps=self.ar_remaining, delay_steps=1)
        return True

    def _rollback_nonfinite(self, step: int) -> None:
        """Escalation of ``nonfinite_policy: rollback``: restore the last committed checkpoint and skip the
        data window since it (the loader keeps its position; the step and token counters, hence the LR
        schedule and curriculum, return to the checkpoint's). Raises CheckpointError when none exists."""
        self._commit_pending(wait=True)
        latest = checkpoint.latest_committed(self.storage)
        if latest is None:
            raise checkpoint.CheckpointError(
                f"{self.consecutive_nonfinite} consecutive non-finite gradients at step {step} and no committed "
                "checkpoint to roll back to")
        cursor = self.workers.call("loader_state")[0]  # global: the same on every rank
        self._restore(latest)
        self.workers.call("set_loader_state", cursor)
        superseded = checkpoint.supersede_after(self.storage, self.step_count)
        self.telemetry.event("rollback", self.step_count, from_step=step, source="checkpoint", reason="nonfinite",
                             skipped_data=True, superseded=superseded)
        self.consecutive_nonfinite = 0

    def _checkpoint(self) -> None:
        """Request a save of the state after ``step_count``; commit now, or once persisted if asynchronous."""
        self._commit_pending(wait=True)
        step = self.step_count
        attempt = checkpoint.begin_attempt(self.storage, step)
        asynchronous = self.job.checkpoint.async_save and step < self.job.train.steps
        self.telemetry.event("checkpoint_requested", step, path=self.storage.url_of(attempt), asynchronous=asynchronous)
        started = time.perf_counter()
        rank_states = self.workers.call("save", self.storage.url, attempt, asynchronous, timeout_s=self._io_timeout_s)
        self.pending_save = {
            "step": step, "attempt": attempt, "requested": started, "blocked_s": time.perf_counter() - started,
            "train_state": {
                "step": step,
                "consumed_tokens": self.consumed_tokens,
                "consumed_samples": self.consumed_samples,
                "layout": self.job.parallel.model_dump(),
                "model": self.job.model.model_dump(),
                "data_path": self.job.data.path,
                "loader": rank_states[0]["loader"],
                "rng": {str(s["rank"]): s["rng"] for s in rank_states},
                "ranks": len(rank_states),
                # The plan is a function of (step, consumed_tokens); the stage is recorded for inspection.
                "curriculum": {"stage": self.curriculum_stage},
                "spike_guard": self.guard.state_dict() if self.guard is not None else {},
                "anticipatory_routing": {"remaining": self.ar_remaining, "delay_steps": 1,
                                         "rows": checkpoint.merge_routing(rank_states)},
            },
        }
        if not asynchronous:
            self._commit_pending(wait=True)
        self.phase = Phase.RUNNING if step < self.job.train.steps else Phase.FINISHING

    def _commit_pending(self, wait: bool) -> None:
        """Commit the requested save once every rank has persisted its shards (``wait``: block for that)."""
        pending = self.pending_save
        if pending is None:
            return
        if wait:
            self.workers.call("wait_saved", timeout_s=self._io_timeout_s)
        elif not all(self.workers.call("save_done", timeout_s=self._io_timeout_s)):
            return
        step = pending["step"]
        self.telemetry.event("checkpoint_persisted", step, seconds=round(time.perf_counter() - pending["requested"], 2),
                             training_blocked_s=round(pending["blocked_s"], 3))
        if any(f.kind == "kill_during_save" and f.rank == SUPERVISOR and f.step == step for f in self.pending_faults):
            die()
        final = checkpoint.commit(self.storage, pending["attempt"], step, pending["train_state"])
        self.pending_save = None
        self.last_committed = step
        deleted = checkpoint.apply_retention(self.storage, self.job.checkpoint.keep)
        self.telemetry.event("checkpoint_committed", step, path=self.storage.url_of(final),
                             seconds=round(time.perf_counter() - pending["requested"], 2), deleted=deleted)

    def _evaluate(self) -> None:
        t = self.job.train
        result = self.workers.call("evaluate", t.eval_batches, t.global_batch, t.micro_batch_size,
                                   t.eval_seq_len or self.job.data.seq_len)
        self.val_loss = result[self.reporter]["val_loss"]
        self.telemetry.event("eval", self.step_count, **result[self.reporter])

    def _finish(self) -> None:
        self._commit_pending(wait=True)
        if self.job.train.eval_batches and not (
            self.job.train.eval_every and self.step_count % self.job.train.eval_every == 0
        ):
            self._evaluate()
        self.telemetry.event("finish", self.step_count, val_loss=self.val_loss, last_committed=self.last_committed,
                             restarts=self.restarts)
        self.phase = Phase.FINISHED
