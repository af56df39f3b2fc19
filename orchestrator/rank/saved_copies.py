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
"""

from __future__ import annotations

import collections

import torch

__all__ = ["SavedCopies"]


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
        the copy (read-only from then on: it is what gets written, and what a restore loads)."""
        # in host memory: a GPU rank's copy must not take device memory
        copy = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
        self.copies[(root, attempt, rank)] = copy
        while len(self.copies) > self.keep:
            self.copies.popitem(last=False)
        return copy

    def get(self, root: str, attempt: str | None, rank: int) -> dict[str, torch.Tensor] | None:
        """The copy ``rank`` wrote into ``attempt`` under ``root``, or None."""
        return self.copies.get((root, attempt, rank)) if attempt else None

    def clear(self) -> None:
        self.copies.clear()
