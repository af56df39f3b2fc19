"""Tensors made for a collective live where the group's backend communicates from (NCCL: the GPU).

No GPU here: the device rule is checked with a patched backend, and the optimizers' exchange buffers
with parameters on the ``meta`` device and a recording stand-in for the collective.
"""

import torch
import torch.distributed as dist

from v4train.parallel import groups
from v4train.parallel.ownership import FlatShard


def test_collective_device_is_the_ranks_gpu_under_nccl_and_the_cpu_under_gloo(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    assert groups.collective_device() == torch.device("cuda", 3)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    assert groups.collective_device() == torch.device("cpu")


def test_all_reduce_on_runs_the_collective_on_the_given_device(monkeypatch):
    seen = []

    def fake_all_reduce(t, op=None, group=None):
        seen.append((t.device, op))
        t.mul_(2)   # as a SUM over two equal ranks

    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    steps = torch.tensor([3.0, 5.0])
    got = groups.all_reduce_on(steps, torch.device("cpu"), None, dist.ReduceOp.MAX)
    assert seen == [(torch.device("cpu"), dist.ReduceOp.MAX)]
    assert got.device == steps.device and torch.equal(got, torch.tensor([6.0, 10.0]))


def test_flat_shard_buffers_are_on_the_parameters_device(monkeypatch):
    """The distributed optimizer's flat buffers, which enter reduce_scatter_tensor and all_gather, are made on the
    parameters' device."""
    params = [torch.empty(4, 3, device="meta"), torch.empty(5, device="meta")]
    seen = []
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "reduce_scatter_tensor",
                        lambda out, t, group=None: seen.append(("reduce_scatter", out.device, t.device)))
    monkeypatch.setattr(dist, "all_gather",
                        lambda out, t, group=None: seen.append(("all_gather", t.device, *[o.device for o in out])))
    shard = FlatShard(params, object())
    shard.reduce_scatter([torch.empty_like(p) for p in params], 2)
    shard.all_gather(params)
    meta = torch.device("meta")
    assert seen == [("reduce_scatter", meta, meta), ("all_gather", meta, meta, meta)]
