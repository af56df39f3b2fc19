"""End-to-end through the real stack (Supervisor -> Ray RankWorkers -> Megatron groups and schedules on gloo):
parity across pipeline/data-parallel layouts, and exact resume from a committed checkpoint."""

from __future__ import annotations

import shutil

import pytest
import torch

from support.checkpoints import checkpoint_tensors
from support.jobs import CALL_TIMEOUT_S, POOL_SIZE, run_job, tiny_job

# (TP, PP, EP, DP, VP): the parity suite, with interleaved 1F1B (VP = 2), at most 4 ranks each
LAYOUTS = [(1, 1, 1, 1, 1), (2, 1, 1, 1, 1), (1, 2, 1, 1, 1), (1, 1, 1, 2, 1), (1, 1, 2, 2, 1), (2, 2, 1, 1, 1),
           (2, 1, 2, 1, 1), (1, 2, 2, 2, 1), (1, 2, 1, 1, 2), (2, 2, 1, 1, 2)]


@pytest.mark.timeout(1200)
def test_losses_equal_across_all_parallel_layouts(rank_pool, tiny_dataset, tmp_path):
    """Every (TP, PP, EP, DP, VP) layout logs the single-process losses (1e-5) and global gradient norms
    (1e-4), with Muon."""
    results = {}
    for tp, pp, ep, dp, vp in LAYOUTS:
        job = tiny_job(tiny_dataset, parallel={"tp": tp, "pp": pp, "ep": ep, "dp": dp, "vp": vp})
        metrics, _, _ = run_job(rank_pool, job, tmp_path / f"tp{tp}pp{pp}ep{ep}dp{dp}vp{vp}")
        results[(tp, pp, ep, dp, vp)] = metrics
    reference = results[(1, 1, 1, 1, 1)]
    assert [m["step"] for m in reference] == [1, 2, 3]
    assert reference[-1]["loss"] < reference[0]["loss"]
    for layout, metrics in results.items():
        for ref, got in zip(reference, metrics, strict=True):
            assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5), (layout, got["step"])
            assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4), (layout, got["step"])
            assert got["consumed_tokens"] == ref["consumed_tokens"]


# (TP, PP, EP, DP, VP) layouts of the distributed-Muon parity test (the pool holds 4 ranks)
DISTRIBUTED_MUON_LAYOUTS = [(1, 1, 1, 4, 1), (1, 2, 2, 2, 1), (2, 1, 1, 2, 1)]


@pytest.mark.timeout(1200)
def test_distributed_muon_equals_the_plain_run(rank_pool, tiny_dataset, tmp_path):
    """train.distributed_muon: losses and every parameter, Muon momentum and AdamW moment after 3 steps
    equal the plain Muon run of the same layout (1e-6 relative), from the global checkpoint each writes."""
    for tp, pp, ep, dp, vp in DISTRIBUTED_MUON_LAYOUTS:
        runs = {}
        for distributed in (False, True):
            name = f"tp{tp}pp{pp}ep{ep}dp{dp}_{'distributed' if distributed else 'plain'}"
            job = tiny_job(tiny_dataset, parallel={"tp": tp, "pp": pp, "ep": ep, "dp": dp, "vp": vp},
                           train={"distributed_muon": distributed}, checkpoint={"every_steps": 0, "at_end": True})
            metrics, _, _ = run_job(rank_pool, job, tmp_path / name)
            runs[distributed] = metrics, checkpoint_tensors(tmp_path / name / "step_00000003")
        (reference, ref), (metrics, got) = runs[False], runs[True]
        assert any(k.endswith(".momentum_buffer") for k in ref)
        for a, b in zip(reference, metrics, strict=True):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-6), ((tp, pp, ep, dp), b["step"])
        assert got.keys() == ref.keys()
        for key, want in ref.items():
            if isinstance(want, torch.Tensor) and want.is_floating_point() and want.norm() > 0:
                assert ((got[key] - want).norm() / want.norm()).item() <= 1e-6, ((tp, pp, ep, dp), key)


