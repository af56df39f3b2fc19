"""The supervisor's decisions against the in-process fake rank group (no processes, no model): checkpoint
policy, restart budget, spike and non-finite rollbacks, evaluation length; and the pure policies it runs."""

from __future__ import annotations

import json

import pytest

from support.fake_supervisor import fake_job, run_supervisor
from v4train.orchestrator.control.decisions import decide, eval_request, plan_next
from v4train.orchestrator.control.fake_group import FakeRankGroup, Script
from v4train.orchestrator.control.run_state import RunState, read_train_state
from v4train.orchestrator.control.supervisor import Phase
from v4train.orchestrator.checkpoint import CheckpointError
from v4train.orchestrator.spec import JobSpec

pytestmark = pytest.mark.timeout(60)


def _job(tmp_path, **sections) -> JobSpec:
    return fake_job(tmp_path, 1, **sections)


def _run(job: JobSpec, tmp_path, script: Script, resume_from=None):
    group = FakeRankGroup(2, script)
    phase, sup, events, metrics = run_supervisor(job, tmp_path, group, resume_from)
    return phase, sup, group, events, metrics


def _names(events, *kinds):
    return [(e["event"], e["step"]) for e in events if e["event"] in kinds]


def test_checkpoint_policy_commits_every_n_steps_and_at_the_end(tmp_path):
    job = _job(tmp_path, train={"steps": 5})
    phase, sup, _, events, metrics = _run(job, tmp_path, Script())
    assert phase is Phase.FINISHED and [m["step"] for m in metrics] == [1, 2, 3, 4, 5]
    assert [s for _, s in _names(events, "checkpoint_committed")] == [2, 4, 5]
    state = read_train_state(json.loads((tmp_path / "step_00000004" / "train_state.json").read_text()),
                             str(tmp_path), job)
    assert (state["step"], state["consumed_samples"], state["loader"], state["restarts"]) == (4, 32, {"cursor": 4}, 0)
    assert sup.last_committed == 5


def test_restart_resumes_from_the_last_commit_within_the_budget(tmp_path):
    job = _job(tmp_path)
    phase, sup, group, events, metrics = _run(job, tmp_path, Script(failures={3: "died"}))
    assert phase is Phase.FINISHED and sup.restarts == 1
    failure = next(e for e in events if e["event"] == "failure")
    assert (failure["rank"], failure["kind"], failure["step"]) == (0, "died", 2)
    assert _names(events, "restart") == [("restart", 2)]
    assert "load@2" in group.calls and [(m["step"], m["restarts"]) for m in metrics] == \
        [(1, 0), (2, 0), (3, 1), (4, 1), (5, 1), (6, 1)]
    assert metrics[-1]["restarts"] == 1 and metrics[-1]["consumed_tokens"] == 6 * 8 * 64


def test_a_second_failure_past_the_budget_ends_the_run(tmp_path):
    job = _job(tmp_path)
    phase, sup, group, events, _ = _run(job, tmp_path, Script(failures={3: "exception", 5: "stall"}))
    assert phase is Phase.FAILED and sup.restarts == 1
    assert [(e["kind"], e["step"]) for e in events if e["event"] == "failure"] == [("exception", 2), ("stall", 4)]
    assert "scripted stall at step 5" in str(sup.failure) and group.calls[-1] == "abort"


def test_failure_while_saving_recovers_from_the_previous_commit(tmp_path):
    job = _job(tmp_path)
    phase, sup, _, events, _ = _run(job, tmp_path, Script(save_failures={4: "died"}))
    assert phase is Phase.FINISHED and sup.restarts == 1
    assert _names(events, "restart") == [("restart", 2)]
    assert [s for _, s in _names(events, "checkpoint_committed")] == [2, 4, 6]


def test_spike_rolls_back_to_a_snapshot_and_switches_anticipatory_routing_on(tmp_path):
    job = _job(tmp_path, train={"steps": 10}, checkpoint={"every_steps": 0, "at_end": False},
               spike_guard={"enabled": True, "warmup_steps": 3, "snapshot_every": 2, "anticipatory_steps": 2})

    def loss(step, cursor):  # a spike at the 7th batch only: the rollback skips it
        return 9.0 if cursor == 6 else 5.0 - 0.01 * cursor

    phase, _, group, events, metrics = _run(job, tmp_path, Script(loss=loss))
    assert phase is Phase.FINISHED
    assert _names(events, "spike") == [("spike", 7)]
    rollback = next(e for e in events if e["event"] == "rollback")
    assert (rollback["step"], rollback["from_step"], rollback["source"], rollback["skipped_data"]) == \
        (4, 7, "memory", True)
    assert "rollback@5" in group.calls
    assert _names(events, "anticipatory_routing_on", "anticipatory_routing_off") == \
        [("anticipatory_routing_on", 4), ("anticipatory_routing_off", 6)]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5, 6, 7, 5, 6, 7, 8, 9, 10]
    assert [m["data_fingerprint"] for m in metrics[7:9]] == [7, 8]  # the window 4..6 is skipped
    assert [m["step"] for m in metrics if "routing_fingerprint" in m] == [5, 6]
    assert metrics[7]["consumed_tokens"] == 5 * 8 * 64


