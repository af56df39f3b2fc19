"""Curriculum plans are pure functions of the counters: stages by consumed tokens, the batch ramp,
the token-based LR schedule, attention mode and MTP weight; C4: pipeline shapes follow each step's plan."""

from __future__ import annotations

import pytest

from conftest import run_job, tiny_job
from v4train.orchestrator.curriculum import plan_at, plan_step, total_tokens
from v4train.orchestrator.spec import JobSpec

CURRICULUM = {
    "stages": [
        {"seq_len": 32, "tokens": 512, "attention": "dense"},
        {"seq_len": 64, "tokens": 1024, "attention": "dense", "micro_batch_size": 1},
        {"seq_len": 128, "attention": "dense", "micro_batch_size": 1},
    ],
    "batch_ramp_tokens": 512, "batch_ramp_start": 4, "batch_multiple": 4,
    "lr_warmup_tokens": 256, "lr_decay_fraction": 0.25, "mtp_weight": 0.3, "mtp_weight_decay": 0.1,
}


def _spec(dataset, **parallel) -> JobSpec:
    job = tiny_job(dataset, parallel={"pp": 1, "dp": 1, **parallel},
                   train={"steps": 9, "global_batch": 8, "micro_batch_size": 2, "warmup_steps": 0},
                   curriculum=CURRICULUM)
    return JobSpec.model_validate(job)


def test_plans_follow_tokens(tiny_dataset):
    spec = _spec(tiny_dataset)
    plans, tokens = [], 0
    for step in range(1, 10):
        plan = plan_at(spec, step, tokens)
        assert plan == plan_step(spec, step)  # the uninterrupted table agrees with the counter-driven plan
        plans.append(plan)
        tokens += plan.global_batch_tokens
    assert total_tokens(spec) == tokens
    assert [p.seq_len for p in plans] == [32, 32, 32, 32, 64, 64, 128, 128, 128]
    # Ramp from 4 to 8 sequences over the first 512 tokens, in multiples of batch_multiple = 4.
    assert [p.global_batch for p in plans] == [4, 4, 4, 4, 8, 8, 8, 8, 8]
    assert [p.micro_batch_size for p in plans] == [2, 2, 2, 2, 1, 1, 1, 1, 1]
    assert [p.stage for p in plans] == [0, 0, 0, 0, 1, 1, 2, 2, 2]
    assert tokens == 4608
    # Warmup (token t of 256 gives lr * (t+1)/256), constant, cosine over the final quarter (from 3456).
    assert plans[0].lr == pytest.approx(3e-3 / 256) and plans[1].lr == pytest.approx(3e-3 * 129 / 256)
    assert [p.lr for p in plans[2:8]] == [3e-3] * 6
    assert plans[-1].lr < 3e-3 and plans[-1].mtp_loss_weight == 0.1 and plans[3].mtp_loss_weight == 0.3


def test_curriculum_validation_names_the_field(tiny_dataset):
    bad = tiny_job(tiny_dataset, curriculum={"stages": [{"seq_len": 32}, {"seq_len": 64}]})
    with pytest.raises(ValueError, match="curriculum.stages.0.tokens"):
        JobSpec.model_validate(bad)
    bad = tiny_job(tiny_dataset, parallel={"dp": 1}, curriculum={**CURRICULUM, "batch_multiple": 3})
    with pytest.raises(ValueError, match="batch_multiple"):
        JobSpec.model_validate(bad)


@pytest.mark.timeout(900)
def test_c04_pipeline_shapes_follow_a_changing_sequence_length(rank_pool, tiny_dataset, tmp_path):
    """PP=2 (both p2p directions to the same peer) and PP=4 under a 32 -> 64 -> 128 ramp with micro-batch
    changes: no hang, and the same losses as PP=1 on the same data."""
    results = {}
    for pp in (1, 2, 4):
        job = tiny_job(tiny_dataset, parallel={"pp": pp, "dp": 1},
                       train={"steps": 9, "global_batch": 8, "micro_batch_size": 2, "warmup_steps": 0},
                       curriculum=CURRICULUM)
        metrics, events, _ = run_job(rank_pool, job, tmp_path / f"pp{pp}")
        results[pp] = metrics
        changes = [(e["step"], e["seq_len"]) for e in events if e["event"] == "stage_change"]
        assert changes == [(4, 64), (6, 128)]
    assert [m["seq_len"] for m in results[1]] == [32, 32, 32, 32, 64, 64, 128, 128, 128]
    for pp in (2, 4):
        for ref, got in zip(results[1], results[pp], strict=True):
            assert got["data_fingerprint"] == ref["data_fingerprint"]
            assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5), (pp, got["step"])


@pytest.mark.timeout(600)
def test_resume_mid_ramp_continues_the_same_stages_lr_and_data(rank_pool, tiny_dataset, tmp_path):
    import shutil

    job = tiny_job(tiny_dataset, parallel={"pp": 2, "dp": 2},
                   train={"steps": 9, "global_batch": 8, "micro_batch_size": 1, "warmup_steps": 0},
                   curriculum={**CURRICULUM, "stages": [{**s, "micro_batch_size": 1} for s in CURRICULUM["stages"]]},
                   checkpoint={"every_steps": 3, "at_end": False})
    straight, _, _ = run_job(rank_pool, job, tmp_path / "straight")
    shutil.copytree(tmp_path / "straight" / "step_00000003", tmp_path / "resumed" / "step_00000003")
    resumed, events, _ = run_job(rank_pool, job, tmp_path / "resumed", resume_from="step_00000003")
    keys = ("step", "seq_len", "global_batch_tokens", "lr", "data_fingerprint", "loss", "consumed_tokens")
    assert [tuple(m[k] for k in keys) for m in resumed] == [tuple(m[k] for k in keys) for m in straight[3:]]
    assert [(e["step"], e["seq_len"]) for e in events if e["event"] == "stage_change"] == [(4, 64), (6, 128)]


@pytest.mark.timeout(300)
def test_c05_fewer_micro_batches_than_pipeline_stages(rank_pool, tiny_dataset, tmp_path):
    """PP=4 with 2 micro-batches per step runs (1F1B only warms up and cools down) to the PP=1 losses."""
    results = {}
    for pp in (1, 4):
        job = tiny_job(tiny_dataset, parallel={"pp": pp, "dp": 1}, train={"global_batch": 4, "micro_batch_size": 2})
        results[pp], _, _ = run_job(rank_pool, job, tmp_path / f"pp{pp}")
    for ref, got in zip(results[1], results[4], strict=True):
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5), got["step"]