# (TP, PP, EP, DP, VP) layouts of the distributed-optimizer parity test (each with data parallelism; the
# element ranges of the AdamW state straddle parameters at every one of them)
DISTRIBUTED_OPTIMIZER_LAYOUTS = [(1, 1, 1, 4, 1), (1, 2, 2, 2, 1), (2, 1, 1, 2, 1)]


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("layout", DISTRIBUTED_OPTIMIZER_LAYOUTS, ids=lambda t: "tp{}pp{}ep{}dp{}vp{}".format(*t))
def test_distributed_optimizer_equals_the_plain_run(rank_pool, tiny_dataset, tmp_path, layout):
    """train.distributed_optimizer: the losses of 3 steps and every parameter, AdamW moment and Muon momentum of the
    global end checkpoint are bit-identical to the plain run of the same layout (both runs sum each gradient
    element in one order: the flat buffer the distributed optimizer reduce-scatters is the one the plain run
    all-reduces); the global gradient norms, summed per owned range instead of per tensor, within 1e-6."""
    _assert_distributed_optimizer_parity(rank_pool, tiny_dataset, tmp_path, layout)


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_distributed_optimizer_equals_the_plain_run_on_8_ranks(tiny_dataset, tmp_path):
    """As above at TP 2 x PP 2 x DP 2 (8 ranks: fresh actors of their own, beside the 4-rank pool; each run's
    calls are bounded by the group's call timeout, so a hang fails)."""
    from v4train.orchestrator.control.ray_group import RayRankGroup, start_ray

    start_ray(num_cpus=POOL_SIZE * 3, object_store_memory_mb=256)  # no-op when the pool's Ray is up

    def make_workers():
        return RayRankGroup.create(8, CALL_TIMEOUT_S, spares=0)

    _assert_distributed_optimizer_parity(None, tiny_dataset, tmp_path, (2, 2, 1, 2, 1), make_workers)


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("dp", [2, 4])
def test_bf16_distributed_optimizer_equals_the_plain_bf16_run(rank_pool, tiny_dataset, tmp_path, dp):
    """precision bf16 with the distributed optimizer, whose ranks keep only the fp32 masters they update and every
    other bf16-computed weight as its bf16 copy: the losses of 3 steps and every fp32 master, moment and momentum of
    the end checkpoint are bit-identical to the bf16 run without it."""
    _assert_distributed_optimizer_parity(rank_pool, tiny_dataset, tmp_path, (1, 1, 1, dp, 1), precision="bf16")


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_bf16_sharded_masters_checkpoint_resumes_in_fp32_at_another_dp_and_back(rank_pool, tiny_dataset, tmp_path):
    """A bf16 run with sharded masters at DP 4 saves fp32 masters: it resumes bf16 without the distributed optimizer
    (the straight run's losses, bitwise) and fp32 at DP 2 (2%); an fp32 checkpoint resumes in bf16 with sharded
    masters at DP 2 (2% of the bf16 run)."""
    def job(dp, precision, distributed):
        return tiny_job(tiny_dataset, parallel={"dp": dp}, checkpoint={"every_steps": 2, "at_end": True},
                        train={"steps": 4, "precision": precision, "distributed_optimizer": distributed})

    straight, _, _ = run_job(rank_pool, job(4, "bf16", True), tmp_path / "straight")
    fp32, _, _ = run_job(rank_pool, job(4, "fp32", False), tmp_path / "fp32")
    saved = checkpoint_tensors(tmp_path / "straight" / "step_00000002")
    assert any(k.startswith("model.") for k in saved)
    assert all(v.dtype != torch.bfloat16 for v in saved.values() if isinstance(v, torch.Tensor))
    for name, source, dp, precision, distributed, rel in (("bf16_plain_dp4", "straight", 4, "bf16", False, 0.0),
                                                          ("fp32_dp2", "straight", 2, "fp32", False, 2e-2),
                                                          ("bf16_zero1_dp2_from_fp32", "fp32", 2, "bf16", True, 2e-2)):
        shutil.copytree(tmp_path / source / "step_00000002", tmp_path / name / "step_00000002")
        resumed, events, _ = run_job(rank_pool, job(dp, precision, distributed), tmp_path / name,
                                     resume_from="step_00000002")
        assert events[0]["event"] == "start" and events[0]["step"] == 2
        for a, b in zip(straight[2:], resumed, strict=True):
            assert b["loss"] == pytest.approx(a["loss"], rel=rel), (name, b["step"])


