"""``model.init_from: ROOT``: start a job from the model weights of a committed checkpoint.

The checkpoint is usually one ``v4train convert from-hf`` wrote (model only), but any committed
checkpoint works: only its ``model.<fqn>`` tensors are read. The job gets a fresh optimizer, a fresh
data cursor and its schedule from step 0, on any (TP, PP, EP, DP) layout (tensor-parallel shards are
sliced from the whole tensors, as :func:`orchestrator.checkpoint.load_shards` does).

The job's model must compute what the checkpoint holds: :func:`check_model` compares every
architecture field (``model/hf_mapping.py``, :func:`architecture_mismatch`) and refuses the job before
any rank starts, naming the field.
"""

from __future__ import annotations

import torch
import torch.distributed.checkpoint as dcp

from v4train.model.config import ModelConfig
from v4train.model.hf_mapping import architecture_mismatch
from v4train.orchestrator import checkpoint
from v4train.orchestrator.checkpoint.storage import Storage
from v4train.parallel.tensor_parallel import TensorParallel, full_shape, is_sharded, shard_of

__all__ = ["resolve", "checkpoint_config", "check_model", "load_model"]


def resolve(root: str) -> tuple[Storage, str]:
    """``(storage, newest committed step directory)`` of ``root``; CheckpointError when there is none."""
    storage = Storage(root)
    name = checkpoint.latest_committed(storage)
    if name is None:
        raise checkpoint.CheckpointError(f"model.init_from: {storage.url} holds no committed checkpoint")
    return storage, name


def checkpoint_config(storage: Storage, name: str, vocab_size: int | None = None) -> ModelConfig:
    """The ModelConfig a committed checkpoint was written for (a converted one records every field; a
    training one its job's model section, built with ``vocab_size``)."""
    model = checkpoint.read_train_state(storage, name)["model"]
    if "preset" in model:
        from v4train.orchestrator.spec import ModelSpec

        return ModelSpec(**model).build(vocab_size=vocab_size)
    return ModelConfig.from_dict(model)


def check_model(root: str, cfg: ModelConfig) -> None:
    """Raise ValueError naming ``model.<field>`` when the job's ``cfg`` differs from the checkpoint's."""
    storage, name = resolve(root)
    saved = checkpoint_config(storage, name, cfg.vocab_size)
    field = architecture_mismatch(cfg, saved)
    if field is not None:
        raise ValueError(f"model.{field}: the job has {getattr(cfg, field)!r}, model.init_from {storage.url_of(name)} "
                         f"was written for {getattr(saved, field)!r}")


def load_model(root: str, stage: torch.nn.Module, tp: TensorParallel | None = None) -> str:
    """Load this rank's model tensors from the newest committed checkpoint of ``root``; returns its URL.

    Raises CheckpointError naming the first tensor the checkpoint lacks or holds in another shape,
    before any parameter changes.
    """
    tp = tp or TensorParallel()
    storage, name = resolve(root)
    reader = storage.dcp_reader(name)
    saved = reader.read_metadata().state_dict_metadata
    params = dict(stage.named_parameters())
    live = {f"model.{k}": (params.get(k), v) for k, v in stage.state_dict().items() if isinstance(v, torch.Tensor)}
    want = {}
    for key, (param, value) in live.items():
        sharded = param is not None and is_sharded(param)
        want[key] = torch.empty(full_shape(param, tp), dtype=value.dtype) if sharded else value
        if key not in saved:
            raise checkpoint.CheckpointError(f"{storage.url_of(name)}: lacks {key}")
        if tuple(saved[key].size) != tuple(want[key].shape):
            raise checkpoint.CheckpointError(f"{storage.url_of(name)}: {key} has shape {tuple(saved[key].size)}, "
                                             f"this model expects {tuple(want[key].shape)}")
    dcp.load(want, storage_reader=reader, no_dist=True)
    with torch.no_grad():
        for key, (param, value) in live.items():
            if want[key] is not value:
                value.copy_(shard_of(want[key], param, tp))
    return storage.url_of(name)
