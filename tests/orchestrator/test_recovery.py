"""C9: one rank fails (raises, is SIGKILLed, stalls); the supervisor detects it within a bound, names the
rank, tears every actor down, restarts from the last committed checkpoint and reaches the same final
losses as an unfailed run; past train.max_restarts the job ends with a clear error.
Also C7's first half: a NaN gradient on one rank is caught by every rank and the step changes nothing."""

from __future__ import annotations

import pytest
import torch

from support.checkpoints import checkpoint_tensors
from support.jobs import run_job, tiny_job
from v4train.orchestrator.faults import parse_fault
from v4train.orchestrator.control.ray_group import RayRankGroup

HEARTBEAT_TIMEOUT_S = 8.0


def _fresh_workers(world: int):
    """Each (re)start gets new actors, as in production: the failed group is killed."""
    return lambda: RayRankGroup.create(world, HEARTBEAT_TIMEOUT_S, log_dir=None)


def _job(dataset, **train):
    return tiny_job(dataset, parallel={"pp": 2, "dp": 2},
                    train={"steps": 6, "warmup_steps": 2, "max_restarts": 1, **train},
                    checkpoint={"every_steps": 2, "at_end": False, "async_save": False})


@pytest.fixture(scope="module")
def reference(rank_pool, tiny_dataset, tmp_path_factory):
    metrics, _, _ = run_job(rank_pool, _job(tiny_dataset), tmp_path_factory.mktemp("ref"))
    return {m["step"]: m for m in metrics}


@pytest.mark.timeout(420)
@pytest.mark.parametrize("kind, reported", [("raise", "exception"), ("kill", "died"),
                                            pytest.param("stall", "stall", marks=[pytest.mark.slow, pytest.mark.ci])])
def test_c09_rank_failure_is_detected_and_recovered(reference, rank_pool, tiny_dataset, tmp_path, kind, reported):
    metrics, events, sup = run_job(rank_pool, _job(tiny_dataset), tmp_path, faults=[parse_fault(f"{kind}@4:rank=2")],
                                   make_workers=_fresh_workers(4))
    names = [e["event"] for e in events]
    failure = next(e for e in events if e["event"] == "failure")
    restart = next(e for e in events if e["event"] == "restart")
    assert (failure["rank"], failure["kind"], failure["step"]) == (2, reported, 3), failure
    assert restart["step"] == 2 and restart["from_checkpoint"].endswith("step_00000002")
    assert names.count("start") == 2 and names[-1] == "finish"
    # Detection is bounded: immediate for an exception or a death, the heartbeat timeout for a stall.
    last_step_before = max(m["time"] for m in events if m["event"] == "checkpoint_committed" and m["step"] == 2)
    bound = 10.0 if kind != "stall" else HEARTBEAT_TIMEOUT_S + 10.0
    assert failure["time"] - last_step_before < bound
    # The recovered run continues to the same losses, bit for bit.
    final = {m["step"]: m for m in metrics if m["restarts"] == 1}
    assert sorted(final) == [3, 4, 5, 6]
    for step, m in final.items():
        assert m["loss"] == reference[step]["loss"] and m["grad_norm"] == reference[step]["grad_norm"], step
    assert sup.restarts == 1


@pytest.mark.timeout(420)
def test_c09_second_failure_past_the_budget_ends_the_job(rank_pool, tiny_dataset, tmp_path):
    faults = [parse_fault("raise@3:rank=2"), parse_fault("raise@5:rank=1")]
    _, events, sup = run_job(rank_pool, _job(tiny_dataset), tmp_path, faults=faults,
                             make_workers=_fresh_workers(4), expect_failure=True)
    failures = [e for e in events if e["event"] == "failure"]
    assert [(f["rank"], f["step"]) for f in failures] == [(2, 2), (1, 4)]
    assert [e["event"] for e in events].count("restart") == 1
    assert "injected fault raise@5 on rank 1" in str(sup.failure)


@pytest.mark.timeout(300)
def test_c07_nan_gradient_on_one_rank_skips_the_step_everywhere(rank_pool, tiny_dataset, tmp_path):
    job = tiny_job(tiny_dataset, parallel={"pp": 2, "dp": 2}, train={"steps": 4, "warmup_steps": 2},
                   checkpoint={"every_steps": 1, "at_end": False})
    metrics, events, _ = run_job(rank_pool, job, tmp_path, faults=[parse_fault("nan_grad@3:rank=3")])
    by_step = {m["step"]: m for m in metrics}
    assert [by_step[s]["skipped"] for s in (1, 2, 3, 4)] == [False, False, True, False]
    assert [(e["step"], e["consecutive"]) for e in events if e["event"] == "nonfinite_grad"] == [(3, 1)]
    # No parameter, optimizer moment, step counter or expert bias changed during step 3, on any rank.
    after2 = checkpoint_tensors(tmp_path / "step_00000002")
    after3 = checkpoint_tensors(tmp_path / "step_00000003")
    assert after2.keys() == after3.keys() and any(".gate.bias" in k for k in after2)
    assert all(torch.equal(after2[k], after3[k]) for k in after2)
    after4 = checkpoint_tensors(tmp_path / "step_00000004")
    assert not torch.equal(after3["model.head.weight"], after4["model.head.weight"])


