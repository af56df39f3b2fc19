"""The hashing writer's stream (orchestrator/checkpoint/hashed_writer.py): small writes gathered, large ones passed
straight on; offsets, fsync and the digest must be those of the bytes as they reach the file."""

from __future__ import annotations

import hashlib
import os
import random

import fsspec

from v4train.orchestrator.checkpoint.dcp_storage import _HashingStream


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
