"""The run's policies as pure functions of (run state, step record, job spec).

:func:`plan_next` says what the next optimizer step runs (its :class:`orchestrator.curriculum.StepPlan`,
anticipatory routing on or off with the following step's plan to prefetch, whether the curriculum stage
changes); :func:`decide` says what follows a finished step (a spike rollback, a non-finite skip, halt or
rollback, the end of the anticipatory-routing window, an evaluation, a checkpoint, the end of the run).
Neither touches a rank, a file or a clock: the supervisor (``orchestrator/control/supervisor.py``) carries
the decisions out, identically whether its ranks are Ray actors, torchrun processes or a test's fake.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from v4train.orchestrator.control.run_state import RoutingWindow, RunState
from v4train.orchestrator.curriculum import StepPlan, plan_at
from v4train.orchestrator.faults import SPIKE_LR_FACTOR
from v4train.orchestrator.recovery.spike_guard import Verdict, assess
from v4train.orchestrator.spec import JobSpec

__all__ = ["EvalRequest", "NextStep", "Decision", "plan_next", "decide", "checkpoint_due", "evaluation_due",
           "eval_request", "final_evaluation_due", "restart_allowed"]


@dataclass(frozen=True)
class EvalRequest:
    """A validation pass: ``batches`` fixed batches of ``global_batch`` sequences of ``seq_len`` tokens, run
    in micro-batches of ``micro_batch_size`` sequences."""

    batches: int
    global_batch: int
    micro_batch_size: int
    seq_len: int


@dataclass(frozen=True)
class NextStep:
    """The next optimizer step: its ``plan``; ``stage_change`` when its curriculum stage differs from the
    previous step's (reported as an event); ``routing_on`` when anticipatory routing switches on here."""

    plan: StepPlan
    stage_change: bool
    routing_on: bool
    state: RunState


@dataclass(frozen=True)
class Decision:
    """What follows optimizer step ``state.step``.

    ``rollback``: ``"spike"`` (roll back to an in-memory snapshot or checkpoint, then anticipatory routing),
    ``"nonfinite"`` (restore the last committed checkpoint, skip the data window) or None.
    ``halt``: stop the run with ``reason``. ``nonfinite``: the step was skipped (non-finite gradient).
    ``routing_off``: the anticipatory-routing window ended with this step. ``snapshot_counters``: ranks
    took an in-memory snapshot after this step (the supervisor keeps its counters for a rollback).
    ``evaluate``, ``checkpoint``, ``finish``: run an evaluation, save a checkpoint, end the run.
    ``verdict`` is the spike guard's judgement (None when the guard is off); ``state`` the state after it.
    """

    state: RunState
    rollback: str | None = None
    halt: bool = False
    reason: str = ""
    nonfinite: bool = False
    routing_off: bool = False
    snapshot_counters: bool = False
    evaluate: bool = False
    checkpoint: bool = False
    finish: bool = False
    verdict: Verdict | None = None


def checkpoint_due(step: int, job: JobSpec) -> bool:
    """Whether a checkpoint is taken after optimizer ``step`` (every ``checkpoint.every_steps``, and at the end)."""
    every = job.checkpoint.every_steps
    if every and step % every == 0:
        return True
    return job.checkpoint.at_end and step == job.train.steps


def evaluation_due(step: int, job: JobSpec) -> bool:
    """Whether an evaluation runs after optimizer ``step`` (every ``train.eval_every`` steps)."""
    every = job.train.eval_every
    return bool(job.train.eval_batches and every and step % every == 0)


def final_evaluation_due(step: int, job: JobSpec) -> bool:
    """Whether the run ends with an evaluation: one is configured and step ``step`` did not just run one."""
    return bool(job.train.eval_batches) and not (job.train.eval_every and step % job.train.eval_every == 0)


def eval_request(job: JobSpec) -> EvalRequest:
    """Evaluation runs at ``train.eval_seq_len`` (default ``data.seq_len``), whatever the training length."""
    t = job.train
    return EvalRequest(t.eval_batches, t.global_batch, t.micro_batch_size, t.eval_seq_len or job.data.seq_len)


def restart_allowed(state: RunState, job: JobSpec) -> bool:
    """Whether a failed attempt may be recovered: ``train.max_restarts`` bounds the recoveries."""
    return state.restarts < job.train.max_restarts


