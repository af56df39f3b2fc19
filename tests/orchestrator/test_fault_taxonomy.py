"""The fault taxonomy: which failures a restart may fix (transient) and which stop the run at once with one
line (deterministic), and the supervisor acting on it against the in-process fake rank group."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from support.fake_supervisor import fake_job, run_supervisor
from v4train.data.errors import DataError
from v4train.orchestrator.checkpoint import CheckpointError
from v4train.orchestrator.checkpoint.storage import Storage
from v4train.orchestrator.control.fake_group import FakeRankGroup, Script
from v4train.orchestrator.control.rank_group import RankFailure
from v4train.orchestrator.control.supervisor import Phase
from v4train.orchestrator.recovery.fault_taxonomy import FaultClass, FaultHistory, classify, root_line
from v4train.orchestrator.spec import JobSpec

pytestmark = pytest.mark.timeout(60)

T, D = FaultClass.TRANSIENT, FaultClass.DETERMINISTIC


@pytest.mark.parametrize("failure, expected", [
    (RankFailure(2, "died", "The actor died unexpectedly before finishing this task.", "train_step"), T),
    (RankFailure(1, "stall", "no progress for 8 s (step 3, phase schedule)", "train_step"), T),
    (RankFailure(0, "exception", "RuntimeError: Connection closed by peer [127.0.0.1]:4242", "train_step"), T),
    (RankFailure(0, "exception", "RuntimeError: injected fault raise@3 on rank 0", "train_step"), T),
    (RankFailure(3, "exception", "OSError: An error occurred (SlowDown) when calling the PutObject operation "
                                 "(reached max retries: 4): Please reduce your request rate.", "save"), T),
    (RankFailure(0, "exception", "DataError: /d/train-00000.parquet: token id 512 >= vocab_size 512", "setup"), D),
    (RankFailure(1, "exception", "PermissionError: The AWS Access Key Id you provided does not exist", "save"), D),
    (RankFailure(0, "exception", "ValueError: dim must be divisible by n_heads", "setup"), D),
    (RankFailure(0, "exception", "ValueError: a value error in a step", "train_step"), T),
    (CheckpointError("/ckpt/step_00000002/manifest.json: does not match the hash recorded in COMMIT"), D),
    (PermissionError("Forbidden"), D),
    (DataError("model.vocab_size: 256 is smaller than the tokenizer's vocabulary of 512"), D),
])
def test_each_failure_has_its_class(failure, expected):
    verdict = classify(failure)
    assert verdict.fault_class is expected, verdict
    assert "\n" not in verdict.cause


def test_a_gathered_dcp_error_is_classified_by_its_root_line(tmp_path):
    """torch DCP gathers every rank's traceback into one CheckpointException: the root line is the
    FileNotFoundError naming the missing shard, and a restart cannot bring that file back."""
    state = {"model.w": torch.arange(6.0)}
    dcp.save(state, storage_writer=Storage(str(tmp_path)).dcp_writer("ckpt"), no_dist=True)
    shard = next(p for p in (tmp_path / "ckpt").iterdir() if p.suffix == ".distcp")
    shard.unlink()
    with pytest.raises(BaseException) as info:  # DCP's CheckpointException is a BaseException
        dcp.load({"model.w": torch.zeros(6)}, storage_reader=Storage(str(tmp_path)).dcp_reader("ckpt"), no_dist=True)
    text = f"{type(info.value).__name__}: {info.value}"
    assert len(text.splitlines()) > 3  # the traceback a user used to get
    verdict = classify(RankFailure(0, "exception", text, "load"))
    assert verdict.deterministic and verdict.cause == f"rank 0 (load): {root_line(text)}"
    assert verdict.cause.startswith("rank 0 (load): FileNotFoundError") and shard.name in verdict.cause


def test_a_fault_repeating_at_the_same_step_with_the_same_cause_is_deterministic():
    history = FaultHistory()
    first = RankFailure(2, "exception", "RuntimeError: odd failure in 0x7f3a2c", "train_step")
    again = RankFailure(1, "exception", "RuntimeError: odd failure in 0x7f99aa", "train_step")
    assert not history.classify(first, 4).deterministic
    assert not history.classify(again, 5).deterministic  # another step: may be a new fault
    verdict = history.classify(again, 4)
    assert verdict.deterministic and "repeated at step 4" in verdict.reason


# ---------------------------------------------------------------- the supervisor acting on the class
def _job(tmp_path, **sections) -> JobSpec:
    return fake_job(tmp_path, 3, **sections)


class _Repeating(FakeRankGroup):
    """Raises ``failure`` every time step ``at`` is asked for (a fault no restart changes)."""

    def __init__(self, world_size: int, failure: RankFailure, at: int) -> None:
        super().__init__(world_size, Script())
        self.failure, self.at = failure, at

    def train_step(self, plan):
        if plan.step == self.at:
            self.calls.append("train_step")
            raise self.failure
        return super().train_step(plan)


def _run(job, run_dir, group, resume_from=None):
    phase, sup, events, _ = run_supervisor(job, run_dir, group, resume_from)
    return phase, sup, events


def test_a_deterministic_rank_fault_stops_at_once_with_one_line(tmp_path):
    message = "DataError: /data/train-00000.parquet: token id 512 >= vocab_size 512"
    phase, sup, events = _run(_job(tmp_path), tmp_path, _Repeating(2, RankFailure(1, "exception", message,
                                                                                    "train_step"), at=3))
    assert phase is Phase.FAILED and sup.restarts == 0
    assert [e["event"] for e in events].count("restart") == 0
    failure = next(e for e in events if e["event"] == "failure")
    assert (failure["fault_class"], failure["rank"], failure["step"]) == ("deterministic", 1, 2)
    line = str(sup.failure)
    assert "\n" not in line and line.startswith("deterministic fault in step 3: rank 1 (train_step): DataError")
    assert "train-00000.parquet" in line


def test_a_transient_fault_that_repeats_after_a_restart_stops_the_second_time(tmp_path):
    failure = RankFailure(0, "exception", "RuntimeError: CUDA-like launch failure", "train_step")
    phase, sup, events = _run(_job(tmp_path), tmp_path, _Repeating(2, failure, at=3))
    assert phase is Phase.FAILED and sup.restarts == 1  # not the budget of 3
    classes = [e["fault_class"] for e in events if e["event"] == "failure"]
    assert classes == ["transient", "deterministic"]
    assert "repeated at step 2 after a restart" in str(sup.failure)


def test_a_checkpoint_error_at_restore_is_deterministic(tmp_path):
    job = _job(tmp_path, train={"steps": 2})
    assert _run(job, tmp_path, FakeRankGroup(2, Script()))[0] is Phase.FINISHED
    (tmp_path / "step_00000002" / "train_state.json").write_text("{}")
    phase, sup, events = _run(job, tmp_path, FakeRankGroup(2, Script()), resume_from="step_00000002")
    assert phase is Phase.FAILED and sup.restarts == 0
    assert "train_state.json: size or sha256 differs from the manifest" in str(sup.failure)
    assert str(sup.failure).startswith("deterministic fault while starting from step_00000002: ")


def test_resume_to_an_earlier_step_sets_newer_commits_aside(tmp_path):
    """`v4train resume RUN --step 2` on a run with commits at 2, 4, 6: the commits of 4 and 6 are set aside
    (and said so in the start event), and the resumed run commits its own 4 and 6."""
    job = _job(tmp_path)
    assert _run(job, tmp_path, FakeRankGroup(2, Script()))[0] is Phase.FINISHED
    phase, sup, events = _run(job, tmp_path, FakeRankGroup(2, Script()), resume_from="step_00000002")
    assert phase is Phase.FINISHED, sup.failure
    start = [e for e in events if e["event"] == "start"][-1]
    assert sorted(name.split(".")[0] for name in start["superseded"]) == ["step_00000004", "step_00000006"]
    names = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("step_"))
    assert [n for n in names if ".superseded-" not in n] == ["step_00000002", "step_00000004", "step_00000006"]
    assert not [n for n in names if ".attempt-" in n]
    assert (tmp_path / "latest").read_text().strip() == "step_00000006"


def _without_a_shard(tmp_path) -> tuple[JobSpec, Path]:
    """A finished 2-step run under ``tmp_path`` whose committed step 2 lost a shard file, with its manifest and
    ``COMMIT`` rewritten to match (a consistent manifest); returns the job and the missing shard's path."""
    job = _job(tmp_path, train={"steps": 2})
    assert _run(job, tmp_path, FakeRankGroup(2, Script()))[0] is Phase.FINISHED
    step = tmp_path / "step_00000002"
    shard = next(p for p in step.iterdir() if p.suffix == ".distcp")
    shard.unlink()
    manifest = json.loads((step / "manifest.json").read_text())
    del manifest["files"][shard.name]
    text = json.dumps(manifest, indent=1, sort_keys=True)
    (step / "manifest.json").write_text(text)
    (step / "COMMIT").write_text(json.dumps({"step": 2, "manifest_sha256": hashlib.sha256(text.encode()).hexdigest()}))
    return job, shard


