"""The supervisor: a small state machine that drives a :class:`RankGroup` through a job
(docs/architecture.md section 3).

``Supervisor.step()`` advances one transition::

    STARTING -> RUNNING -> (CHECKPOINTING -> RUNNING)* -> FINISHING -> FINISHED
        a transient fault -> RECOVERING -> STARTING (from the last committed checkpoint)
                          -> FAILED once train.max_restarts recoveries are spent
        a deterministic fault -> FAILED at once, with one line naming its file, field, tensor or rank

Every choice comes from the pure policies of ``orchestrator/control/decisions.py`` applied to the typed
:class:`RunState`; the supervisor carries them out (``orchestrator/recovery/`` holds the recovery actions).
The rank group comes from an injected factory: Ray actors (``v4train submit``), the torchrun/srun processes
(``python -m v4train.orchestrator.launch``, where every process runs this same loop) or a test's fake.

Every failure is classified first (``orchestrator/recovery/fault_taxonomy.py``): bad data, a checkpoint that
fails verification, a refused credential or a fault that repeats at the same step after a restart stops the
run without spending the restart budget. On a transient failure (a dead actor, a stall seen through
heartbeats, a lost peer, a rank's other exceptions) the group keeps its healthy rank processes where it can
(:meth:`RankGroup.rejoin`: the failed rank's process is replaced, the others leave their process groups and
set up again in place); otherwise every rank is released, because survivors may be blocked in a collective,
and a new group starts. Either way the ranks restore the newest committed checkpoint (verified against its
manifest, and the restored step checked on every rank) and continue.
"""

from __future__ import annotations

import enum
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from v4train.orchestrator import checkpoint
from v4train.orchestrator.control.checkpointing import CheckpointCoordinator
from v4train.orchestrator.control.decisions import (Decision, decide, eval_request, final_evaluation_due, plan_next,
                                                    restart_allowed)
from v4train.orchestrator.control.rank_group import RankFailure, RankGroup, RankInfo, SetupRequest
from v4train.orchestrator.control.router_watch import RouterWatch
from v4train.orchestrator.control.run_state import RunState
from v4train.orchestrator.faults import SUPERVISOR, Fault, parse_fault, take_fault
from v4train.orchestrator.recovery import nonfinite, restart, spike_rollback
from v4train.orchestrator.recovery.fault_taxonomy import DeterministicFault, FaultHistory, Verdict
from v4train.orchestrator.spec import ClusterSpec, JobSpec
from v4train.orchestrator.tools.placement import rank_nodes
from v4train.orchestrator.checkpoint.storage import CREDENTIAL_ENV_VARS, Storage

__all__ = ["Phase", "Supervisor"]


