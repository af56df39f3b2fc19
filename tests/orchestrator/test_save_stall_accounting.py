"""The C16 benchmark's accounting (``benchmarks/checkpoint_recovery.py``, ``_save_stall``): what an asynchronous
save costs training, on a synthetic run whose costs are known."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def save_stall():
    sys.path.insert(0, str(BENCHMARKS))  # the benchmark imports its sibling checkpoint_save
    try:
        spec = importlib.util.spec_from_file_location("checkpoint_recovery", BENCHMARKS / "checkpoint_recovery.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module._save_stall


def _run(intervals: dict[int, float], saves: list[tuple[int, int, float]]) -> tuple[list[dict], list[dict]]:
    """metrics with the given step intervals (1 s unless named), saves as (step, after_step, blocked_s)."""
    t, metrics = 0.0, []
    for step in range(1, 21):
        t += intervals.get(step, 1.0)
        metrics.append({"step": step, "time": t, "restarts": 0})
    events = [{"event": "checkpoint_persisted", "step": s, "after_step": a, "training_blocked_s": b}
              for s, a, b in saves]
    events.append({"event": "checkpoint_persisted", "step": 20, "after_step": 20, "training_blocked_s": 0.3})
    return metrics, events


def test_a_save_is_charged_its_following_steps_and_its_commit_not_the_blocking_twice(save_stall):
    # saves after steps 4 (the group's first), 8, 12, 16: the request and background work land in the next
    # step's interval, the commit in the one after; the final (synchronous) save at 20 touches no step
    intervals = {5: 1.9, 6: 1.0, 9: 1.25, 10: 1.05, 13: 1.15, 14: 1.1, 17: 1.2, 18: 1.05}
    metrics, events = _run(intervals, [(4, 5, 0.2), (8, 9, 0.05), (12, 13, 0.05), (16, 17, 0.05)])
    stall = save_stall(metrics, events)
    assert stall["step"] == pytest.approx(1.0) and stall["clean"] == 11 and stall["saves"] == 3
    assert stall["first"] == pytest.approx(0.9)
    assert stall["blocked"] == pytest.approx(0.05)
    # following steps: (0.25 + 0.05 - 0.05, 0.15 + 0.1 - 0.05, 0.2 + 0.05 - 0.05) = (0.25, 0.2, 0.2)
    assert stall["extra"] == pytest.approx(0.65 / 3)
    assert stall["extra_median"] == pytest.approx(0.2)
    assert stall["cost"] == pytest.approx(0.65 / 3 + 0.05)


def test_the_baseline_is_the_mean_of_untouched_steps_so_skewed_noise_is_not_charged_to_saves(save_stall):
    # one stall of 3 s in an untouched step and saves that cost nothing: a median baseline (1 s) would charge
    # every save 0.18 s of the stall's skew; the mean baseline charges none
    intervals = {7: 3.0, 9: 1.0 + 2.0 / 11, 10: 1.0 + 2.0 / 11, 13: 1.0 + 2.0 / 11, 14: 1.0 + 2.0 / 11,
                 17: 1.0 + 2.0 / 11, 18: 1.0 + 2.0 / 11, 5: 1.0 + 2.0 / 11, 6: 1.0 + 2.0 / 11}
    metrics, events = _run(intervals, [(4, 5, 0.0), (8, 9, 0.0), (12, 13, 0.0), (16, 17, 0.0)])
    stall = save_stall(metrics, events)
    assert stall["step"] == pytest.approx(1.0 + 2.0 / 11)
    assert stall["extra"] == pytest.approx(0.0, abs=1e-9)
