"""DCP shards as one safetensors record per rank: torch's writer option, and the fsspec reader torch lacks.

torch DCP's storage writers take ``serialization_format=SerializationFormat.SAFETENSORS``: a rank's tensors
then go into its shard file as ONE safetensors blob (a JSON header naming every tensor's dtype, shape and
byte range, then the tensors back to back), where the default format writes one ``torch.save`` zip record
per tensor (a pickler and a zip directory for each of a rank's hundreds of small tensors). DCP's
``.metadata`` still describes every tensor, so planning, resharding and ``inspect`` are unchanged.

The workaround, for torch 2.13: no DCP reader reads that format back from fsspec storage.
``FsspecReader``/``FileSystemReader`` ``torch.load`` every item, and ``HuggingFaceStorageReader`` opens local
paths only and rebuilds its metadata from the safetensors headers instead of reading ``.metadata``.
:class:`ShardReader` is torch's ``FsspecReader`` (local paths and ``s3://``) with ``read_data`` reading
both encodings: a safetensors record, located by the offset DCP records for each of its tensors (the
blob's start: the writer records where the blob begins and each tensor's byte count, not its position in
the blob), and a ``torch.save`` record (format-1 checkpoints, converted checkpoints), handed to torch's own
``read_data``. ``tests/orchestrator/test_dcp_safetensors.py`` fails when torch changes either behaviour.
Sources: DCP ``filesystem.py`` (``_write_item``, ``_write_files_from_queue``); the safetensors format
(https://github.com/huggingface/safetensors, "Format": 8-byte little-endian header size, JSON header,
``data_offsets`` relative to the end of the header).
"""

from __future__ import annotations

import io
import json
import math
import struct

import torch
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader
from torch.distributed.checkpoint.filesystem import SerializationFormat
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

__all__ = ["SERIALIZATION", "ShardReader"]

# How the ranks' writers serialise tensors (storage.py, hashed_writer.py).
SERIALIZATION = SerializationFormat.SAFETENSORS
_ZIP_MAGIC = b"PK\x03\x04"  # the first bytes of a torch.save record (a zip archive)


class ShardReader(FsspecReader):
    """torch DCP's fsspec storage reader, reading shards written as safetensors records or ``torch.save``
    records (module docstring).

    Args:
        path: the checkpoint directory (URL or local path).
        **options: fsspec options (S3 ``client_kwargs``).

    Raises ValueError (which ``dcp.load`` wraps in its CheckpointException) naming the shard file and
    tensor when a safetensors record lacks a tensor DCP's metadata places in it, or holds a different number
    of bytes for it.
    """

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args, **kwargs) -> None:
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)
        self._dtypes = {fqn: meta.properties.dtype for fqn, meta in metadata.state_dict_metadata.items()
                        if hasattr(meta, "properties")}

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Read ``plan``'s items: each shard file opened once, its items in file order."""
        per_file: dict[str, list[ReadItem]] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        torch_save: list[ReadItem] = []
        for relative_path, items in per_file.items():
            items.sort(key=lambda i: self.storage_data[i.storage_index].offset)
            with self.fs.create_stream(self.fs.concat_path(self.path, relative_path), "rb") as stream:
                tensors = [i for i in items if i.type != LoadItemType.BYTE_IO]
                if tensors and self._is_zip(stream, tensors[0]):
                    torch_save += items
                    continue
                self._read_file(stream, relative_path, items, planner)
        if torch_save:
            return super().read_data(LoadPlan(torch_save), planner)
        future: Future = Future()
        future.set_result(None)
        return future

    def _is_zip(self, stream, item: ReadItem) -> bool:
        stream.seek(self.storage_data[item.storage_index].offset)
        return stream.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC

    def _read_file(self, stream, relative_path: str, items: list[ReadItem], planner: LoadPlanner) -> None:
        headers: dict[int, tuple[int, dict]] = {}  # blob offset -> (offset of its data, header)
        for item in items:
            info = self.storage_data[item.storage_index]
            stream.seek(info.offset)
            if item.type == LoadItemType.BYTE_IO:
                planner.load_bytes(item, io.BytesIO(stream.read(info.length)))
                continue
            if info.offset not in headers:
                (size,) = struct.unpack("<Q", stream.read(8))
                headers[info.offset] = (info.offset + 8 + size, json.loads(stream.read(size)))
            data_start, header = headers[info.offset]
            tensor = self._tensor(stream, relative_path, item.storage_index.fqn, data_start, header)
            saved = tensor[tuple(slice(o, o + n) for o, n in zip(item.storage_offsets, item.lengths))]
            target = planner.resolve_tensor(item).detach()
            if target.size() != saved.size():
                raise ValueError(f"{relative_path}: {item.storage_index.fqn} holds {tuple(saved.shape)}, "
                                 f"the load plan expects {tuple(target.shape)}")
            target.copy_(saved)
            planner.commit_tensor(item, target)

    def _tensor(self, stream, relative_path: str, fqn: str, data_start: int, header: dict) -> torch.Tensor:
        entry = header.get(fqn)
        if entry is None:
            raise ValueError(f"{relative_path}: its safetensors record lacks {fqn}")
        begin, end = entry["data_offsets"]
        dtype, shape = self._dtypes[fqn], entry["shape"]
        if math.prod(shape) * dtype.itemsize != end - begin:
            raise ValueError(f"{relative_path}: {fqn} holds {end - begin} bytes, not {shape} of {dtype}")
        if begin == end:
            return torch.empty(shape, dtype=dtype)
        stream.seek(data_start + begin)
        return torch.frombuffer(bytearray(stream.read(end - begin)), dtype=dtype).reshape(shape)
