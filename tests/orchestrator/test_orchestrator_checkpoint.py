"""The commit protocol on local disk and on S3 (a moto server on 127.0.0.1): COMMIT last, `latest` only
after it, readers trust nothing else; refusal of checkpoints that lack state."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
import torch.distributed.checkpoint as dcp

from v4train.orchestrator import checkpoint
from v4train.orchestrator.checkpoint import CheckpointError
from v4train.orchestrator.checkpoint.dcp_storage import hashes_file
from v4train.orchestrator.checkpoint.storage import Storage


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path, s3_server):
    if request.param == "local":
        return Storage(str(tmp_path / "ckpt"))
    return Storage(f"s3://{s3_server['bucket']}/{tmp_path.name}", endpoint_url=s3_server["endpoint_url"])


def _save(storage, step, value=1.0):
    attempt = checkpoint.begin_attempt(storage, step)
    dcp.save({"w": torch.full((64,), value), "step": torch.tensor(step)}, storage_writer=storage.dcp_writer(attempt))
    return attempt


def _corrupt_one_byte(storage, rel):
    path = storage._path(rel)
    data = bytearray(storage.fs.cat_file(path))
    data[len(data) // 2] ^= 0xFF
    storage.fs.pipe_file(path, bytes(data))


def test_commit_layout_latest_and_verify(storage):
    final = checkpoint.commit(storage, _save(storage, 50), 50, {"step": 50})
    assert final == "step_00000050"
    files = storage.files(final)
    assert {"COMMIT", "manifest.json", "train_state.json", ".metadata"} <= set(files)
    manifest = json.loads(storage.read_text(f"{final}/manifest.json"))
    assert set(manifest["files"]) == set(files) - {"COMMIT", "manifest.json"}
    assert storage.read_text("latest").strip() == final
    assert checkpoint.verify(storage, final)["step"] == 50
    assert [c["name"] for c in checkpoint.list_checkpoints(storage)] == [final]
    assert not any(".attempt-" in n for n in storage.listdir())


def test_uncommitted_attempt_is_never_picked_and_cleaned_after_successor(storage):
    checkpoint.commit(storage, _save(storage, 50), 50, {"step": 50})
    aborted = _save(storage, 100, value=7.0)  # a save that died before its COMMIT
    assert checkpoint.latest_committed(storage) == "step_00000050"
    listed = {c["name"]: c["committed"] for c in checkpoint.list_checkpoints(storage)}
    assert listed == {"step_00000050": True, aborted: False}
    # A later save of the same step is its own attempt: never merged with the aborted one.
    final = checkpoint.commit(storage, _save(storage, 100, value=2.0), 100, {"step": 100})
    assert checkpoint.latest_committed(storage) == final
    deleted = checkpoint.apply_retention(storage, keep=0)
    assert deleted == [aborted]
    out = {"w": torch.zeros(64), "step": torch.tensor(0)}
    dcp.load(out, storage_reader=storage.dcp_reader(final))
    assert torch.equal(out["w"], torch.full((64,), 2.0))


def test_latest_falls_back_to_scan(storage):
    checkpoint.commit(storage, _save(storage, 10), 10, {"step": 10})
    storage.write_text("latest", "step_00000099\n")  # names something uncommitted
    assert checkpoint.latest_committed(storage) == "step_00000010"


def test_corrupt_or_missing_shard_is_named(storage):
    final = checkpoint.commit(storage, _save(storage, 10), 10, {"step": 10})
    shard = next(f for f in storage.files(final) if f.endswith(".distcp"))
    _corrupt_one_byte(storage, f"{final}/{shard}")
    with pytest.raises(CheckpointError, match=f"{shard}: size or sha256"):
        checkpoint.verify(storage, final)
    storage.fs.rm(storage._path(f"{final}/{shard}"))
    with pytest.raises(CheckpointError, match=f"{shard}: listed in the manifest but missing"):
        checkpoint.verify(storage, final)


def test_commit_takes_shard_hashes_from_the_writers(storage, monkeypatch):
    """The ranks hash what they write while writing it; the commit reads no shard back, and the hashes it
    records are the files' real sha256 (verification reads everything)."""
    attempt = _save(storage, 10)
    recorded = json.loads(storage.read_text(f"{attempt}/{hashes_file(0)}"))
    shards = {f for f in storage.files(attempt) if f.endswith(".distcp")} | {".metadata"}
    assert set(recorded) == shards
    for rel in shards:
        data = storage.fs.cat_file(storage._path(f"{attempt}/{rel}"))
        assert {k: recorded[rel][k] for k in ("bytes", "sha256")} == \
            {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    shard = next(iter(shards - {".metadata"}))
    assert recorded[".metadata"]["references"] == {shard: recorded[shard]["bytes"]}

    def no_read_back(self, rel):
        raise AssertionError(f"commit read {rel} back")

    monkeypatch.setattr(Storage, "sha256", no_read_back)
    monkeypatch.setattr(Storage, "dcp_reader", no_read_back)  # the shards' lengths come with .metadata's hash
    final = checkpoint.commit(storage, attempt, 10, {"step": 10})
    monkeypatch.undo()
    manifest = json.loads(storage.read_text(f"{final}/manifest.json"))
    assert {rel: manifest["files"][rel] for rel in shards} == \
        {rel: {"bytes": r["bytes"], "sha256": r["sha256"]} for rel, r in recorded.items()}
    assert checkpoint.verify(storage, final)["step"] == 10


def test_commit_refuses_a_shard_whose_size_differs_from_what_was_written(storage):
    attempt = _save(storage, 10)
    shard = next(f for f in storage.files(attempt) if f.endswith(".distcp"))
    path = storage._path(f"{attempt}/{shard}")
    storage.fs.pipe_file(path, storage.fs.cat_file(path) + b"x")
    with pytest.raises(CheckpointError, match=f"{shard}: .* bytes on storage"):
        checkpoint.commit(storage, attempt, 10, {"step": 10})


def test_commit_refuses_a_missing_shard(storage):
    attempt = _save(storage, 10)
    shard = next(f for f in storage.files(attempt) if f.endswith(".distcp"))
    storage.fs.rm(storage._path(f"{attempt}/{shard}"))
    with pytest.raises(CheckpointError, match="shard missing or truncated"):
        checkpoint.commit(storage, attempt, 10, {"step": 10})
    assert checkpoint.latest_committed(storage) is None


def test_tampered_manifest_and_missing_commit_are_refused(storage):
    final = checkpoint.commit(storage, _save(storage, 10), 10, {"step": 10})
    manifest = json.loads(storage.read_text(f"{final}/manifest.json"))
    manifest["files"].pop(".metadata")
    storage.write_text(f"{final}/manifest.json", json.dumps(manifest))
    with pytest.raises(CheckpointError, match="does not match the hash recorded in COMMIT"):
        checkpoint.verify(storage, final)
    storage.fs.rm(storage._path(f"{final}/COMMIT"))
    with pytest.raises(CheckpointError, match="no COMMIT"):
        checkpoint.verify(storage, final)


@pytest.mark.parametrize("version, readable", [(1, True), (2, True), (3, False)])
def test_format_versions_read_and_refused(tmp_path, monkeypatch, version, readable):
    """Version 2 is written; a version 1 checkpoint (torch.save or raw records) is still read; any other
    version is refused by its number, not misread."""
    import importlib

    commit = importlib.import_module("v4train.orchestrator.checkpoint.commit")  # the module, not the function
    storage = Storage(str(tmp_path / "ckpt"))
    if version != 2:  # what a writer of another version leaves
        monkeypatch.setattr(commit, "FORMAT_VERSION", version)
    final = checkpoint.commit(storage, _save(storage, 10), 10, {"step": 10})
    assert json.loads(storage.read_text(f"{final}/manifest.json"))["format_version"] == version
    if readable:
        assert checkpoint.verify(storage, final)["step"] == 10
    else:
        with pytest.raises(CheckpointError, match="format version 3; this v4train reads versions 1, 2"):
            checkpoint.verify(storage, final)


def test_retention_keeps_newest(storage):
    for step in (10, 20, 30):
        checkpoint.commit(storage, _save(storage, step), step, {"step": step})
    assert checkpoint.apply_retention(storage, keep=2) == ["step_00000010"]
    assert [c["step"] for c in checkpoint.list_checkpoints(storage)] == [20, 30]


def test_commit_refuses_to_overwrite(storage):
    checkpoint.commit(storage, _save(storage, 10), 10, {"step": 10})
    with pytest.raises(CheckpointError, match="already exists"):
        checkpoint.commit(storage, _save(storage, 10), 10, {"step": 10})


def test_checkpoint_lacking_optimizer_state_is_refused(tmp_path):
    """C1: a checkpoint without the optimizer moments is refused, naming the tensor, never filled with zeros."""
    from v4train.model import ModelConfig, V4Stage
    from v4train.parallel.optim import build_optimizer

    from support.jobs import TINY_MODEL

    cfg = ModelConfig.preset("nano", **{k: v for k, v in TINY_MODEL.items() if k != "preset"}, vocab_size=64)
    stage = V4Stage(cfg, pp_rank=0, pp_size=1)
    stage.init_weights(0)
    optimizer = build_optimizer(list(stage.named_parameters()), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    storage = Storage(str(tmp_path))
    full = checkpoint.shard_state(stage, optimizer)
    assert {f"optim.{n}.exp_avg" for n, _ in stage.named_parameters()} <= set(full)  # state for every parameter
    model_only = {k: v for k, v in full.items() if k.startswith("model.")}
    dcp.save(model_only, storage_writer=storage.dcp_writer("model-only"))
    before = {k: v.clone() for k, v in stage.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"checkpoint lacks optim\..*exp_avg"):
        checkpoint.load_shards(storage, "model-only", stage, optimizer)
    assert all(torch.equal(before[k], v) for k, v in stage.state_dict().items())  # nothing half-loaded


def test_inspect_lists_tensors(storage):
    final = checkpoint.commit(storage, _save(storage, 10), 10, {"step": 10})
    info = checkpoint.inspect(storage, final)
    assert info["train_state"]["step"] == 10
    assert {"name": "w", "shape": [64], "dtype": "torch.float32"} in info["tensors"]


def test_ckpt_cli_list_verify_inspect(tmp_path, capsys):
    from v4train.orchestrator.tools import cli

    storage = Storage(str(tmp_path))
    layout = {"tp": 1, "cp": 1, "pp": 2, "ep": 1, "dp": 2, "vp": 1, "stage_layers": "auto"}
    checkpoint.commit(storage, _save(storage, 10), 10, {"step": 10, "layout": layout})
    final = checkpoint.commit(storage, _save(storage, 20), 20,
                              {"step": 20, "layout": {**layout, "vp": 2, "stage_layers": [3, 1]}})
    _save(storage, 30)  # an unfinished save
    assert cli.main(["ckpt", "list", str(tmp_path)]) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert [r.split()[:2] for r in rows] == [["10", "yes"], ["20", "yes"], ["30", "no"]]
    assert "tp1 cp1 pp2 ep1 dp2  " in rows[0] and "tp1 cp1 pp2 ep1 dp2 vp2 stages 3/1  " in rows[1]
    assert len({r.index(" step_") for r in rows}) == 1 and header.index("name") == rows[0].index("step_")
    assert cli.main(["ckpt", "verify", str(tmp_path)]) == 0
    assert "step_00000020: OK" in capsys.readouterr().out
    assert cli.main(["ckpt", "inspect", str(tmp_path), "--step", "10"]) == 0
    assert json.loads(capsys.readouterr().out)["train_state"]["step"] == 10
    shard = next(f for f in storage.files(final) if f.endswith(".distcp"))
    _corrupt_one_byte(storage, f"{final}/{shard}")
    assert cli.main(["ckpt", "verify", str(tmp_path), "--step", "20"]) == 1
    assert f"{shard}: size or sha256 differs" in capsys.readouterr().err
    assert cli.main(["ckpt", "verify", str(tmp_path), "--step", "10"]) == 0
    assert cli.main(["ckpt", "verify", str(tmp_path), "--step", "30"]) == 1
    assert "no COMMIT" in capsys.readouterr().err


def test_python_api_matches_the_cli(tmp_path):
    from v4train.orchestrator.tools import api

    storage = Storage(str(tmp_path))
    checkpoint.commit(storage, _save(storage, 10), 10, {"step": 10})
    checkpoint.commit(storage, _save(storage, 20), 20, {"step": 20})
    assert api.latest_committed(str(tmp_path)) == 20
    assert [c["step"] for c in api.list_checkpoints(str(tmp_path))] == [10, 20]
    assert api.verify(str(tmp_path))["step"] == 20
    assert api.inspect(str(tmp_path), 10)["train_state"]["step"] == 10
    with pytest.raises(CheckpointError, match="no COMMIT"):
        api.verify(str(tmp_path), 15)
