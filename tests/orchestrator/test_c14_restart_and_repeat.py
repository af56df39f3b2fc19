"""C14: a restart before the first checkpoint starts over from scratch, bit for bit; a deterministic fault (a
token id equal to the vocabulary size behind a matching manifest) stops the run with one line naming the
shard, without looping through the restart budget. Real rank actors, through the Supervisor (no preflight:
the ranks' own checks and the fault taxonomy are what is tested)."""

from __future__ import annotations

import pytest

from support.datasets import with_token
from support.jobs import run_job, tiny_job
from v4train.orchestrator.control.ray_group import RayRankGroup
from v4train.orchestrator.faults import parse_fault


def _fresh(world: int):
    return lambda: RayRankGroup.create(world, 60.0, log_dir=None)


@pytest.mark.timeout(300)
def test_c14_a_token_outside_the_vocabulary_stops_the_run_without_restarts(rank_pool, tiny_dataset, tmp_path):
    shard = with_token(tiny_dataset, tmp_path / "data", 512)
    job = tiny_job(tmp_path / "data", train={"steps": 6, "max_restarts": 3})
    groups = []

    def make_workers():
        groups.append(_fresh(1)())
        return groups[-1]

    _, events, sup = run_job(rank_pool, job, tmp_path / "run", make_workers=make_workers, expect_failure=True)
    names = [e["event"] for e in events]
    assert names.count("failure") == 1 and "restart" not in names and sup.restarts == 0
    failure = events[names.index("failure")]
    assert failure["fault_class"] == "deterministic" and failure["rank"] == 0
    line = str(sup.failure)
    assert "\n" not in line and f"{shard}: token id 512 >= vocab_size 512" in line, line
    assert line.startswith("deterministic fault at step 0 (starting): rank 0 (setup): DataError")
    # One start of the ranks, not the four a budget of three restarts allows.
    assert len(groups) == 1


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_c14_a_rank_killed_before_the_first_checkpoint_restarts_from_scratch_bitwise(rank_pool, tiny_dataset,
                                                                                   tmp_path):
    job = tiny_job(tiny_dataset, parallel={"dp": 2}, train={"steps": 5, "warmup_steps": 1, "max_restarts": 1})
    reference, _, _ = run_job(rank_pool, job, tmp_path / "ref")
    metrics, events, sup = run_job(rank_pool, job, tmp_path / "run", faults=[parse_fault("kill@4:rank=1")],
                                   make_workers=_fresh(2))
    restart = next(e for e in events if e["event"] == "restart")
    assert restart["step"] == 0 and restart["from_checkpoint"] is None and sup.restarts == 1
    again = [m for m in metrics if m["restarts"] == 1]
    assert [m["step"] for m in again] == [1, 2, 3, 4, 5]
    for m, ref in zip(again, reference):
        for key in ("loss", "grad_norm", "consumed_tokens"):
            assert m[key] == ref[key], (key, m["step"])