class Phase(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    CHECKPOINTING = "checkpointing"
    RECOVERING = "recovering"
    FINISHING = "finishing"
    FINISHED = "finished"
    FAILED = "failed"


def _model_wide(stage_metrics) -> dict:
    """Auxiliary metrics of the whole model from one rank per pipeline stage (each reports its own layers):
    losses and dead experts summed, the worst load kept, router entropy averaged over stages, and every
    layer's ``router/<layer>/...`` health."""
    rows = list(stage_metrics)
    out = {}
    for key in ("balance_loss", "moe_dead_experts"):
        if any(key in r for r in rows):
            out[key] = sum(r.get(key, 0.0) for r in rows)
    for key in ("moe_max_load", "moe_max_violation"):
        values = [r[key] for r in rows if key in r]
        if values:
            out[key] = max(values)
    entropy = [r["moe_router_entropy"] for r in rows if "moe_router_entropy" in r]
    if entropy:
        out["moe_router_entropy"] = sum(entropy) / len(entropy)
    for r in rows:  # per-layer router health, already reduced over each stage's data-parallel group
        out.update({k: v for k, v in r.items() if k.startswith("router/")})
    return out


class Supervisor:
    """Runs one job.

    Args:
        job, cluster: validated specs.
        run_dir: the run directory (telemetry; the default checkpoint root).
        make_workers: returns a fresh rank group with one rank per device of the layout; called at start
            and after a failure the group could not recover from in place (it is released first).
        telemetry: where metrics and events go.
        resume_from: name of a committed step directory under the checkpoint root to restore at start.
        faults: injected faults (``orchestrator/faults.py``), in addition to the job's ``faults``.
        max_restarts: overrides ``train.max_restarts`` (0 where failed processes cannot be replaced).
        restarts: restarts already made by the launcher before this supervisor started (torchrun's restart
            count), reported with the run's own.
    """

    def __init__(self, job: JobSpec, cluster: ClusterSpec, run_dir: str, make_workers: Callable[[], RankGroup],
                 telemetry, resume_from: str | None = None, faults: list[Fault] = (),
                 max_restarts: int | None = None, restarts: int = 0) -> None:
        if max_restarts is not None:
            job = job.model_copy(update={"train": job.train.model_copy(update={"max_restarts": max_restarts})})
        self.job = job
        self.cluster = cluster
        self.run_dir = Path(run_dir)
        c = job.checkpoint
        self.storage = Storage(c.root or str(run_dir), endpoint_url=c.endpoint_url, region=c.region)
        self.make_workers = make_workers
        self.workers: RankGroup | None = None
        self.telemetry = telemetry
        self.resume_from = resume_from
        self.pending_faults = [parse_fault(f) for f in job.faults] + list(faults)
        self.phase = Phase.STARTING
        self.state = RunState(restarts=restarts)
        self.failure: Exception | None = None
        self.fault_history = FaultHistory()
        self.val_loss: float | None = None
        self.counters_at: dict[int, tuple[int, int]] = {}  # snapshot step -> (consumed tokens, samples)
        self.teardown: dict = {}  # how the last failure's group was torn down, for the restart event
        self.router_watch = RouterWatch(job.router_health)
        self.checkpoints = CheckpointCoordinator(job, self.storage, telemetry, self._io_timeout_s, self.pending_faults)

    @property
    def step_count(self) -> int:
        return self.state.step

    @property
    def restarts(self) -> int:
        return self.state.restarts

    @property
    def last_committed(self) -> int | None:
        return self.state.last_committed

    @property
    def _io_timeout_s(self) -> float:
        """Bound on calls that make no step progress (setup, load, save): rendezvous and I/O, not heartbeats."""
        return max(self.cluster.collective_timeout_s, self.cluster.heartbeat_timeout_s)

    # ------------------------------------------------------------------ transitions
    def run(self) -> Phase:
        """Step until FINISHED or FAILED; returns the terminal phase. Always releases the workers."""
        try:
            while self.phase not in (Phase.FINISHED, Phase.FAILED):
                self.step()
        except BaseException:
            self._release_workers(abort=True)
            raise
        finally:
            self.checkpoints.retention.wait()  # no deletion outlives the run
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
        except Exception as exc:
            verdict = self.fault_history.classify(exc, self.state.step)
            if verdict.deterministic:
                self._stop(exc, verdict)
            elif isinstance(exc, RankFailure):
                self._on_failure(exc, {"rank": exc.rank, "kind": exc.kind, "fault_class": "transient"})
            else:  # the supervisor's own error: recorded, then raised (a restart would not fix the supervisor)
                self.telemetry.event("failure", self.state.step, cause=verdict.cause, fault_class="supervisor",
                                     restarts=self.state.restarts)
                raise

    def _stop(self, exc: Exception, verdict: Verdict) -> None:
        """A deterministic fault: stop now, restart budget untouched; ``failure`` is its one line."""
        fields = {"rank": exc.rank, "kind": exc.kind} if isinstance(exc, RankFailure) else {}
        if isinstance(exc, checkpoint.CheckpointError):
            fields["kind"] = "checkpoint"
        step = self.state.step
        if self.phase is Phase.RUNNING:
            when = f"in step {step + 1}"
        elif self.phase is Phase.STARTING and self.resume_from is not None:  # the counters are not restored yet
            when = f"while starting from {self.resume_from}"
        else:
            when = f"at step {step} ({self.phase.value})"
        self.failure = DeterministicFault(f"deterministic fault {when}: {verdict.cause} ({verdict.reason}; "
                                          "not restarted)")
        self.telemetry.event("failure", self.state.step, cause=verdict.cause, fault_class="deterministic",
                             reason=verdict.reason, restarts=self.state.restarts, **fields)
        self._release_workers(abort=True)
        self.phase = Phase.FAILED

    def _on_failure(self, exc: Exception, fields: dict) -> None:
        self.failure = exc
        self.checkpoints.pending = None  # its attempt stays uncommitted; retention deletes it after a successor
        checkpointing = self.phase is Phase.CHECKPOINTING
        self.pending_faults[:] = [f for f in self.pending_faults
                                  if not restart.fired(f, self.state.step, checkpointing)]
        self.telemetry.event("failure", self.state.step, cause=str(exc), restarts=self.state.restarts, **fields)
        started = time.perf_counter()
        allowed = restart_allowed(self.state, self.job)
        kept = allowed and isinstance(exc, RankFailure) and self.workers is not None \
            and self.workers.rejoin(exc, self._rejoin_timeout_s)
        if not kept:
            self._release_workers(abort=True)
        self.teardown = {"teardown_s": round(time.perf_counter() - started, 2), "ranks_kept": bool(kept)}
        self.phase = Phase.RECOVERING if allowed else Phase.FAILED

    def _release_workers(self, abort: bool) -> None:
        if self.workers is not None:
            self.workers.abort() if abort else self.workers.shutdown()
            self.workers = None

    def _on_ranks(self, fault: Fault) -> list[Fault]:
        """``fault`` as one per rank: a node fault on each rank its node holds (``ClusterSpec.ranks_per_node``)."""
        if fault.node is None:
            return [fault]
        shares = self.cluster.ranks_per_node(self.job.parallel.world_size, self.job.parallel.tp)
        return fault.on_ranks(rank_nodes(shares))

    @property
    def _rejoin_timeout_s(self) -> float:
        """How long the surviving ranks' calls may take to return after a failure before the group is
        released instead: a rank that fails leaves its groups, so its peers fail within seconds."""
        return min(30.0, self._io_timeout_s)

    def _start(self) -> None:
        started = time.perf_counter()
        if self.workers is None:
            self.workers = self.make_workers()
        created_s = time.perf_counter() - started
        request = SetupRequest(
            self.job, self.cluster.collective_timeout_s, self.cluster.threads_per_rank, self.cluster.backend,
            device=self.cluster.device,
            faults=[str(r) for f in self.pending_faults if f.rank != SUPERVISOR for r in self._on_ranks(f)],
            env={k: os.environ[k] for k in CREDENTIAL_ENV_VARS if k in os.environ},
            interface=self.cluster.interface, checkpoint_root=self.storage.url)
        # Setup (imports, rendezvous, model build) makes no step progress: bounded by the collective timeout.
        infos = self.workers.setup(request, self._io_timeout_s)
        self.reporter = next(i.rank for i in infos if i.reporter)
        # one rank per pipeline stage (data-, context- and tensor-parallel rank 0) for the model-wide auxiliary
        # metrics (the CP ranks' shares are summed on the ranks)
        self.stage_heads = [i.rank for i in sorted(infos, key=lambda i: i.pp_rank)
                            if i.dp_rank == 0 and i.cp_rank == 0 and i.tp_rank == 0]
        self.workers.coordinate(lambda: self._record_optimizer_assignment(infos))
        self.workers.coordinate(lambda: self._record_placement(infos))
        fields = {"world_size": self.job.parallel.world_size, "layout": self.job.parallel.model_dump(),
                  "launcher": self.workers.launcher, "setup_s": round(time.perf_counter() - started, 2)}
        if getattr(self.workers, "setup_laps", None):  # the Ray group's parts of the set-up
            fields["setup_parts_s"] = {"create": round(created_s, 3), **self.workers.setup_laps}
        self.resume_from = self.workers.coordinate(self._resume_target)
        if self.resume_from is not None:
            restore_started = time.perf_counter()
            self.state, fields["resumed_from"] = self.checkpoints.restore(self.workers, self.state, self.resume_from)
            fields["restore_s"] = round(time.perf_counter() - restore_started, 2)
            # Resuming an earlier step abandons the newer commits' trajectory: set them aside, as a rollback does.
            self.state, superseded = self.checkpoints.supersede_after(self.workers, self.state)
            if superseded:
                fields["superseded"] = superseded
        self.telemetry.event("start", self.state.step, **fields)
        self.phase = Phase.RUNNING if self.state.step < self.job.train.steps else Phase.FINISHING

    def _resume_target(self) -> str | None:
        """The committed step this start restores, as the coordinator knows it. Under torchrun every process
        runs this loop, and each takes rank 0's answer: another rank's view of a shared checkpoint root may lag
        behind, and ranks restoring different steps would train on silently diverged state."""
        return self.resume_from

    def _record_optimizer_assignment(self, infos: list[RankInfo]) -> None:
        """Write every stage's parameter-to-optimizer-group table to ``RUN_DIR/optimizer.txt`` and print
        each stage's group summary (the table's head) with the file's path."""
        tables = sorted((i.pp_rank, i.optimizer_assignment) for i in infos if i.optimizer_assignment)
        if not tables:
            return
        path = self.run_dir / "optimizer.txt"
        path.write_text("\n\n".join(f"pipeline stage {pp}\n{table}" for pp, table in tables) + "\n")
        for pp, table in tables:
            lines = table.splitlines()
            summary = [line for line in lines[1:] if line.startswith("  ") and "params" in line]
            for line in [f"stage {pp}: {lines[0]}", *summary]:
                self.telemetry.console.print(line, highlight=False, markup=False)
        self.telemetry.console.print(f"every parameter's group: {path}", highlight=False, markup=False)

    def _record_placement(self, infos: list[RankInfo]) -> None:
        """Write where every rank runs to ``RUN_DIR/placement.json``: ``{"ranks": [{rank, node, tp, cp, pp, dp}],
        "nodes": {node: [ranks]}}`` (rewritten at every start: a recovery may place ranks elsewhere)."""
        if not any(i.node for i in infos):
            return
        ranks = [{"rank": i.rank, "node": i.node, "tp": i.tp_rank, "cp": i.cp_rank, "pp": i.pp_rank, "dp": i.dp_rank}
                 for i in sorted(infos, key=lambda i: i.rank)]
        nodes: dict[str, list[int]] = {}
        for r in ranks:
            nodes.setdefault(r["node"], []).append(r["rank"])
        (self.run_dir / "placement.json").write_text(json.dumps({"ranks": ranks, "nodes": nodes}, indent=1) + "\n")

    def _recover(self) -> None:
        """Count the restart and go back to STARTING from the newest committed checkpoint (or step 0)."""
        self.checkpoints.retention.wait()
        self.state, self.resume_from = restart.recovery_point(self.storage, self.state, self.job, self.telemetry,
                                                              **self.teardown)
        self.phase = Phase.STARTING

    def _train_one(self) -> None:
        step = self.state.step + 1
        injected = frozenset(k for k in ("spike", "anticipatory") if take_fault(self.pending_faults, k, step))
        nxt = plan_next(self.state, self.job, injected)
        plan = nxt.plan
        if nxt.stage_change:
            self.telemetry.event("stage_change", self.state.step, stage=plan.stage, seq_len=plan.seq_len,
                                 global_batch=plan.global_batch, micro_batch_size=plan.micro_batch_size,
                                 attention_mode=plan.attention_mode)
        if nxt.routing_on:
            self.telemetry.event("anticipatory_routing_on", self.state.step, steps=nxt.state.routing.remaining,
                                 delay_steps=1)
        results = self.workers.train_step(plan)
        state = nxt.state.after_step(plan.step, plan.global_batch_tokens, plan.global_batch)
        record = dict(results[self.reporter])
        record["peak_rss_mb"] = max(r["peak_rss_mb"] for r in results)  # the largest rank's resident peak
        record.update(_model_wide(results[r] for r in self.stage_heads))
        record.pop("compute_cpu_s", None)  # the reporter's own; every stage's instead:
        record.update({f"stage_cpu_s/{s}": results[r]["compute_cpu_s"] for s, r in enumerate(self.stage_heads)
                       if "compute_cpu_s" in results[r]})
        for key in ("step_cpu_s", "update_cpu_s"):  # every rank's, by rank (the reporter's own popped)
            record.pop(key, None)
            record.update({f"rank_{key}/{r}": result[key] for r, result in enumerate(results) if key in result})
        record.update(consumed_tokens=state.consumed_tokens, consumed_samples=state.consumed_samples,
                      restarts=state.restarts, time=time.time())
        for collapse in self.router_watch.observe(record):
            self.telemetry.event("router_collapse", plan.step, **collapse)
        decision = decide(state, record, self.job)
        if decision.routing_off:
            self.telemetry.event("anticipatory_routing_off", plan.step)
        self.telemetry.metrics(record)
        self.state = decision.state
        self.state = self.checkpoints.commit_pending(self.workers, self.state, wait=False)
        self._act(decision, record)

    def _act(self, decision: Decision, record: dict) -> None:
        """Carry out what :func:`decide` chose after step ``record["step"]``."""
        step = record["step"]
        if decision.rollback == "spike":
            self.telemetry.event("spike", step, loss=record["loss"], ema=decision.verdict.ema,
                                 reason=decision.verdict.reason)
            self.state = spike_rollback.roll_back(self.workers, self.checkpoints, self.state, step,
                                                  self.counters_at, self.job, self.telemetry)
            return
        if decision.snapshot_counters:
            self.counters_at[step] = (self.state.consumed_tokens, self.state.consumed_samples)
        if decision.nonfinite:
            self.telemetry.event("nonfinite_grad", step, grad_norm=record["grad_norm"],
                                 consecutive=self.state.consecutive_nonfinite)
        if decision.halt:
            self.failure = RuntimeError(decision.reason)
            self.telemetry.event("failure", step, cause=decision.reason, kind="nonfinite")
            self.phase = Phase.FAILED
            return
        if decision.rollback == "nonfinite":
            self.state = nonfinite.roll_back(self.workers, self.checkpoints, self.state, step, self.telemetry)
            return
        if decision.evaluate:
            self._evaluate()
        if decision.checkpoint:
            self.phase = Phase.CHECKPOINTING
        elif decision.finish:
            self.phase = Phase.FINISHING

    def _checkpoint(self) -> None:
        """Request a save of the state after the last step; commit now, or once persisted if asynchronous."""
        self.state = self.checkpoints.request(self.workers, self.state)
        self.phase = Phase.RUNNING if self.state.step < self.job.train.steps else Phase.FINISHING

    def _evaluate(self) -> None:
        result = self.workers.evaluate(eval_request(self.job))
        self.val_loss = result[self.reporter]["val_loss"]
        self.telemetry.event("eval", self.state.step, **result[self.reporter])

    def _finish(self) -> None:
        self.state = self.checkpoints.commit_pending(self.workers, self.state, wait=True)
        if final_evaluation_due(self.state.step, self.job):
            self._evaluate()
        self.telemetry.event("finish", self.state.step, val_loss=self.val_loss,
                             last_committed=self.state.last_committed, restarts=self.state.restarts)
        self.phase = Phase.FINISHED