def plan_next(state: RunState, job: JobSpec, injected: frozenset[str] = frozenset()) -> NextStep:
    """The plan of step ``state.step + 1``.

    ``injected`` names the supervisor-side faults firing at that step (``orchestrator/faults.py``):
    ``spike`` multiplies its learning rate by ``SPIKE_LR_FACTOR``; ``anticipatory`` switches anticipatory
    routing on for ``spike_guard.anticipatory_steps`` steps. While routing is on, the plan carries the
    following step's plan, whose routing the ranks capture before this step's update (spec section 8.1).
    """
    plan = plan_at(job, state.step + 1, state.consumed_tokens)
    stage_change = plan.stage != state.curriculum_stage and (state.curriculum_stage is not None or plan.stage != 0)
    state = state.replace(curriculum_stage=plan.stage)
    if "spike" in injected:
        plan = dataclasses.replace(plan, lr=plan.lr * SPIKE_LR_FACTOR)
    routing_on = "anticipatory" in injected
    if routing_on:
        state = state.replace(routing=RoutingWindow(job.spike_guard.anticipatory_steps))
    remaining = state.routing.remaining
    if remaining > 0:
        following = None
        if remaining > 1 and plan.step < job.train.steps:
            following = plan_at(job, plan.step + 1, state.consumed_tokens + plan.global_batch_tokens).to_dict()
        plan = dataclasses.replace(plan, anticipatory_routing=True, prefetch_routing=following)
    return NextStep(plan, stage_change, routing_on, state)


def _after_routing(state: RunState) -> tuple[RunState, bool]:
    """Count one step of the anticipatory-routing window (the step ran with it iff ``remaining > 0``)."""
    remaining = state.routing.remaining
    if remaining <= 0:
        return state, False
    return state.replace(routing=dataclasses.replace(state.routing, remaining=remaining - 1)), remaining == 1


def decide(state: RunState, record: dict, job: JobSpec) -> Decision:
    """What follows the step in ``record`` (the reporter's metrics: ``step``, ``loss``, ``grad_norm``,
    ``skipped``); ``state`` is the run state with that step counted (:meth:`RunState.after_step`).

    Order (each stops the ones after it): a spike (spike guard on; a non-finite loss or gradient norm is
    one) rolls back; a skipped step extends the non-finite streak, which at
    ``train.max_consecutive_nonfinite`` halts or rolls back per ``train.nonfinite_policy``; then an
    evaluation when due, then a checkpoint when due, else the end of the run at ``train.steps``.
    """
    state, routing_off = _after_routing(state)
    step = state.step
    verdict = None
    guard = job.spike_guard
    if guard.enabled:
        verdict, stats = assess(state.guard, guard, record["loss"], record["grad_norm"])
        if verdict.spike:
            return Decision(_spike_state(state, job), rollback="spike", routing_off=routing_off, verdict=verdict)
        state = state.replace(guard=stats)
    snapshot = guard.enabled and step % guard.snapshot_every == 0
    if record["skipped"]:
        state = state.replace(consecutive_nonfinite=state.consecutive_nonfinite + 1)
        streak = state.consecutive_nonfinite
        if streak >= job.train.max_consecutive_nonfinite:
            if job.train.nonfinite_policy == "rollback":
                return Decision(state, rollback="nonfinite", nonfinite=True, routing_off=routing_off,
                                snapshot_counters=snapshot, verdict=verdict)
            return Decision(state, halt=True, nonfinite=True, routing_off=routing_off, verdict=verdict,
                            reason=f"{streak} consecutive steps with a non-finite gradient")
    else:
        state = state.replace(consecutive_nonfinite=0)
    return Decision(state, nonfinite=bool(record["skipped"]), routing_off=routing_off, snapshot_counters=snapshot,
                    evaluate=evaluation_due(step, job), checkpoint=checkpoint_due(step, job),
                    finish=not checkpoint_due(step, job) and step >= job.train.steps, verdict=verdict)


def _spike_state(state: RunState, job: JobSpec) -> RunState:
    """After a spike: anticipatory routing on for ``spike_guard.anticipatory_steps`` steps (the counters
    move to the rollback target when the supervisor has restored it)."""
    return state.replace(routing=RoutingWindow(job.spike_guard.anticipatory_steps))
