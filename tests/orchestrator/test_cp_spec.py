"""``parallel.cp`` in job files and the planner: bad input refused before start, naming the field; the
planner divides a rank's activations by cp and adds the exchange buffers and traffic."""

from __future__ import annotations

import pytest

from v4train.orchestrator.tools.plan import Layout, job_shapes, plan_layout
from v4train.orchestrator.spec import SpecError, load_cluster, load_job, validate_against_cluster

DEMO = ["data.path=/nonexistent"]


def _job(path, *overrides):
    return load_job(path, [*DEMO, *overrides], check_data=False)


def test_cp_must_split_every_stage_into_whole_blocks():
    _job("configs/demo.yaml", "parallel.cp=4", "parallel.dp=1")  # 256 = 2 * 4 chunks of one 32-token block
    with pytest.raises(SpecError, match=r"curriculum.stages.0.seq_len=64 with parallel.cp=2.*multiple of 128"):
        _job("configs/curriculum.yaml", "parallel.cp=2", "parallel.dp=1")
    with pytest.raises(SpecError, match=r"data.seq_len=256 with parallel.cp=3"):
        _job("configs/demo.yaml", "parallel.cp=3", "parallel.dp=1", "curriculum=null")


def test_layout_must_fit_the_devices():
    cluster = load_cluster("clusters/local-sim.yaml")
    with pytest.raises(SpecError, match=r"tp x cp x pp x dp = 8 ranks exceed the cluster's nodes x devices_per_node"):
        validate_against_cluster(_job("configs/demo.yaml", "parallel.cp=2"), cluster)
    validate_against_cluster(_job("configs/demo.yaml", "parallel.cp=2", "parallel.dp=1"), cluster)  # 4 devices


def test_the_evaluation_length_must_split_into_whole_blocks_too():
    with pytest.raises(SpecError, match=r"train.eval_seq_len=192 with parallel.cp=2.*multiple of 128"):
        _job("configs/demo.yaml", "parallel.cp=2", "parallel.dp=1", "train.eval_seq_len=192")
    _job("configs/demo.yaml", "parallel.cp=2", "parallel.dp=1", "train.eval_seq_len=192", "train.eval_batches=0")


def test_a_stage_that_does_not_fit_at_this_cp_is_refused_naming_it():
    job = _job("configs/demo.yaml", "parallel.cp=2", "parallel.dp=1",
               'curriculum.stages=[{"seq_len": 256, "tokens": 409600, "attention": "dense"},'
               ' {"seq_len": 1048576, "attention": "sparse"}]')
    with pytest.raises(SpecError, match=r"curriculum.stages.1.seq_len=1048576: .* GiB per device at parallel.cp=2"):
        validate_against_cluster(job, load_cluster("clusters/local-sim.yaml"))


def test_planner_divides_activations_by_cp_and_counts_the_exchange():
    job = _job("configs/demo.yaml", "parallel.pp=1", "parallel.dp=1")
    cluster = load_cluster("clusters/local-sim.yaml")
    cfg = job.model.build()
    shape = job_shapes(job)[-1]
    one = plan_layout(cfg, job, cluster, Layout(1, 1, 1, 1, 4), shape)
    four = plan_layout(cfg, job, cluster, Layout(1, 1, 1, 1, 4, cp=4), shape)
    assert four.stages[0].parts["activations"] == pytest.approx(one.stages[0].parts["activations"] / 4)
    assert four.stages[0].parts["cp_exchange"] > 0 and "cp_exchange" not in one.stages[0].parts
    assert four.comm_bytes["cp"] > 0 and "cp" not in one.comm_bytes


def test_the_distributed_optimizer_shards_over_context_parallel_ranks_without_a_warning():
    from v4train.orchestrator.spec.files import job_warnings

    sharded = _job("configs/demo.yaml", "parallel.cp=2", "parallel.dp=1", "parallel.pp=1",
                   "train.distributed_optimizer=true")
    assert job_warnings(sharded) == []
    alone = _job("configs/demo.yaml", "parallel.dp=1", "parallel.pp=1", "train.distributed_optimizer=true")
    assert any("shards nothing" in w for w in job_warnings(alone))
