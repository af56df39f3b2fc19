"""parallel.distributed_adamw: 4 gloo ranks (dense parameters over all 4, experts over pairs) against torch
AdamW on every parameter: bit-identical parameters after 3 steps, each parameter's moments on exactly one rank
of its group, the gathered state equal to AdamW's, and a plain AdamW state resumed in the distributed one."""

from __future__ import annotations

import copy
import datetime
import faulthandler

import pytest
import torch
import torch.distributed as dist

from support.spawn import free_ports, spawn_ranks
from v4train.parallel.distributed_adamw import DistributedAdamW
from v4train.parallel.optim import global_state

RANK_HANG_S = 240
POOL_DEADLINE_S = 480
SETTINGS = dict(lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
DENSE = [(24, 40), (40,), (7, 3), (24, 40), (128,), (5,)]
EXPERT = [(12, 20), (12, 20), (20, 12)]


def _params(seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in DENSE + EXPERT]


def _grads(step, expert_group_index):
    """The (already all-reduced) gradients of a step: the same on every rank of a group."""
    gen = torch.Generator().manual_seed(100 + step)
    dense = [torch.randn(s, generator=gen) for s in DENSE]
    gen = torch.Generator().manual_seed(200 + 10 * step + expert_group_index)
    return dense + [torch.randn(s, generator=gen) for s in EXPERT]


def _rank(rank: int, port: int, world: int, out_dir: str) -> None:
    faulthandler.dump_traceback_later(RANK_HANG_S, exit=True)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        expert_group = pairs[rank // 2]
        plain, mine = _params(0), _params(0)
        n = len(DENSE)
        reference = torch.optim.AdamW([{"params": plain[:3]}, {"params": plain[3:], "weight_decay": 0.0}], **SETTINGS)
        distributed = DistributedAdamW([{"params": mine[:3]}, {"params": mine[3:], "weight_decay": 0.0}], **SETTINGS,
                                       shard_groups=[(None if world == 1 else dist.group.WORLD, mine[:n]),
                                                     (expert_group, mine[n:])])
        for step in range(3):
            for opt, ps in ((reference, plain), (distributed, mine)):
                for p, g in zip(ps, _grads(step, rank // 2), strict=True):
                    p.grad = g.clone()
                opt.step()
        owned = [distributed.owns(p) for p in mine]
        held = [p in distributed.state for p in mine]
        plain_state = [{k: v.clone() for k, v in reference.state[p].items()} for p in plain]
        with global_state(distributed):
            gathered = [{k: v.clone() for k, v in distributed.state[p].items()} for p in mine]
        after = [p in distributed.state for p in mine]
        params = [p.detach().clone() for p in mine]
        # resume: the plain optimizer's state loaded into a fresh distributed one, then one more step each
        fresh = [torch.nn.Parameter(p.detach().clone()) for p in plain]
        resumed = DistributedAdamW([{"params": fresh[:3]}, {"params": fresh[3:], "weight_decay": 0.0}], **SETTINGS,
                                   shard_groups=[(dist.group.WORLD, fresh[:n]), (expert_group, fresh[n:])])
        with global_state(resumed):  # a copy: torch's load keeps the saved step tensors, which AdamW bumps in place
            resumed.load_state_dict(copy.deepcopy(reference.state_dict()))
        for opt, ps in ((reference, plain), (resumed, fresh)):
            for p, g in zip(ps, _grads(3, rank // 2), strict=True):
                p.grad = g.clone()
            opt.step()
        torch.save({"params": params, "plain_params": [p.detach() for p in plain], "plain_state": plain_state,
                    "resumed": [p.detach() for p in fresh], "gathered": gathered, "owned": owned, "held": held,
                    "after": after}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
        faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed_adamw")
    spawn_ranks(_rank, (free_ports(1)[0], 4, str(out)), 4, POOL_DEADLINE_S, "distributed AdamW ranks")
    return [torch.load(out / f"rank{r}.pt") for r in range(4)]


def test_distributed_adamw_equals_adamw_bitwise(four_ranks):
    n = len(DENSE)
    for rank, res in enumerate(four_ranks):
        # a step before the resume: every parameter bit-identical to AdamW's (the owner's arithmetic is AdamW's,
        # the others receive its values); after the resume step as well
        stepped = [torch.equal(a, b) for a, b in zip(res["params"], res["plain_params"], strict=True)]
        assert not all(stepped)  # plain_params moved one step further
        for got, want in zip(res["resumed"], res["plain_params"], strict=True):
            assert torch.equal(got, want), rank
        for got, want in zip(res["gathered"], res["plain_state"], strict=True):
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), rank
        assert res["held"] == res["owned"] == res["after"], rank  # moments only with the owner
    # each dense parameter owned by exactly one of the 4 ranks, each expert by one rank of its pair
    for i in range(n):
        assert sum(res["owned"][i] for res in four_ranks) == 1, i
    for i in range(n, n + len(EXPERT)):
        for pair in ((0, 1), (2, 3)):
            assert sum(four_ranks[r]["owned"][i] for r in pair) == 1, (i, pair)
    # the state is split: no rank holds more than half the dense elements
    for res in four_ranks:
        mine = sum(torch.Size(s).numel() for s, o in zip(DENSE, res["owned"], strict=False) if o)
        assert 0 < mine <= sum(torch.Size(s).numel() for s in DENSE) / 2


def test_distributed_adamw_refuses_bad_coverage():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(ValueError, match="in no shard_groups"):
        DistributedAdamW([a, b], shard_groups=[(None, [a])])
    with pytest.raises(ValueError, match="in two shard_groups"):
        DistributedAdamW([a, b], shard_groups=[(None, [a, b]), (None, [a])])
