"""Preflight through `v4train submit` / `v4train resume` (in process: every case here stops before any rank or
Ray starts): exit 2, one line naming the file or field, nothing written under the checkpoint root."""

from __future__ import annotations

import os
import re
import shutil
import signal
import time

import pytest
import yaml

from support.datasets import with_broken_parquet, with_token
from support.jobs import tiny_job
from v4train.orchestrator.tools import cli

pytestmark = pytest.mark.timeout(120)


def _submit(tmp_path, job: dict, *extra: str) -> list[str]:
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump({"name": "sim1", "devices_per_node": 1}))
    return ["submit", str(tmp_path / "job.yaml"), "--cluster", str(tmp_path / "cluster.yaml"),
            "--run-dir", str(tmp_path / "run"), *extra]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_a_model_vocabulary_smaller_than_the_tokenizers_is_refused_before_any_rank(tiny_dataset, tmp_path, capsys):
    """Seen on main: training started, died with `IndexError: index out of range in self`, restarted three times."""
    argv = _submit(tmp_path, tiny_job(tiny_dataset), "--set", "model.vocab_size=256")
    assert cli.main(argv) == 2
    line = _one_error_line(capsys)
    assert line == (f"v4train: error: data.path: model.vocab_size: 256 is smaller than the tokenizer's vocabulary of "
                    f"512 ({tiny_dataset}/tokenizer.json); token ids up to 511 would fall outside the embedding")
    assert not (tmp_path / "run").exists()


def test_the_rank_itself_refuses_a_vocabulary_too_small(tiny_dataset):
    """The same check on the rank (a launcher without preflight): a DataError, which the taxonomy stops at once."""
    from v4train.data.errors import DataError
    from v4train.orchestrator.control.preflight import check_vocabulary

    with pytest.raises(DataError, match="model.vocab_size: 256 is smaller than the tokenizer's vocabulary of 512"):
        check_vocabulary(512, 256, f"{tiny_dataset}/dataset.json")
    check_vocabulary(512, 512, "x")


@pytest.fixture
def corrupt_dataset(tiny_dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    shard = data / "train-00000.parquet"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard.write_bytes(bytes(raw))
    return data, shard


def test_a_corrupt_shard_exits_2_before_any_rank_starts(corrupt_dataset, tmp_path, capsys):
    """Seen on main: the shard was named only inside each rank's setup, restarted three times (~40 s), exit 1."""
    data, shard = corrupt_dataset
    assert cli.main(_submit(tmp_path, tiny_job(data))) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"v4train: error: data.path: {shard}: sha256 ") and "the shard is corrupt" in line
    assert not (tmp_path / "run").exists()


def test_a_token_outside_the_vocabulary_behind_a_matching_manifest_is_named(tiny_dataset, tmp_path, capsys):
    shard = with_token(tiny_dataset, tmp_path / "data", 512)
    assert cli.main(_submit(tmp_path, tiny_job(tmp_path / "data"))) == 2
    assert re.fullmatch(rf"v4train: error: data\.path: {re.escape(str(shard))}: token id 512 >= vocab_size 512 "
                        r"\(row \d+, token \d+; the shard's first such token\)", _one_error_line(capsys))


def test_a_broken_parquet_file_behind_a_matching_manifest_exits_2_with_one_line(tiny_dataset, tmp_path, capsys):
    """A shard whose hash matches dataset.json but which is no readable Parquet file (its footer cut off)."""
    shard = with_broken_parquet(tiny_dataset, tmp_path / "data")
    assert cli.main(_submit(tmp_path, tiny_job(tmp_path / "data"))) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"v4train: error: data.path: {shard}: not a readable Parquet file (") and "footer" in line
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_root_that_cannot_be_a_directory_exits_2_and_writes_nothing(tiny_dataset, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    job = tiny_job(tiny_dataset, checkpoint={"root": str(blocker / "ckpt")})
    assert cli.main(_submit(tmp_path, job)) == 2
    assert _one_error_line(capsys) == f"v4train: error: checkpoint.root: {blocker} is not a writable directory"
    assert blocker.read_text() == "not a directory" and not (tmp_path / "run").exists()


def test_the_probe_leaves_nothing_behind(tiny_dataset, tmp_path):
    from v4train.orchestrator.control.preflight import preflight
    from v4train.orchestrator.spec import JobSpec

    root = tmp_path / "ckpt"
    root.mkdir()
    timings = preflight(JobSpec.model_validate(tiny_job(tiny_dataset)), str(root))
    assert set(timings) == {"dataset_s", "checkpoint_root_s"} and list(root.iterdir()) == []


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_during_preflight_exits_130_with_one_line_although_ignored(tiny_dataset, tmp_path, capsys,
                                                                                     monkeypatch, signum):
    """Started with SIGINT ignored (a background command of a shell without job control), Ctrl-C during the
    preflight was ignored and the run went on to exit 0; SIGTERM there killed it without a word."""
    from v4train.orchestrator.control import preflight as preflight_module

    def interrupted_preflight(*args, **kwargs):
        os.kill(os.getpid(), signum)
        time.sleep(10)  # the signal lands here
        raise AssertionError("the signal was ignored")

    monkeypatch.setattr(preflight_module, "preflight", interrupted_preflight)
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        assert cli.main(_submit(tmp_path, tiny_job(tiny_dataset))) == 130
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    assert _one_error_line(capsys) == "v4train: interrupted"
    assert not (tmp_path / "run").exists()


def test_a_mistyped_local_root_is_refused_and_not_created(tiny_dataset, tmp_path, capsys):
    """`ckpt list` of a missing directory created it and printed an empty table (exit 0); `resume --from` created it."""
    missing = tmp_path / "no" / "such" / "root"
    for argv in (["ckpt", "list", str(missing)], ["ckpt", "verify", str(missing)]):
        assert cli.main(argv) == 2
        assert _one_error_line(capsys) == f"v4train: error: {missing}: no such checkpoint directory"
    _submit(tmp_path, tiny_job(tiny_dataset))  # writes job.yaml and cluster.yaml
    argv = ["resume", "--from", str(missing), str(tmp_path / "job.yaml"), "--cluster", str(tmp_path / "cluster.yaml"),
            "--run-dir", str(tmp_path / "run")]
    assert cli.main(argv) == 2
    assert _one_error_line(capsys) == f"v4train: error: {missing}: no such checkpoint directory"
    assert not (tmp_path / "no").exists() and not (tmp_path / "run").exists()