def _assert_distributed_optimizer_parity(pool, dataset, tmp_path, layout, make_workers=None, precision="fp32"):
    tp, pp, ep, dp, vp = layout
    runs = {}
    for distributed in (False, True):
        name = f"tp{tp}pp{pp}ep{ep}dp{dp}_{precision}_{'zero1' if distributed else 'plain'}"
        job = tiny_job(dataset, parallel={"tp": tp, "pp": pp, "ep": ep, "dp": dp, "vp": vp},
                       train={"distributed_optimizer": distributed, "precision": precision},
                       checkpoint={"every_steps": 0, "at_end": True})
        metrics, _, _ = run_job(pool, job, tmp_path / name, make_workers=make_workers)
        runs[distributed] = metrics, checkpoint_tensors(tmp_path / name / "step_00000003")
    (reference, ref), (metrics, got) = runs[False], runs[True]
    assert any(".exp_avg_sq" in k for k in ref) and any(k.endswith(".momentum_buffer") for k in ref)
    for a, b in zip(reference, metrics, strict=True):
        assert b["loss"] == a["loss"], (layout, b["step"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-6), (layout, b["step"])
    assert got.keys() == ref.keys()
    for key, want in ref.items():
        if isinstance(want, torch.Tensor):
            assert torch.equal(got[key], want), (layout, key, (got[key].double() - want.double()).abs().max().item())


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_distributed_optimizer_checkpoint_resumes_without_it_and_at_another_dp(rank_pool, tiny_dataset, tmp_path):
    """A checkpoint written with the distributed optimizer at DP 4 (AdamW moments in element ranges, Muon momentum
    with whole-matrix owners) resumes without it at DP 4 (the straight run's losses, 1e-6) and with it at PP 2 x
    DP 2 (1e-5: another reduction order); one written without it at DP 4 resumes with it at DP 2 (1e-5)."""
    def job(parallel, distributed):
        return tiny_job(tiny_dataset, parallel=parallel, train={"steps": 4, "distributed_optimizer": distributed},
                        checkpoint={"every_steps": 2, "at_end": True})

    straight, _, _ = run_job(rank_pool, job({"dp": 4}, True), tmp_path / "straight")
    plain, _, _ = run_job(rank_pool, job({"dp": 4}, False), tmp_path / "plain")
    for a, b in zip(straight, plain, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6), b["step"]
    for name, source, parallel, distributed, rel in (("plain_dp4", "straight", {"dp": 4}, False, 1e-6),
                                                     ("zero1_pp2dp2", "straight", {"pp": 2, "dp": 2}, True, 1e-5),
                                                     ("zero1_dp2_from_plain", "plain", {"dp": 2}, True, 1e-5)):
        shutil.copytree(tmp_path / source / "step_00000002", tmp_path / name / "step_00000002")
        resumed, events, _ = run_job(rank_pool, job(parallel, distributed), tmp_path / name,
                                     resume_from="step_00000002")
        assert events[0]["event"] == "start" and events[0]["step"] == 2
        for a, b in zip(straight[2:], resumed, strict=True):
            assert b["loss"] == pytest.approx(a["loss"], rel=rel), (name, b["step"])


# (TP, PP, EP, DP, VP) layouts of the recompute parity test (the pool holds 4 ranks): data parallel,
# pipeline with expert parallel, tensor parallel under interleaved pipelining; TP 2 x PP 2 x DP 2 below
RECOMPUTE_LAYOUTS = [(1, 1, 1, 4, 1), (1, 2, 2, 2, 1), (2, 2, 1, 1, 2)]


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("layout", RECOMPUTE_LAYOUTS, ids=lambda t: "tp{}pp{}ep{}dp{}vp{}".format(*t))
def test_recompute_equals_the_plain_run(rank_pool, tiny_dataset, tmp_path, layout):
    """train.recompute selective and full: losses, balance and MTP metrics and every tensor of the end
    checkpoint (parameters, router biases, Muon momentum, AdamW moments) after 3 steps are bit-identical to
    the run without recompute of the same layout (recomputed regions re-run the same operations, their
    collectives included, and replay the routing)."""
    _assert_recompute_parity(rank_pool, tiny_dataset, tmp_path, layout)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_recompute_equals_the_plain_run_on_8_ranks(tiny_dataset, tmp_path):
    """As above at TP 2 x PP 2 x DP 2 (8 ranks: fresh actors of their own, as the 8-rank distributed-optimizer
    test)."""
    from v4train.orchestrator.control.ray_group import RayRankGroup, start_ray

    start_ray(num_cpus=POOL_SIZE * 3, object_store_memory_mb=256)  # no-op when the pool's Ray is up

    def make_workers():
        return RayRankGroup.create(8, CALL_TIMEOUT_S, spares=0)

    _assert_recompute_parity(None, tiny_dataset, tmp_path, (2, 2, 1, 2, 1), make_workers)


def _assert_recompute_parity(pool, dataset, tmp_path, layout, make_workers=None):
    tp, pp, ep, dp, vp = layout
    runs = {}
    for recompute in ("none", "selective", "full"):
        name = f"tp{tp}pp{pp}ep{ep}dp{dp}vp{vp}_{recompute}"
        job = tiny_job(dataset, parallel={"tp": tp, "pp": pp, "ep": ep, "dp": dp, "vp": vp},
                       train={"recompute": recompute}, checkpoint={"every_steps": 0, "at_end": True})
        metrics, _, _ = run_job(pool, job, tmp_path / name, make_workers=make_workers)
        runs[recompute] = metrics, checkpoint_tensors(tmp_path / name / "step_00000003")
    reference, ref = runs["none"]
    assert any(k.endswith(".momentum_buffer") for k in ref) and any(".exp_avg_sq" in k for k in ref)
    for recompute in ("selective", "full"):
        metrics, got = runs[recompute]
        for a, b in zip(reference, metrics, strict=True):
            for key in ("loss", "grad_norm", "balance_loss", "mtp_loss"):
                assert b.get(key) == a.get(key), (layout, recompute, key, b["step"])
        assert got.keys() == ref.keys()
        for key, want in ref.items():
            if isinstance(want, torch.Tensor):
                assert torch.equal(got[key], want), (layout, recompute, key)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_bf16_trains_close_to_fp32_and_resumes_across_precisions(rank_pool, tiny_dataset, tmp_path):
    """train.precision bf16 at pp 2 x dp 2: losses within 2% of the fp32 run, checkpoints hold fp32 masters
    (the same keys and dtypes as fp32's), a bf16 run resumes an fp32 checkpoint and an fp32 run a bf16 one."""
    def job(precision):
        return tiny_job(tiny_dataset, parallel={"pp": 2, "dp": 2}, train={"steps": 4, "precision": precision},
                        checkpoint={"every_steps": 2, "at_end": True})

    fp32, _, _ = run_job(rank_pool, job("fp32"), tmp_path / "fp32")
    bf16, _, _ = run_job(rank_pool, job("bf16"), tmp_path / "bf16")
    for a, b in zip(fp32, bf16, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-2), b["step"]
    assert all(a["loss"] != b["loss"] for a, b in zip(fp32, bf16, strict=True))  # bf16 did compute in bf16
    ref = checkpoint_tensors(tmp_path / "fp32" / "step_00000004")
    got = checkpoint_tensors(tmp_path / "bf16" / "step_00000004")
    assert got.keys() == ref.keys()
    for key, want in ref.items():
        if isinstance(want, torch.Tensor):
            assert got[key].dtype == want.dtype, key
    for precision, source in (("bf16", "fp32"), ("fp32", "bf16")):
        run = tmp_path / f"{precision}_from_{source}"
        shutil.copytree(tmp_path / source / "step_00000002", run / "step_00000002")
        resumed, events, _ = run_job(rank_pool, job(precision), run, resume_from="step_00000002")
        assert events[0]["event"] == "start" and events[0]["step"] == 2
        assert [m["step"] for m in resumed] == [3, 4]
        for a, b in zip(fp32[2:], resumed, strict=True):
            assert b["loss"] == pytest.approx(a["loss"], rel=2e-2), (precision, b["step"])


@pytest.mark.timeout(900)
def test_resume_from_checkpoint_is_bitwise(rank_pool, tiny_dataset, tmp_path):
    job = tiny_job(
        tiny_dataset,
        parallel={"pp": 2, "dp": 2},
        train={"steps": 6, "warmup_steps": 2},
        checkpoint={"every_steps": 3, "at_end": True},
    )
    straight, events, _ = run_job(rank_pool, job, tmp_path / "straight")
    committed = [e["step"] for e in events if e["event"] == "checkpoint_committed"]
    assert committed == [3, 6]

    shutil.copytree(tmp_path / "straight" / "step_00000003", tmp_path / "resumed" / "step_00000003")
    resumed, revents, sup = run_job(rank_pool, job, tmp_path / "resumed", resume_from="step_00000003")
    assert revents[0]["event"] == "start" and revents[0]["step"] == 3
    assert [m["step"] for m in resumed] == [4, 5, 6]
    for a, b in zip(straight[3:], resumed, strict=True):
        for key in ("loss", "grad_norm", "lr", "consumed_tokens", "consumed_samples"):
            assert a[key] == b[key], (key, a["step"])

    # Parameters, Adam moments and step counters, MoE expert biases: bit-identical at the end.
    ref = checkpoint_tensors(tmp_path / "straight" / "step_00000006")
    got = checkpoint_tensors(tmp_path / "resumed" / "step_00000006")
    assert ref.keys() == got.keys()
    assert any(".exp_avg_sq" in k for k in ref) and any("bias" in k for k in ref)
    for key in ref:
        assert torch.equal(ref[key], got[key]), key


@pytest.mark.timeout(600)
def test_resume_refuses_checkpoint_of_another_model(rank_pool, tiny_dataset, tmp_path):
    job = tiny_job(tiny_dataset, train={"steps": 1}, checkpoint={"every_steps": 1})
    run_job(rank_pool, job, tmp_path / "a")
    other = tiny_job(tiny_dataset, train={"steps": 2})
    other["model"]["moe_inter_dim"] = 32
    shutil.copytree(tmp_path / "a" / "step_00000001", tmp_path / "b" / "step_00000001")
    _, events, sup = run_job(rank_pool, other, tmp_path / "b", resume_from="step_00000001", expect_failure=True)
    assert "saved for model" in str(sup.failure)
    assert [e["event"] for e in events] == ["failure"]
