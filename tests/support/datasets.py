"""Damaged copies of a prepared dataset, for tests of what preflight and the ranks refuse."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["with_token", "with_broken_parquet"]


def with_token(dataset: Path, out: Path, token: int, position: float = 0.5) -> Path:
    """Copy ``dataset`` to ``out`` with the train token at ``position`` (a fraction of the first train shard)
    replaced by ``token``, and the manifest's size and sha256 of that shard updated to match, so that only
    the token is wrong. Returns the shard's path."""
    shutil.copytree(dataset, out)
    shard = out / "train-00000.parquet"
    column = pq.read_table(shard).column("tokens").combine_chunks()
    values = column.flatten().to_numpy().copy()
    values[int(len(values) * position)] = token
    pq.write_table(pa.table({"tokens": pa.ListArray.from_arrays(column.offsets, pa.array(values))}), shard,
                   compression="zstd")
    manifest = json.loads((out / "dataset.json").read_text())
    entry = next(e for e in manifest["splits"]["train"]["shards"] if e["file"] == shard.name)
    entry.update(bytes=shard.stat().st_size, sha256=hashlib.sha256(shard.read_bytes()).hexdigest())
    (out / "dataset.json").write_text(json.dumps(manifest))
    return shard


def with_broken_parquet(dataset: Path, out: Path) -> Path:
    """Copy ``dataset`` to ``out`` with the first train shard cut to half its bytes (no Parquet footer) and the
    manifest's size and sha256 of that shard updated to match, so that only the Parquet file is broken.
    Returns the shard's path."""
    shutil.copytree(dataset, out)
    shard = out / "train-00000.parquet"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    manifest = json.loads((out / "dataset.json").read_text())
    entry = next(e for e in manifest["splits"]["train"]["shards"] if e["file"] == shard.name)
    entry.update(bytes=shard.stat().st_size, sha256=hashlib.sha256(shard.read_bytes()).hexdigest())
    (out / "dataset.json").write_text(json.dumps(manifest))
    return shard
