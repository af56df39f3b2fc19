"""Rank side of a checkpoint: this rank's tensors by global name through torch DCP, RNG state, and the
anticipatory-routing rows' JSON codec.

Keys are global names (``model.<fqn>``, ``optim.<fqn>.<state>``), independent of the layout that wrote them;
tensor-parallel shards are gathered into whole tensors on save and sliced on load, so a checkpoint of any
(TP, CP, PP, EP, DP) layout loads into any other (``docs/checkpoint-format.md``).
"""

from __future__ import annotations

import base64

import torch
import torch.distributed.checkpoint as dcp

from v4train.orchestrator.checkpoint import dcp_storage
from v4train.orchestrator.checkpoint.commit import CheckpointError
from v4train.orchestrator.checkpoint.storage import Storage
from v4train.parallel.optim import global_state, initial_state
from v4train.parallel.tensor_parallel import TensorParallel, full_shape, gather_full, is_sharded, shard_of

__all__ = ["shard_state", "save_shards", "load_shards", "load_state", "rng_state", "set_rng_state", "encode_rows",
           "decode_rows", "merge_routing"]


def _optimizer_state(stage: torch.nn.Module, optimizer) -> dict:
    """Optimizer state keyed ``optim.<param fqn>.<name>`` (AdamW: step, exp_avg, exp_avg_sq; Muon: step,
    momentum_buffer).

    A parameter the optimizer has not stepped yet (no gradient so far, e.g. the Lightning Indexer before
    its warm-up) gets its optimizer's initial state (:func:`parallel.optim.initial_state`): exactly what
    the optimizer would create lazily at its first gradient, so saving it changes nothing and every
    checkpoint holds state for every parameter.
    """
    out = {}
    for fqn, param in stage.named_parameters():
        state = optimizer.state.get(param)
        if not state:
            state = initial_state(optimizer, param)
            optimizer.state[param] = state
        for name, value in state.items():
            out[f"optim.{fqn}.{name}"] = value
    return out


def _entries(stage: torch.nn.Module,
             optimizer: torch.optim.Optimizer) -> list[tuple[str, torch.Tensor | None, torch.Tensor]]:
    """``(global key, the parameter whose TP sharding the tensor shares or None, the live tensor)`` for
    every model and optimizer tensor of this rank, in the same order on every rank of a stage."""
    params = dict(stage.named_parameters())
    # tensors only: Megatron's TP layers add an ``_extra_state`` entry that is None (a TE hook)
    out = [(f"model.{k}", params.get(k), v) for k, v in stage.state_dict().items() if isinstance(v, torch.Tensor)]
    for key, value in _optimizer_state(stage, optimizer).items():
        param = params[key.removeprefix("optim.").rsplit(".", 1)[0]]  # optim.<fqn>.<state name>
        out.append((key, param if value.shape == param.shape else None, value))
    return out


def shard_state(stage: torch.nn.Module, optimizer: torch.optim.Optimizer,
                tp: TensorParallel | None = None) -> dict[str, torch.Tensor]:
    """This rank's tensors for a checkpoint: model state and optimizer state by global name.

    Tensor-parallel shards are gathered into whole tensors (a collective over the TP group, same order
    on every rank), so the checkpoint holds one layout-free copy (DCP writes a key held by several ranks
    once) and any TP size can load it.
    """
    tp = tp or TensorParallel()
    # a distributed optimizer's state is gathered whole for the save and left with its owners after
    with global_state(optimizer):
        return {key: gather_full(value, param, tp) if param is not None else value
                for key, param, value in _entries(stage, optimizer)}


