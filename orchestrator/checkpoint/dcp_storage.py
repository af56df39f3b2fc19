"""torch DCP's storage layer for v4train checkpoints: one file of raw bytes per rank, hashed while written.

DCP stays the planner and resharder (global names, de-duplication of replicated keys, any layout reading any
other); this module only decides how a rank's items reach storage and come back:

- :class:`HashingWriter` writes each rank's items as raw bytes, item after item, into one file
  (``__<rank>_0.distcp``) with one sequential buffered stream and one fsync, recording each item's offset and
  length in DCP's storage metadata (``_StorageInfo``) and marking it :data:`RAW_RECORD`. Every byte passes
  through sha256 on its way (:class:`_HashingStream`); each rank then records its file's size and sha256 in
  its own :func:`hashes_file` (DCP's coordinator adds ``.metadata``, hashed the same way, to its own). The
  commit protocol (``commit.py``) builds the manifest from those files instead of reading shards back.
- :func:`save` is DCP's save on a save group's first save; the group's later saves of the same state layout
  replay it without DCP (``save_plan.py``: each rank writes its file at the cached offsets, the coordinator
  the cached ``.metadata``; one one-integer all-reduce is the only collective).
- :class:`RawRecordReader` reads raw records by offset straight into a tensor of the saved chunk's shape and
  dtype (from DCP's metadata); a record without the mark (DCP's ``torch.save`` records: checkpoints written
  before, or by ``v4train convert``) goes through torch's own reader.

Why not DCP's own records: torch's filesystem writer serialises every tensor with ``torch.save`` (a zip record
of ~40 small writes, about 0.45 ms each on this machine), which made a rank's save CPU-bound at a few hundred
tensors; its ``SAFETENSORS`` option builds the whole rank's blob in memory and torch's fsspec reader cannot read
it back.

The one module that relies on torch DCP internals (torch 2.13): the private fsspec writer/reader
(``torch.distributed.checkpoint._fsspec_filesystem``), ``_StorageInfo`` and ``_StoragePrefix`` (the per-item
storage record and the per-rank file prefix, ``__<group rank>_``, which :meth:`HashingWriter.write_cached`
replays), ``_FileSystemWriter.finish`` (``.metadata``), and the ``transform_descriptors`` field carrying the raw mark
(torch's reader refuses a descriptor it does not know, so a raw checkpoint is never misread as ``torch.save``
records); and :func:`save` calls DCP's ``_save_state_dict`` (what ``dcp.save`` runs after wrapping every key in
a logged call, a third of a save's CPU at ~650 keys, for ``Stateful`` objects a training state of tensors does not
hold). ``tests/orchestrator/test_checkpoint_dcp_storage.py`` and ``test_checkpoint_save_plan.py`` fail if any of
these change.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import hashlib
import io
import json
import os
import posixpath
import re

import torch
import torch.distributed as dist
from torch.distributed.checkpoint._fsspec_filesystem import FileSystem, FsspecReader, FsspecWriter
from torch.distributed.checkpoint.filesystem import DEFAULT_SUFFIX, _StorageInfo, _StoragePrefix
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, SavePlan, SavePlanner, WriteItem
from torch.distributed.checkpoint.state_dict_saver import _save_state_dict
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from v4train.orchestrator.checkpoint import save_plan

__all__ = ["RAW_RECORD", "HashingWriter", "RawRecordReader", "hashes_file", "is_hashes_file", "shard_ends", "save"]

RAW_RECORD = "v4train.raw"  # transform descriptor of an item stored as its raw bytes (C order, native endianness)
_TMP_SUFFIX = ".tmp"  # DCP writes ``.metadata.tmp`` and renames it
_HASHES = re.compile(r"shard_hashes\.(\d+)\.json")


def hashes_file(rank: int) -> str:
    """The name of the file in which writing rank ``rank`` records ``{file: {"bytes", "sha256"}}`` of the files
    it wrote (its shard; DCP's coordinator also ``.metadata``)."""
    return f"shard_hashes.{rank}.json"


def is_hashes_file(name: str) -> bool:
    """Whether ``name`` (relative to a checkpoint directory) is a rank's :func:`hashes_file`."""
    return _HASHES.fullmatch(name) is not None


def shard_ends(metadata: Metadata) -> dict[str, int]:
    """``{file: bytes}``: how many bytes each file DCP's ``metadata`` references must hold (the end of its last
    record)."""
    ends: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    return ends


_SMALL = 1 << 16  # a write below this many bytes is gathered with its neighbours
_GATHERED = 1 << 20  # bytes of gathered small writes passed on (and hashed) at once
_WRITEBACK = 8 << 20  # bytes of a local shard written between two requests to start their writeback


_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of the range's dirty pages, wait for nothing


def _libc_sync_file_range():
    """Linux's ``sync_file_range(2)`` through ctypes (the ``os`` module does not offer it), or None where the C
    library lacks it."""
    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int
    return call


_SYNC_FILE_RANGE = _libc_sync_file_range()


def _start_writeback(fd: int, start: int, end: int) -> None:
    """Have the kernel start writing bytes ``[start, end)`` of local file ``fd`` to disk now, without waiting
    (``sync_file_range(fd, start, end - start, SYNC_FILE_RANGE_WRITE)``; the call releases the GIL), so that
    the shard's final fsync finds less left and the disk works while the rank still hashes and writes.
    Durability still comes from that fsync; a no-op where unsupported (its failure changes nothing)."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, start, end - start, _SYNC_FILE_RANGE_WRITE)


class _HashingStream:
    """A write stream that passes every byte to ``stream`` and to a sha256 digest (sequential writes only:
    items are appended one after the other, never with a seek back).

    Small writes (a bias, a step counter, ``torch.save``'s zip headers in ``.metadata``) are gathered and passed
    on (and hashed) a MiB at a time; a large one goes straight to the stream, so a tensor's bytes are never
    copied in Python. ``tell``, ``flush``, ``fileno`` (for the fsync) and ``close`` pass the gathered bytes on
    first.
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
        self.flush()  # the caller fsyncs this descriptor: every byte must have reached it
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


def _is_local(fs) -> bool:
    """Whether fsspec file system ``fs`` is the local disk (whose files have descriptors to fsync)."""
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def _fsync(stream) -> None:
    """fsync a local file's descriptor; an object store's upload is durable once the stream is closed."""
    with contextlib.suppress(AttributeError, io.UnsupportedOperation):
        os.fsync(stream.fileno())


def _byte_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a CPU tensor in C order (copied only if it is not contiguous)."""
    if tensor.device.type != "cpu":
        raise ValueError(f"checkpoint writer: a tensor on {tensor.device} reached the writer; only CPU tensors are")
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


class _RecordWriter:
    """Records passed to a :class:`_HashingStream` in as few calls as their memory allows.

    Consecutive tensors whose bytes lie back to back in one storage (a rank's saved copy,
    ``orchestrator/rank/saved_copies.host_copy``, holds a rank's tensors in file order) make one run, passed on
    as one buffer in slices of :data:`_WRITEBACK` bytes: the file write and sha256 each release the GIL for a
    whole slice, so a writer thread seldom holds the GIL the training thread waits for; after each slice a local
    file's writeback is started (:func:`_start_writeback`).
    """

    def __init__(self, stream: _HashingStream, writeback: bool) -> None:
        self.stream = stream
        self.writeback = writeback
        self.offset = 0  # bytes of the records taken so far (passed on, or in the open run)
        self._run: tuple[torch.UntypedStorage, int, int] | None = None  # (storage, first byte, end byte)
        self._started = 0  # bytes whose writeback was started

    def tensor(self, tensor: torch.Tensor) -> int:
        """Take ``tensor``'s bytes in C order (copied first only if it is not contiguous); returns their length.

        Raises:
            ValueError: ``tensor`` is not on the CPU.
        """
        if tensor.device.type != "cpu":
            raise ValueError(f"checkpoint writer: a tensor on {tensor.device} reached the writer; only CPU tensors are")
        tensor = tensor.detach().contiguous()
        storage = tensor.untyped_storage()
        start = tensor.storage_offset() * tensor.element_size()
        nbytes = tensor.numel() * tensor.element_size()
        run = self._run
        if run is not None and run[0].data_ptr() == storage.data_ptr() and run[2] == start:
            self._run = (run[0], run[1], start + nbytes)
        else:
            self.flush()
            self._run = (storage, start, start + nbytes)
        self.offset += nbytes
        return nbytes

    def data(self, view: memoryview) -> int:
        """Take the bytes of ``view``; returns their length."""
        self.flush()
        self._pass_on(view)
        self.offset += view.nbytes
        return view.nbytes

    def flush(self) -> None:
        """Pass the open run on."""
        if self._run is not None:
            storage, start, end = self._run
            self._run = None
            run = torch.empty(0, dtype=torch.uint8).set_(storage, start, (end - start,))
            self._pass_on(memoryview(run.numpy()))

    def _pass_on(self, view: memoryview) -> None:
        for first in range(0, view.nbytes, _WRITEBACK):
            self.stream.write(view[first:first + _WRITEBACK])
            if self.writeback and self.stream.nbytes - self._started >= _WRITEBACK:
                _start_writeback(self.stream.fileno(), self._started, self.stream.nbytes)  # fileno() flushes
                self._started = self.stream.nbytes


class HashingWriter(FsspecWriter):
    """A DCP storage writer (local path or ``s3://``): one file of raw records per rank, hashed as written.

    Each writing rank also records the size and sha256 of the files it wrote in its :func:`hashes_file`;
    the commit builds the manifest from those. :meth:`write_cached` writes a save from a cached
    :class:`~v4train.orchestrator.checkpoint.save_plan.SaveLayout` without DCP's collectives.

    Args:
        path: the checkpoint directory (URL or local path).
        **options: fsspec options (S3 ``client_kwargs``).
    """

    def __init__(self, path: str, **options) -> None:
        super().__init__(path, **options)
        fs = _HashingFileSystem()
        fs.fs = self.fs.fs  # the fsspec file system FsspecWriter opened for ``path``
        self.fs = fs
        self.written: list[tuple[WriteItem, _StorageInfo]] = []  # this save's items in file order
        self._rank: int | None = None  # the writing rank of this save's shard (its file prefix)

    def _write_file(self, rank: int, items) -> list[_StorageInfo]:
        """Write ``(name, data)`` pairs (a tensor, or ``io.BytesIO``) as raw records into ``__<rank>_0.distcp``:
        one sequential stream, one fsync; each record's storage info, in order."""
        name = f"__{rank}_0{DEFAULT_SUFFIX}"
        infos = []
        with self.fs.create_stream(self.fs.concat_path(self.path, name), "wb") as stream:
            records = _RecordWriter(stream, writeback=self.sync_files and _is_local(self.fs.fs))
            for _, data in items:
                offset = records.offset
                nbytes = records.data(data.getbuffer()) if isinstance(data, io.BytesIO) else records.tensor(data)
                infos.append(_StorageInfo(name, offset, nbytes, (RAW_RECORD,)))
            records.flush()
            if self.sync_files:
                stream.flush()
                _fsync(stream)
        self._rank = rank
        return infos

    def _record_hashes(self) -> None:
        """Write this rank's :func:`hashes_file`: every file it wrote so far with its size and sha256. Not
        fsynced: the commit copies these hashes into manifest.json, which is, before COMMIT is written."""
        with self.fs.fs.open(posixpath.join(os.fspath(self.path), hashes_file(self._rank)), "w") as f:
            f.write(json.dumps(self.fs.hashes, indent=1, sort_keys=True))

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future:
        """Write this rank's items into ``<prefix>0.distcp``, each as its raw bytes at the offset recorded in its
        ``_StorageInfo``, then the rank's :func:`hashes_file`."""
        prefix: _StoragePrefix = plan.storage_data
        rank = int(prefix.prefix.strip("_"))
        infos = self._write_file(rank, ((item, planner.resolve_data(item)) for item in plan.items))
        self.written = list(zip(plan.items, infos, strict=True))
        self._record_hashes()
        future: Future = Future()
        future.set_result([WriteResult(index=item.index, size_in_bytes=info.length, storage_data=info)
                           for item, info in self.written])
        return future

    def finish(self, metadata: Metadata, results: list[list]) -> None:
        """On DCP's coordinator rank: write ``.metadata``, then add its hash to this rank's :func:`hashes_file`
        with the bytes each shard file must hold (``references``: the end of its last record), so that the
        commit checks the shards without unpickling ``.metadata``.

        ``.metadata`` is not fsynced here: the commit fsyncs every file of the attempt in one concurrent batch
        (``Storage.write_files``), where this rank's separate fsync cost a journal commit of its own on the
        save's path (and torch falls back to a machine-wide ``os.sync()`` for a stream without a descriptor,
        such as an S3 upload, durable when closed)."""
        sync_files, self.sync_files = self.sync_files, False
        try:
            super().finish(metadata, results)
        finally:
            self.sync_files = sync_files
        self.fs.hashes[".metadata"]["references"] = shard_ends(metadata)
        self._record_hashes()

    def write_cached(self, state: dict[str, torch.Tensor], layout, rank: int, coordinator: bool) -> Metadata:
        """Write ``state`` as the save that fixed ``layout`` (a ``save_plan.SaveLayout`` that
        :meth:`~save_plan.SaveLayout.matches` it) wrote it: this rank's tensors at the same offsets of
        ``__<rank>_0.distcp``, and on the coordinator the cached ``.metadata`` (this checkpoint's path and save
        id in its ``storage_meta``); then the :func:`hashes_file`. No collective. Returns the metadata.

        Raises:
            RuntimeError: a tensor did not land at its cached offset (the layout does not fit the state).
        """
        self.fs.mkdir(self.path)
        infos = self._write_file(rank, [(name, state[name]) for name, _ in layout.items])
        for (name, cached), info in zip(layout.items, infos, strict=True):
            if (cached.relative_path, cached.offset, cached.length) != (info.relative_path, info.offset, info.length):
                raise RuntimeError(f"{self.path}: {name} written at {info.relative_path}:{info.offset}+{info.length}"
                                   f", the cached layout has it at {cached.relative_path}:{cached.offset}+"
                                   f"{cached.length}")
        metadata = dataclasses.replace(layout.metadata)
        if coordinator:
            storage = metadata.storage_data
            self.finish(metadata, [[WriteResult(index=index, size_in_bytes=info.length, storage_data=info)
                                    for index, info in storage.items()]])
        else:
            self._record_hashes()
        return metadata


def _is_raw(info: _StorageInfo) -> bool:
    return RAW_RECORD in (info.transform_descriptors or ())


class RawRecordReader(FsspecReader):
    """A DCP storage reader (local path or ``s3://``) of :class:`HashingWriter`'s raw records, read by offset
    into tensors of the saved chunk's shape and dtype; other records through torch's reader.

    Raises:
        EOFError: a file ends before a record it holds (names the file, the tensor and the byte range).
    """

    def __init__(self, path: str, **options) -> None:
        super().__init__(path, **options)
        self._tensors: dict = {}

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args, **kwargs) -> None:
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)
        self._tensors = metadata.state_dict_metadata

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future:
        """Read ``plan``'s items: raw records file by file in offset order, the rest through torch's reader."""
        legacy = [req for req in plan.items if not _is_raw(self.storage_data[req.storage_index])]
        if legacy:
            super().read_data(dataclasses.replace(plan, items=legacy), planner).wait()
        per_file: dict[str, list] = {}
        for req in plan.items:
            info = self.storage_data[req.storage_index]
            if _is_raw(info):
                per_file.setdefault(info.relative_path, []).append((info.offset, req))
        for rel, reqs in per_file.items():
            path = self.fs.concat_path(self.path, rel)
            with self.fs.create_stream(path, "rb") as stream:
                for _, req in sorted(reqs, key=lambda pair: pair[0]):
                    self._read_one(stream, path, req, planner)
        future: Future = Future()
        future.set_result(None)
        return future

    def _read_one(self, stream, path, req, planner: LoadPlanner) -> None:
        info = self.storage_data[req.storage_index]
        stream.seek(info.offset)
        if req.type == LoadItemType.BYTE_IO:
            data = stream.read(info.length)
            if len(data) != info.length:
                raise EOFError(_short(path, req.storage_index.fqn, info, len(data)))
            planner.load_bytes(req, io.BytesIO(data))
            return
        chunk = torch.empty(self._chunk_size(req.storage_index), dtype=self._dtype(req.storage_index))
        buffer = _byte_view(chunk)
        if buffer.nbytes != info.length:
            raise ValueError(f"{path}: {req.storage_index.fqn}: the record holds {info.length} bytes, its chunk "
                             f"{tuple(chunk.shape)} {chunk.dtype} needs {buffer.nbytes}")
        got = 0
        while got < info.length:
            n = stream.readinto(buffer[got:])
            if not n:
                raise EOFError(_short(path, req.storage_index.fqn, info, got))
            got += n
        for dim, (start, length) in enumerate(zip(req.storage_offsets, req.lengths, strict=True)):
            chunk = chunk.narrow(dim, start, length)
        target = planner.resolve_tensor(req).detach()
        if target.shape != chunk.shape:
            raise ValueError(f"{path}: {req.storage_index.fqn}: read {tuple(chunk.shape)}, the target is "
                             f"{tuple(target.shape)}")
        target.copy_(chunk)
        planner.commit_tensor(req, target)

    def _meta(self, index: MetadataIndex) -> TensorStorageMetadata:
        return self._tensors[index.fqn]

    def _dtype(self, index: MetadataIndex) -> torch.dtype:
        return self._meta(index).properties.dtype

    def _chunk_size(self, index: MetadataIndex) -> torch.Size:
        chunks = self._meta(index).chunks
        if index.index is not None and index.index < len(chunks) and chunks[index.index].offsets == index.offset:
            return chunks[index.index].sizes
        return next(c.sizes for c in chunks if c.offsets == index.offset)


def _short(path, fqn: str, info: _StorageInfo, got: int) -> str:
    return (f"{path}: truncated: {fqn} is stored at bytes {info.offset}-{info.offset + info.length}, "
            f"the file ends after {info.offset + got}")


def save(state: dict[str, torch.Tensor], storage_writer: HashingWriter, planner=None, process_group=None,
         no_dist: bool = False) -> Metadata:
    """``torch.distributed.checkpoint.save`` of a state dict of tensors (collective over ``process_group`` unless
    ``no_dist`` or no process group is initialised), without DCP's per-key ``Stateful`` wrapper (a logged call for
    each key).

    With a :class:`~v4train.orchestrator.checkpoint.save_plan.CachedSavePlanner`, a save group's first save is
    DCP's (plan, de-duplication, write, ``.metadata``) and fixes the group's layout (``save_plan.py``); a later
    save whose state has the same names, shapes and dtypes on every rank (one all-reduce of one integer decides)
    writes each rank's file from that layout and the coordinator writes the cached metadata, with no other
    collective; otherwise every rank takes DCP's path again and the layout is re-cached.

    Returns:
        DCP's global metadata of the checkpoint.
    Raises:
        TypeError: a value is a ``Stateful`` object (``dcp.save`` takes those).
    """
    # a tensor is never Stateful; the Protocol's isinstance (inspect.getattr_static) costs ~0.1 ms a key
    stateful = [key for key, value in state.items()
                if not isinstance(value, torch.Tensor) and isinstance(value, Stateful)]
    if stateful:
        raise TypeError(f"checkpoint save: {stateful[0]} is a Stateful object; pass tensors (or use dcp.save)")
    distributed = not no_dist and dist.is_initialized()
    generation = getattr(planner, "generation", None) if distributed else None
    layout = save_plan.layout_of(generation) if generation is not None else None
    if layout is not None:
        differs = torch.tensor([0 if layout.matches(state) else 1])
        dist.all_reduce(differs, op=dist.ReduceOp.MAX, group=process_group)
        if not differs.item():
            rank = dist.get_rank(process_group)
            return storage_writer.write_cached(state, layout, rank, coordinator=rank == 0)
        save_plan.forget(generation)
    metadata = _save_state_dict(state_dict=state, storage_writer=storage_writer, process_group=process_group,
                                no_dist=not distributed, planner=planner)
    if generation is not None:
        save_plan.remember(generation, state, storage_writer.written, metadata)
    return metadata
