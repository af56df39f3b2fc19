"""`v4train plan`: parameter counts, the activation model, memory against measured runs, the Pro layout.

Measured resident peaks (ru_maxrss, MiB) of configs/demo.yaml on clusters/local-sim.yaml (pp 2 x dp 2,
micro-batch 4 x 256 tokens), measured on a shared 2-core machine: per-rank probes after 12 (nano) and
8 (small) steps, and the largest rank's `peak_rss_mb` of a 60-step demo run with its checkpoint at step 50.
`test_plan_matches_a_live_run` (slow) measures again.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from v4train.orchestrator.tools.cli import main
from v4train.orchestrator.tools.plan import (Layout, Shape, activation_elements, job_shapes, plan_job, plan_layout,
                                             stage_parameters, suggest)
from v4train.orchestrator.tools.plan_cli import load_job_for_plan
from v4train.orchestrator.spec import load_cluster

MEASURED_MB = {  # preset -> (stage 0, stage 1) ru_maxrss per rank, MiB
    "nano": (921, 1121),
    "small": (1323, 1482),
}
MEASURED_DEMO_RUN_PEAK_MB = 1185  # largest rank, 60-step demo run (checkpoint at step 50 included)


def _demo(preset: str = "nano", extra=()):
    # the measured figures above are of the demo with every replica holding its stage's whole optimizer state,
    # in micro-batches of 4 sequences
    job, cfg, par = load_job_for_plan("configs/demo.yaml", [f"model.preset={preset}", "data.path=/nonexistent",
                                                            "train.distributed_optimizer=false",
                                                            "train.micro_batch_size=4", *extra])
    cluster = load_cluster("clusters/local-sim.yaml")
    return job, cfg, cluster, Layout(par.tp, par.pp, par.ep, par.dp, job.train.micro_batch_size)


@pytest.mark.parametrize("preset", ["nano", "small"])
def test_stage_parameters_add_up_to_the_model(preset):
    from v4train.model.budget import param_counts
    from v4train.model.config import ModelConfig

    cfg = ModelConfig.preset(preset)
    total = param_counts(cfg)["total_with_mtp"]
    ((_, dense, expert),) = stage_parameters(cfg, 1)
    assert dense + expert == total
    two = stage_parameters(cfg, 2)
    # with pp > 1 the last stage holds its own copy of the embedding for MTP
    assert sum(d + e for _, d, e in two) == total + cfg.vocab_size * cfg.dim


def _saved_bytes(cfg, B: int, S: int, precision: str = "fp32") -> int:
    """Bytes autograd saves in one training forward of the whole model under ``precision`` (unique storages, no
    parameters or their bf16 compute copies)."""
    from v4train.model import V4Stage
    from v4train.parallel.mixed_precision import MixedPrecision

    torch.manual_seed(0)
    stage = V4Stage(cfg, pp_rank=0, pp_size=1)
    stage.attention_mode = "dense"
    stage.init_weights(0)
    seen, total = set(), [0]

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen and ptr not in skip:
            seen.add(ptr)
            total[0] += t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, cfg.vocab_size, (B, S))
    with MixedPrecision(stage, precision).compute():
        skip = {t.untyped_storage().data_ptr() for t in [*stage.parameters(), *stage.buffers()]}
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            stage(ids, torch.arange(S).expand(B, S), ids)
    return total[0]


def _saved_elements(cfg, B: int, S: int) -> float:
    """Elements autograd saves in one fp32 training forward of the whole model."""
    return _saved_bytes(cfg, B, S) / 4


@pytest.mark.parametrize("preset,seq", [("nano", 128), ("small", 256)])
def test_activation_model_matches_autograds_saved_tensors(preset, seq):
    from v4train.model.config import ModelConfig
    from v4train.orchestrator.tools.plan_memory import head_elements, head_weight_elements

    cfg = ModelConfig.preset(preset, vocab_size=1024)
    ids = list(range(cfg.n_layers + cfg.mtp_depth))
    predicted = (sum(sum(activation_elements(cfg, i, seq, "dense")) for i in ids) + head_elements(cfg, 1)
                 + head_weight_elements(cfg, 1) / (2 * seq))  # per micro-batch, spread over its 2 x seq tokens
    measured = _saved_elements(cfg, 2, seq) / (2 * seq)
    assert predicted == pytest.approx(measured, rel=0.10), (predicted, measured)


@pytest.mark.parametrize("preset,seq", [("nano", 128), ("small", 256)])
def test_bf16_activation_bytes_match_autograds_saved_storages(preset, seq):
    """The planner's bytes per activation element under bf16 are what a bf16 forward saves per element an fp32
    forward saves (within 5%)."""
    from v4train.model.config import ModelConfig
    from v4train.orchestrator.tools.plan import BF16_ACTIVATION_BYTES

    cfg = ModelConfig.preset(preset, vocab_size=1024)
    fp32_elements = _saved_bytes(cfg, 2, seq) / 4
    assert _saved_bytes(cfg, 2, seq, "bf16") / fp32_elements == pytest.approx(BF16_ACTIVATION_BYTES, rel=0.05)


@pytest.mark.parametrize("preset", ["nano", "small"])
def test_plan_memory_is_within_25_percent_of_measured_runs(preset):
    # the measured runs split the layers evenly
    job, cfg, cluster, layout = _demo(preset, extra=["parallel.stage_layers=[2, 2]" if preset == "nano"
                                                     else "parallel.stage_layers=[3, 3]"])
    plan = plan_job(cfg, job, cluster, layout)
    for stage, measured in zip(plan.stages, MEASURED_MB[preset], strict=True):
        assert stage.total / 2**20 == pytest.approx(measured, rel=0.25), (preset, stage.pp_rank, stage.total / 2**20)
    if preset == "nano":
        assert plan.peak.total / 2**20 == pytest.approx(MEASURED_DEMO_RUN_PEAK_MB, rel=0.25)
    assert plan.fits and plan.bubble == pytest.approx(1 / 3)


def test_bubble_communication_and_recompute():
    job, cfg, cluster, _ = _demo()
    shape = Shape(256, 16, 1)
    p1 = plan_layout(cfg, job, cluster, Layout(1, 2, 1, 2, 1), shape)  # m = 8 micro-batches
    assert p1.bubble == pytest.approx(1 / 9)
    assert p1.comm_bytes["tp"] == p1.comm_bytes["ep"] == 0 and p1.comm_bytes["pp"] > 0 and p1.comm_bytes["dp"] > 0
    full = plan_layout(cfg, job, cluster, Layout(1, 2, 1, 2, 1, "full"), shape)
    assert full.stages[0].parts["activations"] < p1.stages[0].parts["activations"] / 5
    assert full.time_parts["compute"] > p1.time_parts["compute"]
    single = plan_layout(cfg, job, cluster, Layout(1, 1, 1, 4, 1), shape)
    assert single.bubble == 0 and single.comm_bytes["pp"] == 0


def test_pro_on_h200_fits_with_its_figures():
    job, cfg, par = load_job_for_plan("configs/pro-h200.yaml", [])
    cluster = load_cluster("clusters/h200-pro.yaml")
    assert cfg.n_routed_experts == 384 and cluster.world_size == 1024
    layout = Layout(par.tp, par.pp, par.ep, par.dp, job.train.micro_batch_size, "full")
    plan = plan_job(cfg, job, cluster, layout)
    assert plan.fits, plan.peak.total / 2**30
    assert 30 * 2**30 < plan.peak.total < 0.9 * 141e9
    assert not plan_job(cfg, job, cluster, Layout(par.tp, par.pp, par.ep, par.dp, 1, "none")).fits
    found = suggest(cfg, job, cluster, limit=3)
    assert found and all(p.fits for p in found)


def test_plan_cli(capsys):
    assert main(["plan", "configs/demo.yaml", "--cluster", "clusters/local-sim.yaml", "--suggest", "2"]) == 0
    out = capsys.readouterr().out
    for text in ("baseline", "optimizer", "activations", "kv_compressor", "pipeline bubble (1F1B): 50.0%", "fits",
                 "layouts that fit"):
        assert text in out
    assert main(["plan", "configs/pro-h200.yaml", "--cluster", "clusters/h200-pro.yaml", "--suggest", "0"]) == 0
    assert "recompute=full" in capsys.readouterr().out  # the job's train.recompute
    assert main(["plan", "configs/pro-h200.yaml", "--cluster", "clusters/h200-pro.yaml", "--recompute", "none",
                 "--suggest", "0"]) == 1
    assert "with train.recompute full" in capsys.readouterr().out
    assert main(["plan", "configs/pro-h200.yaml", "--cluster", "clusters/h200-pro.yaml", "--recompute", "full",
                 "--suggest", "0", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["plan"]["fits"] and len(data["plan"]["stages"]) == 16
    assert main(["plan", "configs/demo.yaml", "--cluster", "clusters/local-sim.yaml", "--layout", "dp=4"]) == 2
    assert "ranks exceed the cluster's" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_plan_matches_a_live_run(tmp_path):
    """Train the demo job for 15 steps on the simulated cluster; the plan's peak is within 25% of the measured one."""
    import subprocess
    import sys
    from pathlib import Path

    if not Path("datasets/shakespeare/dataset.json").is_file():
        pytest.skip("needs datasets/shakespeare (make demo)")
    run = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "v4train.orchestrator.tools.cli", "submit", "configs/demo.yaml", "--cluster",
                    "clusters/local-sim.yaml", "--run-dir", str(run), "--set", "train.steps=15", "--set",
                    "train.eval_batches=0", "--set", "checkpoint.every_steps=0", "--set", "train.micro_batch_size=4"],
                   check=True, timeout=800)
    measured = max(json.loads(line)["peak_rss_mb"] for line in (run / "metrics.jsonl").read_text().splitlines())
    # as the live run trained: the demo with its distributed optimizer, in micro-batches of 4 (as _demo pins)
    job, cfg, cluster, layout = _demo("nano", ["checkpoint.every_steps=0", "train.distributed_optimizer=true"])
    assert plan_job(cfg, job, cluster, layout).peak.total / 2**20 == pytest.approx(measured, rel=0.25)


