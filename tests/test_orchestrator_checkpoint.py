"""The commit protocol: COMMIT last, `latest` only after it, readers trust nothing else."""

import json

import pytest

from orchestrator import checkpoint
from orchestrator.checkpoint import CheckpointError


def _save(root, step, payload=b"shard"):
    attempt = checkpoint.begin_attempt(root, step)
    (attempt / "__0_0.distcp").write_bytes(payload)
    (attempt / ".metadata").write_bytes(b"meta")
    return attempt


def test_commit_layout_and_latest(tmp_path):
    final = checkpoint.commit(_save(tmp_path, 50), 50, {"step": 50})
    assert final.name == "step_00000050"
    assert sorted(p.name for p in final.iterdir()) == [
        ".metadata", "COMMIT", "__0_0.distcp", "manifest.json", "train_state.json"
    ]
    manifest = json.loads((final / "manifest.json").read_text())
    assert set(manifest["files"]) == {".metadata", "__0_0.distcp", "train_state.json"}
    assert (tmp_path / "latest").read_text().strip() == "step_00000050"
    assert checkpoint.verify(final)["step"] == 50


def test_uncommitted_attempt_is_never_picked(tmp_path):
    checkpoint.commit(_save(tmp_path, 50), 50, {"step": 50})
    _save(tmp_path, 100)  # a save that died before its COMMIT
    assert checkpoint.latest_committed(tmp_path).name == "step_00000050"
    (tmp_path / "latest").unlink()  # even without the pointer, a scan finds only committed steps
    assert checkpoint.latest_committed(tmp_path).name == "step_00000050"


def test_corrupt_or_missing_shard_is_named(tmp_path):
    final = checkpoint.commit(_save(tmp_path, 10), 10, {"step": 10})
    (final / "__0_0.distcp").write_bytes(b"shard-but-changed")
    with pytest.raises(CheckpointError, match="__0_0.distcp: size or sha256"):
        checkpoint.verify(final)
    (final / "__0_0.distcp").unlink()
    with pytest.raises(CheckpointError, match="__0_0.distcp: listed in the manifest but missing"):
        checkpoint.verify(final)


def test_tampered_manifest_and_missing_commit_are_refused(tmp_path):
    final = checkpoint.commit(_save(tmp_path, 10), 10, {"step": 10})
    manifest = json.loads((final / "manifest.json").read_text())
    manifest["files"].pop("__0_0.distcp")
    (final / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="does not match the hash recorded in COMMIT"):
        checkpoint.verify(final)
    (final / "COMMIT").unlink()
    with pytest.raises(CheckpointError, match="no COMMIT"):
        checkpoint.verify(final)


def test_retention_after_successor_commits(tmp_path):
    for step in (10, 20, 30):
        checkpoint.commit(_save(tmp_path, step), step, {"step": step})
    abandoned = _save(tmp_path, 40)
    deleted = checkpoint.apply_retention(tmp_path, keep=2)
    assert sorted(p.name for p in deleted) == sorted(["step_00000010", abandoned.name])
    assert [p.name for p in sorted(tmp_path.glob("step_*"))] == ["step_00000020", "step_00000030"]


def test_commit_refuses_to_overwrite(tmp_path):
    checkpoint.commit(_save(tmp_path, 10), 10, {"step": 10})
    with pytest.raises(CheckpointError, match="already exists"):
        checkpoint.commit(_save(tmp_path, 10), 10, {"step": 10})
