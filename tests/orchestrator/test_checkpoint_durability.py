"""A local commit makes every file of the checkpoint durable before one rename publishes it with its COMMIT, and
the root directory (that rename, and ``latest``'s) before it returns; retention's deletions run after the commit
has returned; a rank's shard has its writeback started while it is still being written."""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
import types

import torch
import torch.distributed.checkpoint as dcp

from v4train.orchestrator import checkpoint
from v4train.orchestrator.checkpoint import dcp_storage
from v4train.orchestrator.checkpoint.storage import Storage
from v4train.orchestrator.control.checkpointing import CheckpointCoordinator, _PendingSave
from v4train.orchestrator.rank.saved_copies import host_copy


def _save(storage: Storage, step: int, numel: int = 64) -> str:
    attempt = checkpoint.begin_attempt(storage, step)
    dcp.save({"w": torch.full((numel,), float(step)), "step": torch.tensor(step)},
             storage_writer=storage.dcp_writer(attempt))
    return attempt


def _record_syncs(monkeypatch) -> list[tuple]:
    """Every fsync (by the path of its descriptor) and rename, in order, from any thread."""
    events: list[tuple] = []
    fsync, replace = os.fsync, os.replace

    def recording_fsync(fd):
        fsync(fd)
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))

    def recording_replace(src, dst):
        replace(src, dst)
        events.append(("rename", os.fspath(src), os.fspath(dst)))

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    return events


def test_local_commit_is_durable_in_order(tmp_path, monkeypatch):
    storage = Storage(str(tmp_path / "ckpt"))
    root = storage.url
    attempt = _save(storage, 10)
    files = set(storage.files(attempt)) | {"train_state.json", "manifest.json", "COMMIT"}
    events = _record_syncs(monkeypatch)
    final = checkpoint.commit(storage, attempt, 10, {"step": 10})
    monkeypatch.undo()

    publish = events.index(("rename", f"{root}/{attempt}", f"{root}/{final}"))
    before = {e[1] for e in events[:publish] if e[0] == "fsync"}
    assert {f"{root}/{attempt}/{rel}" for rel in files} | {f"{root}/{attempt}"} <= before
    assert set(storage.files(final)) == files  # COMMIT was in the directory the rename published
    latest = next(i for i, e in enumerate(events) if e[0] == "rename" and e[2] == f"{root}/latest")
    assert publish < latest
    assert ("fsync", root) in events[latest:]  # both renames durable before the commit returns
    assert checkpoint.verify(storage, final)["step"] == 10


def test_write_text_fsyncs_its_directory(tmp_path, monkeypatch):
    storage = Storage(str(tmp_path))
    events = _record_syncs(monkeypatch)
    storage.write_text("latest", "step_00000001\n")
    monkeypatch.undo()
    assert events[-2][0] == "rename" and events[-1] == ("fsync", storage.url)


def _coordinator(storage: Storage, keep: int) -> CheckpointCoordinator:
    job = types.SimpleNamespace(checkpoint=types.SimpleNamespace(keep=keep))
    return CheckpointCoordinator(job, storage, telemetry=None, io_timeout_s=10.0, faults=[])


def test_retention_runs_after_the_commit_returns(tmp_path, monkeypatch):
    storage = Storage(str(tmp_path))
    coordinator = _coordinator(storage, keep=1)
    checkpoint.commit(storage, _save(storage, 10), 10, {"step": 10})
    release, removing = threading.Event(), threading.Event()
    remove = Storage.remove

    def slow_remove(self, rel):
        if rel == "step_00000010":
            removing.set()
            assert release.wait(30)
        remove(self, rel)

    monkeypatch.setattr(Storage, "remove", slow_remove)
    pending = _PendingSave(20, _save(storage, 20), 0.0, 0.0, {"step": 20}, persisted=True)
    done = []
    committer = threading.Thread(target=lambda: done.append(coordinator._commit(pending)))
    committer.start()
    committer.join(10)
    try:
        # the commit returned with the step-10 directory still being deleted: COMMIT and latest in place
        assert done == [("step_00000020", ["step_00000010"])]
        assert removing.wait(10) and storage.read_text("latest") == "step_00000020\n"
        assert checkpoint.latest_committed(storage) == "step_00000020"
    finally:
        release.set()
        committer.join(10)
    coordinator.retention.wait()
    assert [c["name"] for c in checkpoint.list_checkpoints(storage)] == ["step_00000020"]


