"""C2 (the data stream survives a restart mid-epoch) and C3 (resume on another parallel layout)."""

from __future__ import annotations

import json
import shutil

import pytest

from support.jobs import run_job, tiny_job


@pytest.mark.timeout(600)
def test_c02_data_stream_survives_restart_mid_second_epoch(rank_pool, small_dataset, tmp_path):
    meta = json.loads((small_dataset / "dataset.json").read_text())
    tokens_per_epoch = meta["splits"]["train"]["tokens"] + meta["splits"]["train"]["documents"]
    steps_per_epoch = tokens_per_epoch // (8 * 64)
    assert 2 <= steps_per_epoch <= 6, steps_per_epoch
    save_at = steps_per_epoch + steps_per_epoch // 2 + 1  # inside the second epoch
    steps = 3 * steps_per_epoch
    job = tiny_job(small_dataset, parallel={"pp": 1, "dp": 2}, train={"steps": steps, "warmup_steps": 1},
                   checkpoint={"every_steps": save_at, "at_end": False})
    straight, _, _ = run_job(rank_pool, job, tmp_path / "straight")
    name = f"step_{save_at:08d}"
    state = json.loads((tmp_path / "straight" / name / "train_state.json").read_text())
    assert state["loader"]["epoch"] == 1 and state["loader"]["epoch_offset_tokens"] > 0
    shutil.copytree(tmp_path / "straight" / name, tmp_path / "resumed" / name)
    resumed, _, _ = run_job(rank_pool, job, tmp_path / "resumed", resume_from=name)
    expected = [(m["step"], m["data_fingerprint"], m["loss"]) for m in straight[save_at:]]
    assert [(m["step"], m["data_fingerprint"], m["loss"]) for m in resumed] == expected
    # Within an epoch no global batch repeats: the stream visits new windows.
    epoch2 = [m["data_fingerprint"] for m in straight[steps_per_epoch:2 * steps_per_epoch]]
    assert len(set(epoch2)) == len(epoch2)


@pytest.fixture(scope="module")
def saved_pp2_dp2(rank_pool, tiny_dataset, tmp_path_factory):
    root = tmp_path_factory.mktemp("c3")
    job = tiny_job(tiny_dataset, parallel={"pp": 2, "dp": 2, "stage_layers": [1, 3]},
                   train={"steps": 5, "warmup_steps": 2}, checkpoint={"every_steps": 3, "at_end": False})
    straight, _, _ = run_job(rank_pool, job, root / "straight")
    return job, root, {m["step"]: m for m in straight}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("tp, pp, ep, dp", [(1, 1, 1, 1), (1, 2, 1, 1), (1, 1, 1, 2), (1, 1, 2, 2), (2, 2, 1, 1),
                                            (2, 1, 2, 1)])
def test_c03_resume_on_another_parallel_layout(rank_pool, saved_pp2_dp2, tmp_path, tp, pp, ep, dp):
    """Saved under (TP, PP, EP, DP) = (1, 2, 1, 2) with layers split 1 + 3, resumed under tensor, pipeline (split
    3 + 1), expert and data parallel layouts: same data, losses within fp32 reduction noise of the uninterrupted
    run; every pipeline stage's compute time is logged."""
    job, root, straight = saved_pp2_dp2
    split = {"stage_layers": [3, 1]} if pp == 2 else {}
    other = {**job, "parallel": {"tp": tp, "pp": pp, "ep": ep, "dp": dp, **split}}
    shutil.copytree(root / "straight" / "step_00000003", tmp_path / "step_00000003")
    resumed, events, _ = run_job(rank_pool, other, tmp_path, resume_from="step_00000003")
    assert events[0]["event"] == "start" and events[0]["step"] == 3
    for m in resumed:
        ref = straight[m["step"]]
        assert m["data_fingerprint"] == ref["data_fingerprint"], m["step"]
        assert m["loss"] == pytest.approx(ref["loss"], rel=1e-5), m["step"]
        assert m["consumed_tokens"] == ref["consumed_tokens"]
        assert sorted(k for k in m if k.startswith("stage_cpu_s/")) == [f"stage_cpu_s/{s}" for s in range(pp)]
        assert all(m[f"stage_cpu_s/{s}"] > 0 for s in range(pp))
        assert sorted(k for k in m if k.startswith("rank_step_cpu_s/")) == sorted(
            f"rank_step_cpu_s/{r}" for r in range(tp * pp * dp))
        assert all(m[f"rank_step_cpu_s/{r}"] >= m[f"rank_update_cpu_s/{r}"] > 0 for r in range(tp * pp * dp))