@pytest.mark.parametrize("policy", ["halt", "rollback"])
def test_consecutive_nonfinite_steps_escalate(tmp_path, policy):
    job = _job(tmp_path, train={"steps": 5, "max_consecutive_nonfinite": 2, "nonfinite_policy": policy})
    phase, sup, group, events, metrics = _run(job, tmp_path, Script(nonfinite={3, 4}))
    assert [(e["step"], e["consecutive"]) for e in events if e["event"] == "nonfinite_grad"] == [(3, 1), (4, 2)]
    if policy == "halt":
        assert phase is Phase.FAILED and "2 consecutive steps" in str(sup.failure)
        return
    assert phase is Phase.FINISHED
    rollback = next(e for e in events if e["event"] == "rollback")
    assert (rollback["step"], rollback["from_step"], rollback["reason"]) == (2, 4, "nonfinite")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 3, 4, 5]
    assert [m["data_fingerprint"] for m in metrics[4:]] == [4, 5, 6]  # the bad window is skipped


def test_nonfinite_rollback_without_a_checkpoint_fails_with_the_cause(tmp_path):
    job = _job(tmp_path, train={"steps": 5, "max_consecutive_nonfinite": 1, "nonfinite_policy": "rollback"},
               checkpoint={"every_steps": 0})
    phase, sup, _, _, _ = _run(job, tmp_path, Script(nonfinite={1}))
    assert phase is Phase.FAILED and "no committed checkpoint to roll back to" in str(sup.failure)


def test_evaluation_runs_at_eval_seq_len_during_a_sequence_length_ramp(tmp_path):
    job = _job(tmp_path, data={"seq_len": 32}, train={"steps": 4, "eval_every": 2, "eval_batches": 2,
                                                      "eval_seq_len": 64},
               curriculum={"stages": [{"seq_len": 32, "tokens": 512}, {"seq_len": 64}], "batch_multiple": 4})
    phase, _, group, events, metrics = _run(job, tmp_path, Script())
    assert phase is Phase.FINISHED and [m["seq_len"] for m in metrics] == [32, 32, 64, 64]
    assert [c for c in group.calls if c.startswith("evaluate")] == ["evaluate@64", "evaluate@64"]
    assert _names(events, "eval", "stage_change") == [("eval", 2), ("stage_change", 2), ("eval", 4)]


def test_resume_refuses_another_model_and_another_format(tmp_path):
    job = _job(tmp_path, train={"steps": 2})
    assert _run(job, tmp_path / "a", Script())[0] is Phase.FINISHED
    state = json.loads((tmp_path / "a" / "step_00000002" / "train_state.json").read_text())
    other = _job(tmp_path, model={"moe_inter_dim": 32})
    with pytest.raises(CheckpointError, match="saved for model"):
        read_train_state(state, "x", other)
    with pytest.raises(CheckpointError, match="format version 7; this v4train reads versions 1, 2"):
        read_train_state({**state, "format_version": 7}, "x", job)
    phase, sup, _, events, _ = _run(other, tmp_path / "a", Script(), resume_from="step_00000002")
    assert phase is Phase.FAILED and "saved for model" in str(sup.failure)


class _TorchrunFollower(FakeRankGroup):
    """A torchrun rank other than 0: what the job coordinates is rank 0's answer, here a resume target this
    process's own (lagging) view of the shared root did not show."""

    def __init__(self, world_size: int, script: Script, rank0_target: str) -> None:
        super().__init__(world_size, script)
        self.rank0_target = rank0_target

    def coordinate(self, fn):
        return self.rank0_target if fn.__name__ == "_resume_target" else fn()


def test_every_torchrun_rank_restores_the_step_rank_0_found(tmp_path):
    job = _job(tmp_path, train={"steps": 4})
    assert _run(job, tmp_path, Script())[0] is Phase.FINISHED  # commits at steps 2 and 4
    follower = _TorchrunFollower(2, Script(), "step_00000002")
    more = _job(tmp_path, train={"steps": 6})
    phase, sup, events, metrics = run_supervisor(more, tmp_path, follower, resume_from="step_00000004")
    assert phase is Phase.FINISHED
    start = [e for e in events if e["event"] == "start"][-1]
    assert start["step"] == 2 and start["resumed_from"].endswith("step_00000002")
    assert "load@2" in follower.calls and [m["step"] for m in metrics][-4:] == [3, 4, 5, 6]