def save_shards(storage: Storage, rel: str, stage: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Write this rank's model and optimizer state into the DCP checkpoint at ``rel`` (collective)."""
    dcp_storage.save(shard_state(stage, optimizer), storage_writer=storage.dcp_writer(rel))


def load_shards(storage: Storage, rel: str, stage: torch.nn.Module, optimizer: torch.optim.Optimizer,
                tp: TensorParallel | None = None) -> None:
    """Load model and optimizer state for this rank's stage from ``rel`` (collective).

    Whole tensors are read and this rank's tensor-parallel slice kept, so a checkpoint of any (TP, PP, EP,
    DP) layout loads into any other. Raises CheckpointError naming the first tensors the checkpoint
    lacks or whose shape differs, before anything is modified.
    """
    tp = tp or TensorParallel()
    reader = storage.dcp_reader(rel)
    saved = reader.read_metadata().state_dict_metadata
    # a distributed optimizer loads every parameter's whole state, then keeps the part this rank owns
    with global_state(optimizer):
        _load_entries(storage, rel, reader, saved, _entries(stage, optimizer), tp)


def load_state(state: dict[str, torch.Tensor], where: str, stage: torch.nn.Module,
               optimizer: torch.optim.Optimizer, tp: TensorParallel | None = None) -> None:
    """Load model and optimizer state from ``state`` (tensors by global name, TP shards whole: what
    :func:`shard_state` returned when ``where`` was saved) into this rank's stage; local, no collective.

    Raises CheckpointError naming the first tensors ``state`` lacks or whose shape differs, before anything
    is modified.
    """
    tp = tp or TensorParallel()
    with global_state(optimizer):
        entries = _entries(stage, optimizer)
        shapes = {key: full_shape(param, tp) if param is not None and is_sharded(param) else value.shape
                  for key, param, value in entries}
        missing = sorted(k for k in shapes if k not in state)
        if missing:
            raise CheckpointError(f"{where}: the in-memory copy lacks {', '.join(missing[:3])}")
        for key, shape in shapes.items():
            if tuple(state[key].shape) != tuple(shape):
                raise CheckpointError(f"{where}: {key} has shape {tuple(state[key].shape)} in the in-memory copy, "
                                      f"this model expects {tuple(shape)}")
        with torch.no_grad():
            for key, param, value in entries:
                sharded = param is not None and is_sharded(param)
                value.copy_(shard_of(state[key], param, tp) if sharded else state[key])


def _load_entries(storage: Storage, rel: str, reader, saved: dict, entries: list, tp: TensorParallel) -> None:
    # replicated tensors load in place; a TP shard loads its whole tensor, then keeps its slice
    sharded = [(key, param, value) for key, param, value in entries if param is not None and is_sharded(param)]
    expected = {key: value for key, _, value in entries}
    expected.update({key: torch.empty(full_shape(param, tp), dtype=value.dtype) for key, param, value in sharded})
    missing = sorted(k for k in expected if k not in saved)
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise CheckpointError(f"{storage.url_of(rel)}: checkpoint lacks {', '.join(missing[:3])}{more}")
    for key, tensor in expected.items():
        size = getattr(saved[key], "size", None)
        if size is not None and tuple(size) != tuple(tensor.shape):
            raise CheckpointError(
                f"{storage.url_of(rel)}: {key} has shape {tuple(size)}, this model expects {tuple(tensor.shape)}"
            )
    # each rank reads what it needs on its own: a rank restoring from its in-memory copy (load_state) takes
    # no part, so no collective may be left waiting for it
    dcp.load(expected, storage_reader=reader, no_dist=True)
    with torch.no_grad():
        for key, param, value in sharded:
            value.copy_(shard_of(expected[key], param, tp))


def rng_state() -> str:
    """This process's torch CPU RNG state, base64-encoded for ``train_state.json``."""
    return base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()


def set_rng_state(encoded: str) -> None:
    """Restore a state produced by :func:`rng_state`."""
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(encoded)), dtype=torch.uint8))


def encode_rows(t: torch.Tensor) -> dict:
    """Routed expert indices ``[rows, S, K]`` as JSON for train_state.json: int16 (ids < 32768), base64."""
    return {"shape": list(t.shape), "data": base64.b64encode(t.to(torch.int16).cpu().numpy().tobytes()).decode()}


def decode_rows(blob: dict) -> torch.Tensor:
    """Inverse of :func:`encode_rows` (int64)."""
    raw = torch.frombuffer(bytearray(base64.b64decode(blob["data"])), dtype=torch.int16)
    return raw.reshape(blob["shape"]).to(torch.int64)


def merge_routing(rank_saves: list) -> dict:
    """The global anticipatory-routing tape {step: {layer: rows of the whole global batch}} from each rank's
    slice (``RankSave.routing``: the rows of its data-parallel rank), so that any layout can take its own
    rows back."""
    parts: dict[str, dict[str, dict[int, dict]]] = {}
    for save in rank_saves:
        for step, layers in save.routing.items():
            for layer, blob in layers.items():
                parts.setdefault(step, {}).setdefault(layer, {})[save.dp_rank] = blob
    return {step: {layer: encode_rows(torch.cat([decode_rows(by_dp[d]) for d in sorted(by_dp)]))
                   for layer, by_dp in layers.items()}
            for step, layers in parts.items()}