@pytest.mark.timeout(300)
def test_c07_nan_in_one_experts_gradient_under_expert_parallelism(rank_pool, tiny_dataset, tmp_path):
    """EP=2 x DP=2: a NaN in one routed expert's gradient on rank 1 at step 3 is seen by every rank; the step
    changes nothing (parameters, Adam moments, Muon momentum, step counters, expert biases)."""
    job = tiny_job(tiny_dataset, parallel={"ep": 2, "dp": 2}, train={"steps": 3, "warmup_steps": 2},
                   checkpoint={"every_steps": 1, "at_end": False})
    metrics, events, _ = run_job(rank_pool, job, tmp_path, faults=[parse_fault("nan_grad@3:rank=1")])
    assert [m["skipped"] for m in metrics] == [False, False, True]
    after2 = checkpoint_tensors(tmp_path / "step_00000002")
    after3 = checkpoint_tensors(tmp_path / "step_00000003")
    assert any(k.endswith(".momentum_buffer") for k in after2) and any(".experts.experts." in k for k in after2)
    assert all(torch.equal(after2[k], after3[k]) for k in after2)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("policy", ["halt", "rollback"])
def test_c07_consecutive_nonfinite_steps_escalate(rank_pool, tiny_dataset, tmp_path, policy):
    """Two bad steps in a row (max_consecutive_nonfinite: 2) halt the job, or roll it back to the last
    committed checkpoint and skip the data window, after which it trains to the end."""
    job = tiny_job(tiny_dataset, parallel={"pp": 2, "dp": 2},
                   train={"steps": 5, "warmup_steps": 2, "max_consecutive_nonfinite": 2, "nonfinite_policy": policy},
                   checkpoint={"every_steps": 2, "at_end": False})
    faults = [parse_fault("nan_grad@3:rank=0"), parse_fault("nan_grad@4:rank=2")]
    # a halted job kills its actors: give it its own, not the shared pool's
    metrics, events, sup = run_job(rank_pool, job, tmp_path, faults=faults, expect_failure=policy == "halt",
                                   make_workers=_fresh_workers(4) if policy == "halt" else None)
    assert [(e["step"], e["consecutive"]) for e in events if e["event"] == "nonfinite_grad"] == [(3, 1), (4, 2)]
    if policy == "halt":
        assert "2 consecutive steps with a non-finite gradient" in str(sup.failure)
        return
    rollback = next(e for e in events if e["event"] == "rollback")
    assert (rollback["step"], rollback["from_step"], rollback["reason"]) == (2, 4, "nonfinite")
    steps = [m["step"] for m in metrics]
    assert steps == [1, 2, 3, 4, 3, 4, 5]
    # the re-run steps 3 and 4 train on the batches after the skipped window, not on the bad ones again
    bad_window = {m["data_fingerprint"] for m in metrics[2:4]}
    assert not bad_window & {m["data_fingerprint"] for m in metrics[4:]}
    assert not any(m["skipped"] for m in metrics[4:])


@pytest.mark.slow  # a second 6-step run on the shared pool: about a minute on an idle 2-core machine
@pytest.mark.timeout(420)
def test_kept_ranks_restore_from_memory_and_continue_bit_for_bit(reference, rank_pool, tiny_dataset, tmp_path):
    """A rank raising: every rank process is kept, each restores the step-2 commit from its own copy of what
    it wrote (none reads storage), and the run continues to the unfailed run's losses, bit for bit."""
    import ray

    groups = []

    def kept_group():
        groups.append(RayRankGroup(rank_pool.take(4).actors, 60.0, owned=False))
        return groups[-1]

    metrics, events, _ = run_job(rank_pool, _job(tiny_dataset), tmp_path, faults=[parse_fault("raise@4:rank=2")],
                                 make_workers=kept_group)
    restart = next(e for e in events if e["event"] == "restart")
    assert restart["ranks_kept"] is True and len(groups) == 1
    sources = ray.get([a.run.remote(lambda trainer: trainer.restored_from) for a in groups[0].actors], timeout=60)
    assert sources == ["memory"] * 4
    final = {m["step"]: m for m in metrics if m["restarts"] == 1}
    assert sorted(final) == [3, 4, 5, 6]
    for step, m in final.items():
        assert m["loss"] == reference[step]["loss"] and m["grad_norm"] == reference[step]["grad_norm"], step