def test_preflight_refuses_a_committed_checkpoint_missing_a_shard_behind_a_consistent_manifest(tmp_path):
    from v4train.orchestrator.control.preflight import check_resume_target
    from v4train.orchestrator.spec import SpecError

    job, shard = _without_a_shard(tmp_path)
    with pytest.raises(SpecError) as info:
        check_resume_target(job, str(tmp_path), "step_00000002")
    assert str(info.value) == (f"{shard}: a shard the checkpoint's DCP metadata references is missing or truncated")


def test_ckpt_verify_refuses_a_committed_checkpoint_missing_a_shard_behind_a_consistent_manifest(tmp_path, capsys):
    """Every file the manifest lists matches it, yet the checkpoint cannot load: verify must say FAILED."""
    from v4train.orchestrator.tools import cli

    _, shard = _without_a_shard(tmp_path)
    capsys.readouterr()
    assert cli.main(["ckpt", "verify", str(tmp_path), "--step", "2"]) == 1
    captured = capsys.readouterr()
    message = f"{shard}: a shard the checkpoint's DCP metadata references is missing or truncated"
    assert captured.out.strip() == f"{tmp_path}/step_00000002: FAILED ({message})"
    assert captured.err.strip() == f"v4train: error: {message}"


def test_ckpt_verify_without_a_step_verifies_every_committed_step_and_names_a_corrupt_older_one(tmp_path, capsys):
    """Seen on main: only the newest committed step was re-hashed; a corrupted older one passed unnoticed."""
    from v4train.orchestrator.tools import cli

    job = _job(tmp_path, train={"steps": 4}, checkpoint={"at_end": False})
    assert _run(job, tmp_path, FakeRankGroup(2, Script()))[0] is Phase.FINISHED
    capsys.readouterr()
    assert cli.main(["ckpt", "verify", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"{tmp_path}/step_00000002: OK (step 2, every file matches its manifest, every shard is present)",
                   f"{tmp_path}/step_00000004: OK (step 4, every file matches its manifest, every shard is present)",
                   f"{tmp_path}: all 2 committed checkpoints verified"]
    shard = next(p for p in (tmp_path / "step_00000002").iterdir() if p.suffix == ".distcp")
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))
    assert cli.main(["ckpt", "verify", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert f"{tmp_path}/step_00000002: FAILED ({tmp_path}/step_00000002/{shard.name}: size or sha256 differs" \
        in captured.out
    assert f"{tmp_path}/step_00000004: OK" in captured.out
    assert captured.err.strip() == ("v4train: error: 1 of 2 committed checkpoint(s) failed verification: "
                                    "step_00000002")


@pytest.mark.parametrize("error", ["OutOfMemoryError", "WorkerCrashedError", "NodeDiedError"])
def test_a_rank_process_gone_in_any_of_rays_ways_is_a_rank_death(monkeypatch, error):
    """Ray's memory monitor kills a rank with OutOfMemoryError, which is no RayActorError: it must still be a
    rank death (recovered, and deterministic if it repeats), never an error escaping the supervisor."""
    import ray

    from v4train.orchestrator.control import ray_group

    def gone(ref):
        raise getattr(ray.exceptions, error)("Task was killed due to the node running low on memory.\nMore.")

    monkeypatch.setattr(ray_group.ray, "get", gone)
    group = object.__new__(ray_group.RayRankGroup)
    failure = group._failure_of("ref", 2, "train_step")
    assert (failure.rank, failure.kind, failure.method) == (2, "died", "train_step")
    assert classify(failure).fault_class is T and "\n" not in failure.message


class _BrokenFakeGroup(FakeRankGroup):
    def train_step(self, plan):
        if plan.step == 3:
            raise KeyError("a supervisor-side bug")
        return super().train_step(plan)


def test_an_error_that_is_no_rank_failure_is_recorded_before_it_is_raised(tmp_path):
    """An error of the supervisor's own (not a rank's) ends the run with its traceback, but events.jsonl still
    says what stopped it."""
    with pytest.raises(KeyError, match="a supervisor-side bug"):
        run_supervisor(fake_job(tmp_path, max_restarts=2), tmp_path / "run", _BrokenFakeGroup(2, Script()))
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    failure = events[-1]
    assert failure["event"] == "failure" and failure["fault_class"] == "supervisor" and failure["step"] == 2
    assert "a supervisor-side bug" in failure["cause"]
