"""torchrun's restarts (`torchrun --max-restarts N`): a restarted process continues the run from its newest commit
and never deletes it, meets only the injected faults not reached yet, and does not train again after a
deterministic fault."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from support.cli import torchrun
from support.jobs import run_job, tiny_job
from support.paths import REPO_ROOT
from v4train.orchestrator.control.elastic_restart import (PreviousAttempts, previous_attempts, refusal,
                                                          restart_count, unfired_faults)


def _write_jsonl(path: Path, records: list[dict], torn_tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + torn_tail)


def test_previous_attempts_reads_the_last_step_and_the_failures_and_skips_a_torn_line(tmp_path):
    # steps 1-4, then a resume to step 2 and step 3 again: the run stands at step 3
    _write_jsonl(tmp_path / "metrics.jsonl", [{"step": s} for s in (1, 2, 3, 4, 3)], torn_tail='{"step": 4, "lo')
    failure = {"event": "failure", "step": 3, "cause": "rank 1 (step): died: connection closed", "restarts": 0}
    _write_jsonl(tmp_path / "events.jsonl", [{"event": "start", "step": 0}, failure], torn_tail='{"event": "fin')
    assert previous_attempts(tmp_path) == PreviousAttempts(last_step=3, failures=[failure])
    assert previous_attempts(tmp_path / "missing") == PreviousAttempts()


def test_a_restart_is_refused_after_a_deterministic_fault_or_a_repeat_at_the_same_step():
    died = {"event": "failure", "step": 3, "cause": "rank 1 (step): died: pid=4242 gone after 1.5 s"}
    assert refusal(PreviousAttempts(3, [died])) is None  # one transient failure: train again
    same_again = dict(died, cause="rank 0 (step): died: pid=77 gone after 0.2 s")  # other rank, pid, duration
    assert "the same fault repeated after a restart at step 3" in refusal(PreviousAttempts(3, [died, same_again]))
    assert refusal(PreviousAttempts(5, [died, dict(same_again, step=5)])) is None  # a later step: progress
    bad = {"event": "failure", "step": 2, "cause": "DataError: shard-00001.bin: token 9000 >= vocab_size 512",
           "fault_class": "deterministic"}
    assert refusal(PreviousAttempts(2, [died, bad])) == \
        "the previous attempt stopped on a deterministic fault at step 2: " \
        "DataError: shard-00001.bin: token 9000 >= vocab_size 512"


def test_only_the_faults_a_failed_attempt_had_not_reached_are_kept():
    faults = ["kill@3:rank=1", "raise@4", "kill_during_save@3", "kill_during_save@2", "stall@6:rank=1"]
    # the attempt recorded steps 1-2 and died in step 3 (or in the save after step 2)
    assert unfired_faults(faults, last_step=2) == ["raise@4", "kill_during_save@3", "stall@6:rank=1"]
    assert unfired_faults(faults, last_step=0) == faults  # died in step 1: none of these reached
    assert unfired_faults(["raise@1", "kill_during_save@1"], last_step=0) == ["kill_during_save@1"]
    assert restart_count({}) == 0 and restart_count({"TORCHELASTIC_RESTART_COUNT": "2"}) == 2


def test_a_restart_after_a_deterministic_fault_exits_1_with_one_line_and_writes_nothing(tiny_dataset, tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(tiny_job(tiny_dataset)))
    run = tmp_path / "run"
    run.mkdir()
    events = [{"event": "start", "step": 0},
              {"event": "failure", "step": 1, "cause": "rank 0 (setup): ValueError: model.n_routed_experts: 7",
               "fault_class": "deterministic"}]
    _write_jsonl(run / "events.jsonl", events)
    before = sorted((p.name, p.stat().st_size) for p in run.iterdir())
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="1",
               TORCHELASTIC_RESTART_COUNT="1")
    proc = subprocess.run([sys.executable, "-m", "v4train.orchestrator.launch", str(job), "--run-dir", str(run),
                           "--overwrite"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "v4train launch: rank 0: not restarted (torchrun restart 1): the previous attempt stopped on a "
        "deterministic fault at step 1: rank 0 (setup): ValueError: model.n_routed_experts: 7"]
    assert sorted((p.name, p.stat().st_size) for p in run.iterdir()) == before  # --overwrite ignored


def test_torchruns_static_rendezvous_keeps_one_store_for_every_attempt():
    """Why a restarted attempt needs keys of its own (``attempt_store``): torchrun's agent hands every attempt the
    same store, so what one attempt's groups wrote is there for the next. If torch ever gives each attempt a fresh
    store, this fails and the prefix can go."""
    from torch.distributed.elastic.rendezvous.static_tcp_rendezvous import StaticTCPRendezvous

    from v4train.orchestrator.control.rendezvous import free_port

    handler = StaticTCPRendezvous("127.0.0.1", free_port(), rank=0, world_size=1, run_id="run", timeout=30)
    handler.next_rendezvous().store.set("default_pg/0//rank_0_address", b"attempt 0")
    assert handler.next_rendezvous().store.get("default_pg/0//rank_0_address") == b"attempt 0"


def _losses(run: Path) -> dict[int, float]:
    """Each step's loss on the run's trajectory (a step recorded again after a restart replaces its first record)."""
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
@pytest.mark.ci
@pytest.mark.timeout(900)
def test_torchrun_restart_after_a_killed_rank_continues_from_the_last_commit_bitwise(rank_pool, tiny_dataset,
                                                                                      tmp_path):
    job = tiny_job(tiny_dataset, parallel={"pp": 2, "dp": 1}, train={"steps": 4},
                   checkpoint={"every_steps": 2, "at_end": True, "async_save": False})  # step 2 commits before 3
    reference, _, _ = run_job(rank_pool, job, tmp_path / "ray")
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump({**job, "faults": ["kill@3:rank=1"]}))
    run = tmp_path / "torchrun"
    # --overwrite is for the first attempt only: the restart must keep the step-2 commit it resumes from
    proc = torchrun(2, str(job_file), "--run-dir", str(run), "--overwrite",
                    torchrun_args=("--max-restarts", "1", "--monitor-interval", "0.1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _losses(run) == {m["step"]: m["loss"] for m in reference}  # bit-identical to the unfailed run
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    restart = next(e for e in events if e["event"] == "restart")
    assert (restart["step"], restart["restart"], restart["launcher"], restart["from_checkpoint"]) == \
        (2, 1, "torchrun", "step_00000002")
    starts = [e for e in events if e["event"] == "start"]
    assert [s["step"] for s in starts] == [0, 2] and starts[1]["resumed_from"].endswith("step_00000002")
    finish = events[-1]
    assert finish["event"] == "finish" and finish["step"] == 4 and finish["restarts"] == 1
