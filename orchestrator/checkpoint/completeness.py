"""Whether a committed checkpoint holds every shard file its DCP metadata references.

The manifest lists the files a save wrote and ``COMMIT`` the manifest's hash, so re-hashing the manifest's
files (:func:`v4train.orchestrator.checkpoint.verify`) cannot see a shard that is missing from both (a
manifest rewritten to match, or a shard lost before the manifest was assembled). DCP's ``.metadata``, itself
in the manifest, names the file, offset and length of every tensor record; a file absent or shorter than its
last record makes the checkpoint unloadable. Used by ``v4train ckpt verify`` and by the resume preflight.
"""

from __future__ import annotations

from v4train.orchestrator.checkpoint.commit import CheckpointError
from v4train.orchestrator.checkpoint.dcp_storage import shard_ends
from v4train.orchestrator.checkpoint.storage import Storage

__all__ = ["check_referenced_shards"]


def check_referenced_shards(storage: Storage, name: str, sizes: dict[str, int] | None = None) -> None:
    """Check that every shard file step directory ``name``'s DCP metadata references is present and long enough.

    Args:
        storage: the checkpoint root.
        name: a step directory under it (e.g. ``step_00000004``).
        sizes: its files' sizes in bytes (``storage.files(name)``), when the caller has them already.
    Raises CheckpointError naming the first shard file that is missing or shorter than the records in it.
    """
    sizes = storage.files(name) if sizes is None else sizes
    for rel, needed in sorted(shard_ends(storage.dcp_reader(name).read_metadata()).items()):
        have = sizes.get(rel)
        if have is None or have < needed:
            raise CheckpointError(f"{storage.url_of(name)}/{rel}: a shard the checkpoint's DCP metadata references "
                                  "is missing or truncated")
