"""The save layout cache: what a save group's first DCP save decided, reused by its later saves without DCP.

A DCP save gathers every rank's local plan on the coordinator, de-duplicates replicated keys, builds the global
metadata, scatters the final plans back, and gathers the write results for ``.metadata``: four collectives of
pickled per-key objects on every save, though a training job's state keeps the same names, shapes and dtypes
from one save to the next. With raw records (``dcp_storage.py``) a rank's file is its items' bytes one after
another, so the same items in the same order land at the same offsets and ``.metadata`` comes out the same
(only its ``storage_meta``, the checkpoint's path and save id, differs). After one full DCP save a rank keeps
its :class:`SaveLayout`: the signature (name, shape, dtype of every value) of the state it saved, the items it
wrote in file order with their offsets, and the global metadata DCP returned on every rank. A later save of
the same signature on every rank writes the same file from the layout and the coordinator writes the cached
metadata (``dcp_storage.save``); the one collective left is a one-integer all-reduce of "my state differs",
so a change on any rank sends every rank through DCP's full path together (and re-caches the layout).

Scope, a **generation**: a fresh token per save group (:func:`new_generation`, taken whenever a save group is
created; :func:`forget` drops its layout when the group is left), so a group formed anew after a recovery or in
another world starts uncached and its first save is a full DCP save on every rank (a kept rank never reuses
what a replacement rank does not have).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import torch
from torch.distributed.checkpoint import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import WriteItem, WriteItemType

__all__ = ["CachedSavePlanner", "SaveLayout", "new_generation", "forget", "layout_of", "remember", "signature"]

_LAYOUTS: dict[str, SaveLayout] = {}  # generation -> this process's layout of that save group


def new_generation() -> str:
    """A fresh cache generation for a new save group (a token no other group of any process shares)."""
    return uuid.uuid4().hex


def forget(generation: str) -> None:
    """Drop this process's layout of ``generation`` (its group is being left, or its state changed)."""
    _LAYOUTS.pop(generation, None)


def signature(state: dict) -> tuple:
    """``((name, shape, dtype), ...)`` of a state dict in its order; a non-tensor value by its type."""
    return tuple((key, tuple(value.shape), value.dtype) if isinstance(value, torch.Tensor) else (key, type(value))
                 for key, value in state.items())


@dataclass(frozen=True)
class SaveLayout:
    """What one rank's full DCP save of a save group fixed, for the group's later saves.

    Attributes:
        signature: :func:`signature` of the state saved.
        items: ``(name, _StorageInfo)`` of every tensor this rank wrote, in file order (each a whole tensor:
            its raw bytes at ``offset``, ``length`` bytes, in ``relative_path``); None when the plan held an
            item that is not a whole tensor (a chunk of a sharded one, a non-tensor value), so the layout
            cannot be replayed and every save of the group takes DCP's path.
        metadata: DCP's global metadata of that save (the same on every rank).
    """

    signature: tuple
    items: tuple[tuple[str, _StorageInfo], ...] | None
    metadata: Metadata

    def matches(self, state: dict) -> bool:
        """Whether ``state`` can be written from this layout (the same names, shapes, dtypes, in order)."""
        return self.items is not None and signature(state) == self.signature


def remember(generation: str, state: dict, written: list[tuple[WriteItem, _StorageInfo]], metadata: Metadata) -> None:
    """Keep the layout of a full DCP save of ``state`` on ``generation``'s group: the items this rank wrote (in
    file order, ``written``) and the global ``metadata`` DCP returned."""
    items = []
    for item, info in written:
        value = state.get(item.index.fqn)
        whole = (item.type == WriteItemType.TENSOR and isinstance(value, torch.Tensor)
                 and item.tensor_data is not None and tuple(item.tensor_data.chunk.sizes) == tuple(value.shape)
                 and not any(item.tensor_data.chunk.offsets))
        if not whole:
            items = None
            break
        items.append((item.index.fqn, info))
    _LAYOUTS[generation] = SaveLayout(signature(state), tuple(items) if items is not None else None, metadata)


def layout_of(generation: str) -> SaveLayout | None:
    """This process's layout of ``generation``'s save group, or None before its first full save."""
    return _LAYOUTS.get(generation)


class CachedSavePlanner(DefaultSavePlanner):
    """DCP's default save planner, naming the save group whose :class:`SaveLayout` ``dcp_storage.save`` reuses.

    Args:
        generation: the save group's token (:func:`new_generation`): the same for every save on one group,
            new when the group is re-created (any recovery or change of world).
    """

    def __init__(self, generation: str) -> None:
        super().__init__()
        self.generation = generation
