"""Every tensor of a committed checkpoint step, read whole through v4train's reader (raw records and torch.save
records alike; torch's own DCP reader refuses the raw records' mark)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

from v4train.orchestrator.checkpoint.dcp_storage import RawRecordReader


def checkpoint_tensors(step_dir: str | Path) -> dict[str, torch.Tensor]:
    """``{global name: tensor}`` of the step directory ``step_dir``, as ``dcp_to_torch_save`` would give them."""
    state: dict = {}
    _load_state_dict(state, storage_reader=RawRecordReader(str(step_dir)), planner=_EmptyStateDictLoadPlanner(),
                     no_dist=True)
    return state
