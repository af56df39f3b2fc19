"""Bad input exits non-zero with one line naming the field, before Ray or any rank starts."""

import json
import math

import pytest
import yaml

from v4train.orchestrator.control import ray_start
from v4train.orchestrator.tools import cli
from v4train.orchestrator.curriculum import lr_at, plan_at, plan_step
from v4train.orchestrator.spec import SpecError, TrainSpec, apply_overrides, job_warnings, load_job


@pytest.fixture
def job_files(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    (data / "dataset.json").write_text(json.dumps({"vocab_size": 512}))
    job = {
        "name": "t",
        "model": {"preset": "nano"},
        "data": {"path": str(data), "seq_len": 64},
        "train": {"steps": 4, "global_batch": 8, "micro_batch_size": 2, "lr": 1e-3},
        "parallel": {"pp": 2, "dp": 2},
    }
    cluster = {"name": "sim4", "devices_per_node": 4}
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(cluster))

    def never_start_ray(*args, **kwargs):
        raise AssertionError("Ray was started for an invalid job")

    monkeypatch.setattr(ray_start, "start_ray", never_start_ray)
    monkeypatch.chdir(tmp_path)
    return tmp_path, job


def _submit(tmp_path, job, capsys, *extra):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    code = cli.main(["submit", str(path), "--cluster", str(tmp_path / "cluster.yaml"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda j: j["train"].update(bogus=1), "train.bogus: unknown key"),
        (lambda j: j.update(extra_section={}), "extra_section: unknown key"),
        (lambda j: j["model"].update(not_a_field=3), "model.not_a_field"),
        (lambda j: j["train"].update(lr="fast"), "train.lr"),
        (lambda j: j["parallel"].update(dp=4), "parallel: tp x cp x pp x dp = 8 ranks exceed the cluster's nodes x "
                                               "devices_per_node = 1 x 4 = 4 devices (cluster sim4)"),
        (lambda j: j["data"].update(path="/nonexistent/dir"), "data.path: directory /nonexistent/dir not found"),
        (lambda j: j["train"].update(global_batch=6), "train.global_batch"),
        (lambda j: j["model"].update(n_layers=0), "model:"),
        (lambda j: j["train"].update(recompute="most"), "train.recompute"),
        (lambda j: j["train"].update(precision="fp16"), "train.precision"),
        (lambda j: j["model"].update(preset="flash"), "parallel: layout tp1 pp2 ep1 dp2 mbs2 recompute=none with "
                                                      "train.precision fp32 needs"),
    ],
)
def test_bad_input_one_line_naming_the_field(job_files, capsys, mutate, field):
    tmp_path, job = job_files
    mutate(job)
    code, err = _submit(tmp_path, job, capsys)
    assert code == 2
    assert len(err) == 1, err
    assert field in err[0]
    assert not (tmp_path / "runs").exists()


def test_set_overrides_are_dotted_and_typed(job_files, capsys):
    tmp_path, job = job_files
    code, err = _submit(tmp_path, job, capsys, "--set", "train.lr=abc")
    assert code == 2 and "train.lr" in err[0]
    raw = apply_overrides({"train": {"steps": 1}}, ["train.steps=20", "train.lr=3e-3", "parallel.pp=2"])
    assert raw == {"train": {"steps": 20, "lr": "3e-3"}, "parallel": {"pp": 2}}
    with pytest.raises(SpecError, match="dotted.key=value"):
        apply_overrides({}, ["novalue"])


def test_scientific_notation_without_dot_is_a_number(job_files):
    tmp_path, job = job_files
    job["train"]["lr"] = "3e-3"  # YAML 1.1 reads 3e-3 as a string; the spec must still take it
    (tmp_path / "j.yaml").write_text(yaml.safe_dump(job))
    assert load_job(tmp_path / "j.yaml").train.lr == pytest.approx(3e-3)


def test_lr_schedule_warmup_then_cosine_to_floor():
    t = TrainSpec(steps=110, global_batch=8, micro_batch_size=2, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(1, t) == pytest.approx(0.1)
    assert lr_at(10, t) == pytest.approx(1.0)
    assert lr_at(60, t) == pytest.approx(0.55)
    assert lr_at(110, t) == pytest.approx(0.1)
    assert all(lr_at(s, t) >= lr_at(s + 1, t) for s in range(10, 110))


def test_plan_without_a_curriculum_is_the_job_shape_and_the_step_lr(job_files):
    tmp_path, job = job_files
    (tmp_path / "j.yaml").write_text(yaml.safe_dump(job))
    spec = load_job(tmp_path / "j.yaml")
    plan = plan_step(spec, 3)
    assert (plan.step, plan.seq_len, plan.global_batch, plan.micro_batch_size) == (3, 64, 8, 2)
    assert (plan.stage, plan.attention_mode, plan.mtp_loss_weight) == (0, "dense", 0.3)
    assert plan.global_batch_tokens == 8 * 64
    # no warmup: the cosine from 1e-3 to 1e-4 over 4 steps, at 3/4 of the way
    assert plan.lr == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 3 / 4)))
    assert plan_at(spec, 3, consumed_tokens=0) == plan  # without a curriculum only the step counts


def test_distributed_optimizer_without_data_parallelism_is_a_warning(job_files):
    tmp_path, job = job_files
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    sharded = load_job(path, ["train.distributed_optimizer=true"])
    assert job_warnings(sharded) == [] and job_warnings(load_job(path, [])) == []
    (warning,) = job_warnings(load_job(path, ["train.distributed_optimizer=true", "parallel.dp=1", "parallel.pp=4"]))
    assert warning.startswith("train.distributed_optimizer: true with parallel.dp 1")


def test_idle_devices_are_a_warning_naming_the_ranks_per_node(job_files):
    """Fewer ranks than the cluster's devices is allowed (whole tensor-parallel groups per node), but said."""
    from v4train.orchestrator.spec import ClusterSpec

    tmp_path, job = job_files
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    spread = load_job(path, ["parallel.tp=2", "parallel.pp=2", "parallel.dp=2", "parallel.ep=1"])
    three = ClusterSpec(name="three", nodes=3, devices_per_node=4)
    (warning,) = job_warnings(spread, three)
    assert warning == ("parallel: tp x cp x pp x dp = 8 ranks leave 4 of cluster three's 12 devices idle "
                       "(ranks per node: 4 + 2 + 2)")
    assert job_warnings(spread, ClusterSpec(name="two", nodes=2, devices_per_node=4)) == []