def test_decisions_are_pure_functions_of_state_record_and_spec(tmp_path):
    job = _job(tmp_path, train={"steps": 4, "eval_every": 2, "eval_batches": 1, "eval_seq_len": 48})
    state = RunState()
    nxt = plan_next(state, job, frozenset({"anticipatory"}))
    assert state == RunState() and nxt.routing_on and nxt.plan.anticipatory_routing
    assert nxt.plan.prefetch_routing["step"] == 2
    after = nxt.state.after_step(1, nxt.plan.global_batch_tokens, nxt.plan.global_batch)
    record = {"step": 1, "loss": 5.0, "grad_norm": 1.0, "skipped": False}
    assert decide(after, record, job) == decide(after, record, job)
    two = after.after_step(2, 512, 8)
    d = decide(two, {**record, "step": 2}, job)
    assert d.evaluate and d.checkpoint and not d.finish and eval_request(job).seq_len == 48


def test_a_train_state_without_restarts_loads_into_the_run_state(tmp_path):
    """The schema as the format's first writer produced it (no ``restarts`` field) still loads."""
    job = _job(tmp_path, spike_guard={"enabled": True})
    old = {"format_version": 1, "step": 6, "consumed_tokens": 2560, "consumed_samples": 48,
           "layout": {"tp": 1, "pp": 2, "ep": 1, "dp": 1, "vp": 1}, "model": job.model.model_dump(),
           "data_path": job.data.path,
           "loader": {"seed": 0, "epoch": 0, "epoch_offset_tokens": 2608, "consumed_samples": 48,
                      "consumed_tokens": 2560},
           "rng": {"0": "", "1": ""}, "ranks": 2, "curriculum": {"stage": 1},
           "spike_guard": {"n": 6, "loss_mean": 6.1, "loss_var": 0.01, "grad_mean": 1.5},
           "anticipatory_routing": {"remaining": 2, "delay_steps": 1, "rows": {}}}
    old["model"].pop("init_from")  # written before the model section had init_from
    state = RunState(restarts=3).restored(read_train_state(old, "old", job))
    assert (state.step, state.consumed_tokens, state.consumed_samples, state.last_committed) == (6, 2560, 48, 6)
    assert state.routing.remaining == 2 and state.guard.n == 6 and state.restarts == 3


class _CountingGroup(FakeRankGroup):
    """Counts the supervisor's calls asking the ranks whether their shards have persisted."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.persist_queries = 0

    def save_done(self, timeout_s: float) -> bool:
        self.persist_queries += 1
        return super().save_done(timeout_s)

    def wait_saved(self, timeout_s: float) -> None:
        self.persist_queries += 1
        return super().wait_saved(timeout_s)


@pytest.mark.parametrize("asynchronous", [False, True])
def test_a_synchronous_save_commits_without_asking_the_ranks_again(tmp_path, asynchronous):
    """A synchronous save returns from the ranks with their shards durable: the commit follows without another
    round trip to every rank (a share of a save's time on the simulated cluster); an asynchronous one is asked."""
    job = _job(tmp_path, train={"steps": 4}, checkpoint={"every_steps": 2, "at_end": False,
                                                         "async_save": asynchronous})
    group = _CountingGroup(2, Script())
    phase, _, events, _ = run_supervisor(job, tmp_path, group)
    assert phase is Phase.FINISHED
    assert [s for _, s in _names(events, "checkpoint_committed")] == [2, 4]
    # the save at step 4 is the run's last, synchronous either way; the one at step 2 is asked about once
    assert group.persist_queries == (1 if asynchronous else 0)


def test_c16_save_events_carry_what_the_stall_benchmark_needs(tmp_path):
    """C16's benchmark (benchmarks/checkpoint_recovery.py) sums the extra wall time of the steps trained
    between each checkpoint_requested and its checkpoint_persisted, and of the step after (the commit): the
    events must name those steps and the time training was blocked, and every step must carry its completion
    time."""
    job = _job(tmp_path, train={"steps": 5}, checkpoint={"every_steps": 2, "at_end": False, "async_save": True})
    phase, _, _, events, metrics = _run(job, tmp_path, Script())
    assert phase is Phase.FINISHED
    requested = {e["step"]: e for e in events if e["event"] == "checkpoint_requested"}
    persisted = {e["step"]: e for e in events if e["event"] == "checkpoint_persisted"}
    assert sorted(requested) == sorted(persisted) == [2, 4]
    times = {m["step"]: m["time"] for m in metrics}
    for step, done in persisted.items():
        assert requested[step]["asynchronous"] is True
        assert done["after_step"] == step + 1  # the fake persists at once: seen after the next step
        assert 0 <= done["training_blocked_s"] <= done["seconds"] + 0.005  # (seconds: rounded to 0.01)
        assert requested[step]["time"] <= times[step + 1] <= done["time"]
