"""The torchrun rank group turns a rank's error, DCP's BaseException-derived ones included, into the same
RankFailure on every process (one process here: a gloo world of one)."""

from __future__ import annotations

import pytest
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from v4train.orchestrator.control.rank_group import RankFailure
from v4train.orchestrator.control.torchrun_group import TorchrunRankGroup

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    g = TorchrunRankGroup(0, 1, "unused")
    g.control = dist.group.WORLD
    yield g
    dist.destroy_process_group()


def _missing_shard():
    raise CheckpointException("load", {0: (FileNotFoundError("/ckpt/step_00000002/__0_0.distcp"), None)})


def test_a_dcp_failure_on_a_rank_is_a_rank_failure_not_an_escaping_base_exception(group):
    assert not issubclass(CheckpointException, Exception)  # why the group names it
    with pytest.raises(RankFailure) as info:
        group._all(_missing_shard, "load")
    assert info.value.rank == 0 and "CheckpointException" in str(info.value) and "__0_0.distcp" in str(info.value)
    with pytest.raises(CheckpointException):
        group.coordinate(_missing_shard)  # rank 0's exception re-raised on every rank, not lost in the broadcast
