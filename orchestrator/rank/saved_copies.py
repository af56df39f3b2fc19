"""A rank's own copies of the state it wrote into its latest checkpoint saves, for a restore without storage.

When a rank saves its shards into a checkpoint attempt it also keeps, in host memory, a copy of the exact
tensors it wrote (model and optimizer state by global name, tensor-parallel shards whole). After a peer
fails, the checkpoint to restore is the newest committed one, usually the last or the one before the last
save; a surviving rank (its process kept by the supervisor) that holds the copy of the attempt that was
committed loads from memory, bit for bit what is on storage, instead of reading and deserialising its
shards again. Only a copy of the very attempt that was committed is used: the checkpoint's
``train_state.json`` names it (``attempt``), and the copy is keyed by the checkpoint root, that attempt and the rank.
A rank without the copy (a replacement process, or another layout) reads storage.

The copies live in the rank's process (``RankWorker``), not in its trainer: a survivor's trainer is
rebuilt when it sets up again.

A copy is one host buffer holding every tensor in the state's order (each aligned to its element size), with
each tensor a view into it: the rank's shard file holds the same tensors in the same order, so its writer
passes long runs of adjacent tensors to the file and to sha256 as single calls
(``dcp_storage.HashingWriter``), which release the GIL for their whole length. Once ``keep`` copies are held, a
new save takes the oldest copy's buffer (dropped from the store first, so nothing can restore from it any more)
when its tensors have the same names, shapes and dtypes: a save then writes into memory already mapped instead
of faulting in fresh pages.
"""

from __future__ import annotations

import collections

import torch

from v4train.orchestrator.checkpoint.save_plan import signature

__all__ = ["SavedCopies", "host_copy"]


def host_copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A copy of ``state`` in one new host buffer: every tensor (same shape and dtype, contiguous) a view into
    it, in ``state``'s order, at the next offset aligned to its element size."""
    offsets, total = [], 0
    for value in state.values():
        size = value.element_size()
        total = -(-total // size) * size
        offsets.append(total)
        total += value.numel() * size
    buffer = torch.empty(total, dtype=torch.uint8)
    copy = {}
    for (key, value), offset in zip(state.items(), offsets, strict=True):
        nbytes = value.numel() * value.element_size()
        view = buffer[offset:offset + nbytes].view(value.dtype).view(value.shape)
        view.copy_(value.detach())  # from any device: a GPU rank's copy must not take device memory
        copy[key] = view
    return copy


class SavedCopies:
    """The ``keep`` newest saves' state copies of this rank process, by (checkpoint root, attempt, rank).

    Two by default: the newest save may be in flight or abandoned when a peer fails, while the one before
    it is committed.
    """

    def __init__(self, keep: int = 2) -> None:
        self.copies: collections.OrderedDict[tuple, dict[str, torch.Tensor]] = collections.OrderedDict()
        self.keep = keep

    def put(self, root: str, attempt: str, rank: int, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Copy ``state`` (tensors by global name) that ``rank`` writes into ``attempt`` under ``root``; returns
        the copy (read-only from then on: it is what gets written, and what a restore loads).

        With ``keep`` copies held, the oldest is dropped first; its tensors receive ``state`` in place when
        :func:`~v4train.orchestrator.checkpoint.save_plan.signature` of both agrees. The caller must not be
        writing that oldest copy any more (the rank waits for its pending save before the next one).
        """
        oldest = None
        while self.copies and len(self.copies) >= self.keep:
            _, oldest = self.copies.popitem(last=False)
        if oldest is not None and signature(oldest) == signature(state):
            copy = oldest
            for key, value in state.items():
                copy[key].copy_(value.detach())
        else:
            oldest = None  # freed before the new buffer is allocated: a rank never holds keep + 1 copies
            copy = host_copy(state)
        self.copies[(root, attempt, rank)] = copy
        while len(self.copies) > self.keep:
            self.copies.popitem(last=False)
        return copy

    def get(self, root: str, attempt: str | None, rank: int) -> dict[str, torch.Tensor] | None:
        """The copy ``rank`` wrote into ``attempt`` under ``root``, or None."""
        return self.copies.get((root, attempt, rank)) if attempt else None

    def clear(self) -> None:
        self.copies.clear()