def test_distributed_optimizer_divides_only_the_optimizer_state():
    """train.distributed_optimizer: each stage's optimizer term is 1/DP of the replicated one (dense over DP,
    experts over expert-DP: here the same 2 ranks), parameters and gradients unchanged; off, no division."""
    job, cfg, cluster, layout = _demo()
    on, _, _, _ = _demo(extra=("train.distributed_optimizer=true",))
    assert layout.dp == 2 and not job.train.distributed_optimizer
    shape = job_shapes(job)[0]
    plain, sharded = plan_layout(cfg, job, cluster, layout, shape), plan_layout(cfg, on, cluster, layout, shape)
    for a, b in zip(plain.stages, sharded.stages, strict=True):
        assert b.parts["optimizer"] == pytest.approx(a.parts["optimizer"] / 2)
        assert a.parts["optimizer"] == 8 * (a.dense_params + a.expert_params)
        assert (b.parts["parameters"], b.parts["gradients"]) == (a.parts["parameters"], a.parts["gradients"])
    # 4 data-parallel ranks with 2 expert-parallel: dense over 4, experts over 2
    wide = dataclasses.replace(layout, pp=1, dp=4, ep=2)
    (stage,) = plan_layout(cfg, on, cluster, wide, shape).stages
    assert stage.parts["optimizer"] == pytest.approx(8 * (stage.dense_params / 4 + stage.expert_params / 2 / 2))
    # context parallel ranks hold replicas too: the trainer shards dense state over dp x cp (its data_group), and
    # experts over the expert-data-parallel group tp x cp x dp / ep
    context = dataclasses.replace(layout, pp=1, dp=2, ep=2, cp=2)
    (stage,) = plan_layout(cfg, on, cluster, context, shape).stages
    assert stage.parts["optimizer"] == pytest.approx(8 * (stage.dense_params / 4 + stage.expert_params / 2 / 2))


