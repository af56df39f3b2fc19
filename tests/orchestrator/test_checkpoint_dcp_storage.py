"""The checkpoint's DCP storage layer (orchestrator/checkpoint/dcp_storage.py): raw records, one file per rank,
hashed as written; read back bitwise by offset (local and S3 on moto), across layouts, refusing a corrupt or
truncated file by name; the torch internals it relies on; and the hashing stream under it (small writes
gathered, large ones passed straight on; offsets, fsync and digest those of the bytes as they reach the file)."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import inspect
import json
import os
import pickle
import random

import fsspec
import pytest
import torch
import torch.distributed.checkpoint as dcp

from support.spawn import free_ports, spawn_ranks
from v4train.orchestrator import checkpoint
from v4train.orchestrator.checkpoint import CheckpointError, dcp_storage
from v4train.orchestrator.checkpoint.dcp_storage import RAW_RECORD, _HashingStream, hashes_file
from v4train.orchestrator.checkpoint.storage import Storage

HANG_S = 300


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path, s3_server):
    if request.param == "local":
        return Storage(str(tmp_path / "ckpt"))
    return Storage(f"s3://{s3_server['bucket']}/{tmp_path.name}", endpoint_url=s3_server["endpoint_url"])


def _state() -> dict[str, torch.Tensor]:
    """Every dtype and shape a training state holds: fp32/bf16/int64/bool, 0-d step counters, an empty tensor,
    a non-contiguous view, a tensor over 64 KiB (written straight through) and small ones (gathered)."""
    g = torch.Generator().manual_seed(0)
    return {
        "model.w": torch.randn(300, 70, generator=g),
        "model.w_bf16": torch.randn(33, 17, generator=g).to(torch.bfloat16),
        "model.tid2eid": torch.randint(0, 1 << 40, (5, 3), generator=g),
        "model.mask": torch.rand(9, generator=g) > 0.5,
        "optim.w.step": torch.tensor(7.0),
        "model.empty": torch.empty(0, 4),
        "model.strided": torch.randn(12, 10, generator=g)[:, ::3],
    }


def _save(storage: Storage, rel: str, state: dict) -> None:
    dcp.save(state, storage_writer=storage.dcp_writer(rel), no_dist=True)


def _load(storage: Storage, rel: str, like: dict) -> dict[str, torch.Tensor]:
    out = {k: torch.full_like(v.contiguous(), 3) for k, v in like.items()}
    dcp.load(out, storage_reader=storage.dcp_reader(rel), no_dist=True)
    return out


def test_raw_records_round_trip_bitwise_one_file_per_rank_hashed_as_written(storage):
    state = _state()
    _save(storage, "x", state)
    files = storage.files("x")
    assert sorted(files) == [".metadata", "__0_0.distcp", hashes_file(0)]
    # nothing but the tensors' bytes: no per-record header
    assert files["__0_0.distcp"] == sum(v.numel() * v.element_size() for v in state.values())
    meta = storage.dcp_reader("x").read_metadata()
    assert all(info.transform_descriptors == (RAW_RECORD,) for info in meta.storage_data.values())
    recorded = json.loads(storage.read_text(f"x/{hashes_file(0)}"))
    for rel in (".metadata", "__0_0.distcp"):
        assert {k: recorded[rel][k] for k in ("bytes", "sha256")} == \
            {"bytes": files[rel], "sha256": storage.sha256(f"x/{rel}")}
    assert recorded[".metadata"]["references"] == {"__0_0.distcp": files["__0_0.distcp"]}
    loaded = _load(storage, "x", state)
    for key, value in state.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key


def test_torch_save_records_of_earlier_checkpoints_still_load(tmp_path):
    """Checkpoints written before raw records (and ``v4train convert``'s shards) hold DCP's torch.save records."""
    state = _state()
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp_path / "old")), no_dist=True)
    loaded = _load(Storage(str(tmp_path)), "old", state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def _commit(storage: Storage, state: dict) -> str:
    attempt = checkpoint.begin_attempt(storage, 5)
    _save(storage, attempt, state)
    return checkpoint.commit(storage, attempt, 5, {"step": 5})


def test_a_flipped_byte_in_a_raw_shard_is_refused_naming_the_file(storage):
    final = _commit(storage, _state())
    assert checkpoint.verify(storage, final)["step"] == 5
    path = storage._path(f"{final}/__0_0.distcp")
    data = bytearray(storage.fs.cat_file(path))
    data[len(data) // 3] ^= 0x01
    storage.fs.pipe_file(path, bytes(data))
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp: size or sha256 differs from the manifest"):
        checkpoint.verify(storage, final)


def test_a_truncated_raw_shard_is_refused_naming_the_file(storage):
    state = _state()
    final = _commit(storage, state)
    path = storage._path(f"{final}/__0_0.distcp")
    storage.fs.pipe_file(path, storage.fs.cat_file(path)[:-100])
    with pytest.raises(CheckpointError, match=r"__0_0\.distcp: size or sha256 differs from the manifest"):
        checkpoint.verify(storage, final)
    # a reader that skipped verification still stops at the first record past the end, naming file and tensor
    with pytest.raises(BaseException, match=r"__0_0\.distcp: truncated: model\.\w+ is stored at bytes"):
        _load(storage, final, state)


def test_torch_internals_the_raw_records_rely_on():
    """The private pieces of torch DCP (2.13) dcp_storage.py builds on: if torch changes them, this fails here
    rather than in a save."""
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
    from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, _StorageInfo, _StoragePrefix
    from torch.distributed.checkpoint.state_dict_saver import _save_state_dict

    assert [f.name for f in dataclasses.fields(_StorageInfo)] == ["relative_path", "offset", "length",
                                                                  "transform_descriptors"]
    assert [f.name for f in dataclasses.fields(_StoragePrefix)] == ["prefix"] and DEFAULT_SUFFIX == ".distcp"
    assert {"write_data", "finish", "sync_files"} <= set(dir(FsspecWriter("memory://probe")))
    # the raw mark survives .metadata's pickle, and torch's own reader refuses it rather than misreading bytes
    info = pickle.loads(pickle.dumps(_StorageInfo("__0_0.distcp", 0, 4, (RAW_RECORD,))))
    assert info.transform_descriptors == (RAW_RECORD,)
    with pytest.raises(Exception, match=RAW_RECORD):
        FsspecReader("memory://probe").transforms.transform_load_stream(None, (RAW_RECORD,), None)
    assert {"state_dict", "storage_writer", "process_group", "no_dist", "planner"} <= set(
        inspect.signature(_save_state_dict).parameters)


def test_save_without_the_per_key_wrapper_writes_what_dcp_save_writes(tmp_path):
    state = _state()
    storage = Storage(str(tmp_path))
    dcp_storage.save(state, storage.dcp_writer("ours"))
    _save(storage, "dcp", state)
    ours, theirs = (storage.dcp_reader(rel).read_metadata() for rel in ("ours", "dcp"))
    assert ours.state_dict_metadata == theirs.state_dict_metadata and ours.storage_data == theirs.storage_data
    assert storage.sha256("ours/__0_0.distcp") == storage.sha256("dcp/__0_0.distcp")
    with pytest.raises(TypeError, match="model.stage is a Stateful object"):
        dcp_storage.save({"model.stage": torch.optim.SGD([torch.zeros(1)], lr=0.1)}, storage.dcp_writer("bad"))


def _layouts_rank(rank: int, port: int, root: str) -> None:
    """Save a [6, 8] tensor sharded by rows over two ranks (plus a replicated one, written once), then load it
    sharded by columns: each rank's read takes a slice of both saved chunks."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=HANG_S))
    try:
        mesh = init_device_mesh("cpu", (2,))
        full = torch.arange(48, dtype=torch.float32).reshape(6, 8) / 7
        storage = Storage(root)
        dcp.save({"w": distribute_tensor(full, mesh, [Shard(0)]), "shared": full[0].clone()},
                 storage_writer=storage.dcp_writer("rows"))
        target = {"w": distribute_tensor(torch.zeros(6, 8), mesh, [Shard(1)]), "shared": torch.zeros(8)}
        dcp.load(target, storage_reader=storage.dcp_reader("rows"))
        assert torch.equal(target["w"].to_local(), full[:, 4 * rank:4 * rank + 4]), rank
        assert torch.equal(target["shared"], full[0])
    finally:
        dist.destroy_process_group()


def test_raw_records_reshard_across_layouts_exactly(tmp_path):
    spawn_ranks(_layouts_rank, (free_ports(1)[0], str(tmp_path)), 2, HANG_S, "raw-record layout ranks")
    storage = Storage(str(tmp_path))
    assert sorted(f for f in storage.files("rows") if f.endswith(".distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    whole = {"w": torch.zeros(6, 8), "shared": torch.zeros(8)}  # one process reads both ranks' chunks
    dcp.load(whole, storage_reader=storage.dcp_reader("rows"), no_dist=True)
    assert torch.equal(whole["w"], torch.arange(48, dtype=torch.float32).reshape(6, 8) / 7)


def test_gathered_writes_reach_the_file_in_order_with_their_offsets_and_sha256(tmp_path):
    rng = random.Random(0)
    sizes = [1, 3, 100, 65535, 65536, 70000, (1 << 20) + 7, 5, 9] * 8
    rng.shuffle(sizes)
    pieces = [rng.randbytes(n) for n in sizes]
    path = tmp_path / "shard"
    with fsspec.filesystem("file").open(str(path), "wb") as raw:
        stream = _HashingStream(raw)
        offset = 0
        for piece in pieces:
            assert stream.tell() == offset  # DCP records each item's offset from tell()
            stream.write(memoryview(piece))
            offset += len(piece)
        os.fsync(stream.fileno())
        assert path.stat().st_size == offset  # everything written before the fsync
        stream.close()
    data = path.read_bytes()
    assert data == b"".join(pieces)
    assert stream.nbytes == len(data)
    assert stream.digest.hexdigest() == hashlib.sha256(data).hexdigest()
