"""A DCP storage writer that hashes every file while writing it, so a commit never reads a shard back.

Each rank's writer feeds the bytes it writes into sha256 as they pass (:class:`_HashingStream`); its
``write_data`` result carries ``{file: {bytes, sha256}}`` for the files it wrote, which DCP gathers on its
coordinator rank with the write results (one ``gather_object`` DCP already does). There ``finish`` writes
``.metadata`` (hashed the same way) and then :data:`HASHES_FILE`, the hashes of every shard and of
``.metadata``. The commit protocol (``commit.py``) builds the manifest from that file instead of hashing
what it lists; verification on load still reads everything.

Built on torch's fsspec writer, which lives in a private module
(``torch.distributed.checkpoint._fsspec_filesystem`` in torch 2.13); ``storage.py`` imports this class.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import posixpath

from torch.distributed.checkpoint._fsspec_filesystem import FileSystem, FsspecWriter
from torch.distributed.checkpoint.metadata import Metadata
from torch.futures import Future

__all__ = ["HASHES_FILE", "HashingWriter"]

HASHES_FILE = "shard_hashes.json"
_TMP_SUFFIX = ".tmp"  # DCP writes ``.metadata.tmp`` and renames it


_SMALL = 1 << 16  # a write below this many bytes is gathered with its neighbours
_GATHERED = 1 << 20  # bytes of gathered small writes passed on (and hashed) at once


class _HashingStream:
    """A write stream that passes every byte to ``stream`` and to a sha256 digest (sequential writes only:
    DCP appends item after item and never seeks back).

    ``torch.save`` writes each record's zip headers in dozens of small pieces; those are gathered and passed on
    (and hashed) together, so a tensor costs a few calls down the stream instead of ~40. ``tell``, ``flush``,
    ``fileno`` (DCP's fsync) and ``close`` pass the gathered bytes on first.
    """

    def __init__(self, stream) -> None:
        self._stream = stream
        self._gathered = bytearray()
        self.digest = hashlib.sha256()
        self.nbytes = 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.nbytes += view.nbytes
        if view.nbytes < _SMALL:
            self._gathered += view
            if len(self._gathered) >= _GATHERED:
                self.drain()
        else:
            self.drain()
            self.digest.update(view)
            self._stream.write(view)
        return view.nbytes

    def drain(self) -> None:
        """Pass the gathered small writes on to the stream and the digest."""
        if self._gathered:
            self.digest.update(self._gathered)
            self._stream.write(self._gathered)
            self._gathered = bytearray()

    def tell(self) -> int:
        return self._stream.tell() + len(self._gathered)

    def flush(self) -> None:
        self.drain()
        self._stream.flush()

    def fileno(self) -> int:
        self.flush()  # DCP fsyncs this descriptor: every byte must have reached it
        return self._stream.fileno()

    def close(self) -> None:
        self.drain()
        self._stream.close()

    def __getattr__(self, name):
        return getattr(self._stream, name)


class _HashingFileSystem(FileSystem):
    """DCP's fsspec file system, recording ``{file name: {"bytes", "sha256"}}`` of every file it writes."""

    def __init__(self) -> None:
        super().__init__()
        self.hashes: dict[str, dict] = {}

    @contextlib.contextmanager
    def create_stream(self, path, mode: str):
        with super().create_stream(path, mode) as stream:
            if "w" not in mode:
                yield stream
                return
            hashing = _HashingStream(stream)
            yield hashing
            hashing.drain()  # bytes still gathered when the caller did not close the stream
            name = posixpath.basename(os.fspath(path)).removesuffix(_TMP_SUFFIX)
            self.hashes[name] = {"bytes": hashing.nbytes, "sha256": hashing.digest.hexdigest()}


class _WriteResults(list):
    """A rank's DCP write results, carrying the hashes of the files it wrote (gathered with them)."""

    hashes: dict[str, dict]


class HashingWriter(FsspecWriter):
    """torch DCP's fsspec storage writer (local path or ``s3://``), hashing each file as it is written.

    Args:
        path: the checkpoint directory (URL or local path).
        **options: fsspec options (S3 ``client_kwargs``).
    """

    def __init__(self, path: str, **options) -> None:
        super().__init__(path, **options)
        fs = _HashingFileSystem()
        fs.fs = self.fs.fs  # the fsspec file system FsspecWriter opened for ``path``
        self.fs = fs

    def write_data(self, plan, planner) -> Future:
        """Write this rank's items (DCP's single file per rank); the result carries their files' hashes."""
        written = super().write_data(plan, planner).wait()
        results = _WriteResults(written)
        results.hashes = dict(self.fs.hashes)
        future: Future = Future()
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list]) -> None:
        """On DCP's coordinator rank: write ``.metadata``, then every file's hash into :data:`HASHES_FILE`."""
        super().finish(metadata, results)
        hashes = {}
        for rank_results in results:
            hashes.update(getattr(rank_results, "hashes", {}))
        hashes.update(self.fs.hashes)  # .metadata (and this rank's shards again)
        with self.fs.fs.open(posixpath.join(os.fspath(self.path), HASHES_FILE), "w") as f:
            f.write(json.dumps(hashes, indent=1, sort_keys=True))
            with contextlib.suppress(AttributeError, io.UnsupportedOperation):  # local files only
                f.flush()
                os.fsync(f.fileno())
