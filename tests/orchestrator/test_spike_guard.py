"""The spike guard: detection rule, and a real spike (one step at 1000x LR) rolled back."""

from __future__ import annotations

import math

import pytest

from support.jobs import run_job, tiny_job
from v4train.orchestrator.faults import parse_fault
from v4train.orchestrator.spec import SpikeGuardSpec
from v4train.orchestrator.recovery.spike_guard import SpikeGuard


def test_rule_needs_warmup_and_both_conditions():
    guard = SpikeGuard(SpikeGuardSpec(enabled=True, warmup_steps=5, sigma=4.0, ratio=1.2))
    for loss in (6.0, 5.0, 5.5, 4.0, 4.5):  # noisy early losses, no trigger during warmup
        assert not guard.observe(loss, 1.0).spike
    for _ in range(20):
        assert not guard.observe(4.0 + 0.01 * math.sin(_), 1.0).spike
    assert not guard.observe(4.3, 1.0).spike   # above ema + 4 std but below 1.2 x ema: noise, not a spike
    decision = guard.observe(9.0, 1.0)
    assert decision.spike and "ema" in decision.reason
    state = guard.state_dict()
    assert not guard.observe(4.0, 1.0).spike   # spikes do not move the estimate
    assert guard.observe(float("nan"), 1.0).spike and guard.observe(4.0, float("inf")).spike
    other = SpikeGuard(guard.spec)
    other.load_state_dict(state)
    assert other.observe(9.0, 1.0).spike


@pytest.mark.timeout(600)
def test_spike_rolls_back_skips_the_window_and_recovers(rank_pool, tiny_dataset, tmp_path):
    job = tiny_job(tiny_dataset, parallel={"pp": 2, "dp": 2}, train={"steps": 16, "warmup_steps": 2},
                   spike_guard={"enabled": True, "warmup_steps": 4, "snapshot_every": 2, "ratio": 1.1})
    metrics, events, _ = run_job(rank_pool, job, tmp_path, faults=[parse_fault("spike@8")])
    spike = next(e for e in events if e["event"] == "spike")
    rollback = next(e for e in events if e["event"] == "rollback")
    assert spike["step"] == 9  # the 1000x-LR update at step 8 shows in step 9's loss
    got = (rollback["step"], rollback["from_step"], rollback["source"], rollback["skipped_data"])
    assert got == (6, 9, "memory", True)
    by_step = {}
    for m in metrics:
        by_step.setdefault(m["step"], []).append(m)
    pre_spike = by_step[7][0]["loss"]
    assert [len(by_step[s]) for s in (6, 7, 8, 9, 10)] == [1, 2, 2, 2, 1]  # steps 7-9 ran twice
    # Skipped window: the replayed steps see new data, not the batches that led to the spike.
    assert by_step[7][1]["data_fingerprint"] != by_step[7][0]["data_fingerprint"]
    assert by_step[9][1]["loss"] < pre_spike * 1.05 and metrics[-1]["loss"] < pre_spike
    assert metrics[-1]["step"] == 16
