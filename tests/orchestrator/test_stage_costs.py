"""The stage cost model and the balanced pipeline split (``parallel.stage_layers``)."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from support.jobs import tiny_job
from v4train.model import V4Stage, stage_layer_ranges
from v4train.model.budget import training_flops_per_sequence
from v4train.model.config import ModelConfig
from v4train.orchestrator.spec import JobSpec
from v4train.orchestrator.tools import stage_costs as sc


def _costs(blocks, embed=0.0, head=0.0) -> sc.StageCosts:
    return sc.StageCosts(embed, tuple(blocks), head, sc.Calibration("cpu", {}, "test"))


def _compositions(n: int, k: int):
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0, *cuts, n)
        yield [b - a for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("seed", range(6))
def test_the_balanced_split_is_the_best_of_every_split(seed):
    rng = random.Random(seed)
    n, k = rng.randint(4, 9), rng.randint(2, 4)
    costs = _costs([rng.uniform(0.5, 2.0) for _ in range(n)], embed=rng.uniform(0, 1), head=rng.uniform(0, 5))
    split = sc.balanced_stage_layers(costs, k)
    assert sum(split) == n and len(split) == k and min(split) >= 1
    best = min(max(costs.of_stages(c)) for c in _compositions(n, k))
    assert max(costs.of_stages(split)) == pytest.approx(best, rel=1e-12)


def test_a_heavy_head_moves_layers_off_the_last_stage_and_ties_go_to_the_earlier_stages():
    assert sc.balanced_stage_layers(_costs([1.0] * 4, head=2.0), 2) == [3, 1]
    assert sc.balanced_stage_layers(_costs([1.0] * 4), 2) == [2, 2]
    assert sc.balanced_stage_layers(_costs([1.0] * 5), 2) == [3, 2]  # 3/2 and 2/3 tie at 3: earlier heavier
    with pytest.raises(ValueError, match="between 1 and n_layers"):
        sc.balanced_stage_layers(_costs([1.0] * 3), 4)


@pytest.mark.parametrize("preset, mode", [("nano", "dense"), ("nano", "sparse"), ("small", "indexer_warmup"),
                                          ("flash", "sparse")])
def test_the_components_flops_add_up_to_the_models_training_flops(preset, mode):
    """Summed over the embedding, every block and the head with MTP, the matmul and attention features are
    the whole model's training FLOPs, counted independently by model.budget."""
    cfg = ModelConfig.preset(preset)
    seq = 512
    embed, blocks, head = sc.component_features(cfg, seq, mode)
    total = sum(c["matmul"] + c["attention"] for c in [embed, *blocks, head])
    assert total == pytest.approx(training_flops_per_sequence(cfg, seq, mode), rel=1e-12)
    assert head["vocab"] == seq * cfg.vocab_size * (1 + cfg.mtp_depth)


def test_calibration_file_is_read_checked_and_absent_means_flops(tmp_path):
    path = tmp_path / "cal.json"
    path.write_text(json.dumps({"cpu": {"coefficients": dict.fromkeys(sc.FEATURES, 2.0), "measured": "here"}}))
    cal = sc.load_calibration("cpu", path=path)
    assert cal.seconds({"matmul": 1.0, "modules": 3.0}) == 8.0 and cal.source == "here"
    flops = sc.load_calibration("gpu", flops_per_s=1e12, path=path)
    assert flops.seconds({"matmul": 1e12, "attention": 1e12, "vocab": 5.0}) == pytest.approx(2.0)
    path.write_text(json.dumps({"cpu": {"coefficients": {"matmul": -1.0}}}))
    with pytest.raises(ValueError, match=r"cal.json: cpu.coefficients.matmul must be a number >= 0"):
        sc.load_calibration("cpu", path=path)


def test_the_shipped_calibration_loads_for_cpu():
    cal = sc.load_calibration("cpu")
    assert set(cal.coefficients) == set(sc.FEATURES) and "no calibration" not in cal.source


def test_auto_resolves_the_balanced_split_and_a_list_is_taken_as_given(tmp_path):
    job = JobSpec.model_validate(tiny_job(tmp_path, parallel={"pp": 2, "dp": 1}))
    cfg = job.model.build()
    seq, mode = job.sequence_for_costs()
    expected = sc.balanced_stage_layers(sc.stage_costs(cfg, seq, mode, sc.load_calibration("cpu")), 2)
    assert sc.job_stage_layers(job, cfg, "cpu") == expected
    fixed = JobSpec.model_validate(tiny_job(tmp_path, parallel={"pp": 2, "stage_layers": [1, 3]}))
    assert sc.job_stage_layers(fixed, cfg, "cpu") == [1, 3]


@pytest.mark.parametrize("layers, message", [([2, 1], "summing to the model's n_layers = 4"),
                                              ([1, 1, 2], "must give 2 stages"), ([4, 0], "greater than 0")])
def test_a_bad_explicit_split_is_refused_naming_the_field(tmp_path, layers, message):
    with pytest.raises(ValueError, match="stage_layers") as info:
        JobSpec.model_validate(tiny_job(tmp_path, parallel={"pp": 2, "stage_layers": layers}))
    assert message in str(info.value)


def test_a_stage_holds_exactly_its_layers():
    cfg = ModelConfig.preset("nano")
    assert stage_layer_ranges(4, 2, [3, 1]) == [range(0, 3), range(3, 4)]
    first, last = (V4Stage(cfg, pp_rank=r, pp_size=2, stage_layers=[3, 1]) for r in (0, 1))
    assert sorted(first.layers, key=int) == ["0", "1", "2"] and list(last.layers) == ["3"]
    with pytest.raises(ValueError, match="need 2 counts >= 1 summing to n_layers"):
        V4Stage(cfg, pp_rank=0, pp_size=2, stage_layers=[4, 0])