def test_bf16_masters_are_sharded_with_the_distributed_optimizer():
    """precision bf16: each bf16-computed parameter costs its fp32 master and bf16 copy (4 + 2 bytes), the fp32-kept
    ones 4; with the distributed optimizer the masters are 4 / DP (here dense and experts over the same 2 ranks)."""
    from v4train.orchestrator.tools.plan_memory import stage_fp32_parameters

    job, cfg, cluster, layout = _demo(extra=("train.precision=bf16",))
    on, _, _, _ = _demo(extra=("train.precision=bf16", "train.distributed_optimizer=true"))
    shape = job_shapes(job)[0]
    plain, sharded = plan_layout(cfg, job, cluster, layout, shape), plan_layout(cfg, on, cluster, layout, shape)
    kept = stage_fp32_parameters(cfg, layout.pp, [len(s.layers) for s in plain.stages])
    for a, b, fp32 in zip(plain.stages, sharded.stages, kept, strict=True):
        bf16 = a.dense_params + a.expert_params - fp32
        assert 0 < fp32 < bf16
        assert a.parts["parameters"] == pytest.approx(4 * fp32 + 6 * bf16)
        assert b.parts["parameters"] == pytest.approx(4 * fp32 + (2 + 4 / 2) * bf16)


def test_checkpoint_copies_are_what_the_rank_keeps():
    """Every save keeps a host copy of the rank's fp32 parameters and whole optimizer state (12 bytes per
    parameter), the 2 newest of them, synchronous or asynchronous, and never a third (a save reuses or frees the
    oldest first); a job that saves only at its end holds its one copy as the save's transient (counted where
    it exceeds the activations), and nothing is counted when the job never saves."""
    shape_of = lambda job: job_shapes(job)[0]  # noqa: E731
    transient = lambda s: sum(s.parts.get(k, 0.0) for k in ("activations", "kv_compressor", "workspace",  # noqa: E731
                                                             "head_weight_grad", "recomputed_layer"))
    # micro-batches of one sequence: the activations a save's transient replaces are smaller than a copy
    for extra in (("checkpoint.async_save=true",), ("checkpoint.async_save=false",)):
        job, cfg, cluster, layout = _demo(extra=("checkpoint.every_steps=10", "train.micro_batch_size=1", *extra))
        for s in plan_layout(cfg, job, cluster, layout, shape_of(job)).stages:
            copy = 12 * (s.dense_params + s.expert_params / layout.ep)
            assert s.parts["saved_copies"] == 2 * copy and copy > transient(s), extra
            assert s.parts["checkpoint_save"] == 0, extra  # nothing gathered: no distributed optimizer
    job, cfg, cluster, layout = _demo(extra=("checkpoint.every_steps=0", "checkpoint.at_end=true",
                                             "train.micro_batch_size=1"))
    for s in plan_layout(cfg, job, cluster, layout, shape_of(job)).stages:
        copy = 12 * (s.dense_params + s.expert_params / layout.ep)
        assert s.parts["saved_copies"] == 0 and copy > transient(s)
        assert s.parts["checkpoint_save"] == pytest.approx(copy - transient(s))
    job, cfg, cluster, layout = _demo(extra=("checkpoint.every_steps=0", "checkpoint.at_end=false"))
    for s in plan_layout(cfg, job, cluster, layout, shape_of(job)).stages:
        assert s.parts["saved_copies"] == 0 and s.parts["checkpoint_save"] == 0