def test_a_deletion_that_fails_is_left_for_the_next_commit(tmp_path, monkeypatch):
    storage = Storage(str(tmp_path))
    coordinator = _coordinator(storage, keep=1)
    checkpoint.commit(storage, _save(storage, 10), 10, {"step": 10})
    remove = Storage.remove

    def refused(self, rel):
        if rel == "step_00000010":
            raise PermissionError(rel)
        remove(self, rel)

    monkeypatch.setattr(Storage, "remove", refused)
    coordinator._commit(_PendingSave(20, _save(storage, 20), 0.0, 0.0, {"step": 20}, persisted=True))
    coordinator.retention.wait()  # logged, not raised
    monkeypatch.setattr(Storage, "remove", remove)
    assert coordinator._commit(_PendingSave(30, _save(storage, 30), 0.0, 0.0, {"step": 30}, persisted=True))[1] == \
        ["step_00000010", "step_00000020"]
    coordinator.retention.wait()
    assert [c["name"] for c in checkpoint.list_checkpoints(storage)] == ["step_00000030"]


def test_writeback_starts_while_the_shard_is_written(tmp_path, monkeypatch):
    started = []
    sync_file_range = dcp_storage._SYNC_FILE_RANGE
    assert sync_file_range is not None  # Linux's C library has it

    def recording(fd, offset, nbytes, flags):
        started.append((offset, nbytes, os.fstat(fd).st_size))
        assert sync_file_range(fd, offset, nbytes, flags) == 0

    monkeypatch.setattr(dcp_storage, "_SYNC_FILE_RANGE", recording)
    storage = Storage(str(tmp_path))
    tensors = {f"w{i}": torch.randn(1 << 20) for i in range(6)}  # 6 x 4 MiB
    dcp.save(tensors, storage_writer=storage.dcp_writer("a"))
    monkeypatch.undo()
    shard = (tmp_path / "a" / "__0_0.distcp").read_bytes()
    assert len(started) >= 2
    # contiguous ranges from the file's start, each of bytes already in the file
    assert [offset for offset, _, _ in started] == [0] + [o + n for o, n, _ in started[:-1]]
    assert all(offset + nbytes <= size for offset, nbytes, size in started)
    assert all(nbytes >= dcp_storage._WRITEBACK for _, nbytes, _ in started)
    out = {k: torch.empty_like(v) for k, v in tensors.items()}
    dcp.load(out, storage_reader=storage.dcp_reader("a"))
    assert all(torch.equal(out[k], tensors[k]) for k in tensors)
    hashes = storage.read_text(f"a/{dcp_storage.hashes_file(0)}")
    assert hashlib.sha256(shard).hexdigest() in hashes


def test_a_saved_copys_adjacent_tensors_reach_the_file_as_one_write(tmp_path, monkeypatch):
    """A rank's saved copy holds its tensors back to back in file order: the writer passes them on (and hashes
    them) as one buffer, and the file still holds each tensor at its recorded offset."""
    state = {f"w{i}": torch.randn(i + 1, 3) for i in range(40)}
    state["odd"] = torch.ones(1)
    state["step"] = torch.tensor(7, dtype=torch.int64)  # aligned to 8 bytes after a 4-byte gap: a second run
    state["tail"] = torch.arange(5, dtype=torch.float32)
    copy = host_copy(state)
    writes = []
    write = dcp_storage._HashingStream.write

    def counting(self, data):
        writes.append((id(self), memoryview(data).nbytes))
        return write(self, data)

    monkeypatch.setattr(dcp_storage._HashingStream, "write", counting)
    storage = Storage(str(tmp_path))
    dcp.save(copy, storage_writer=storage.dcp_writer("a"))
    monkeypatch.undo()
    shard = [n for stream, n in itertools.takewhile(lambda w: w[0] == writes[0][0], writes)]  # then .metadata's
    assert shard == [sum(v.numel() * v.element_size() for k, v in state.items() if k.startswith(("w", "odd"))),
                     8 + 5 * 4]
    out = {k: torch.zeros_like(v) for k, v in state.items()}
    dcp.load(out, storage_reader=storage.dcp_reader("a"))
    assert all(torch.equal(out[k], state[k]) for k in state)


def test_ranks_fsync_their_shards_and_leave_metadata_to_the_commit(tmp_path, monkeypatch):
    """A rank fsyncs its shard; DCP's coordinator writes ``.metadata`` without an fsync of its own (nor torch's
    machine-wide ``os.sync()`` fallback): the commit's batch makes it durable with the other files."""
    events = _record_syncs(monkeypatch)
    monkeypatch.setattr(os, "sync", lambda: events.append(("sync",)))
    storage = Storage(str(tmp_path))
    attempt = _save(storage, 10)
    monkeypatch.undo()
    assert events and ("sync",) not in events
    synced = {e[1] for e in events if e[0] == "fsync"}
    assert synced == {f"{storage.url}/{attempt}/__0_0.distcp"}
