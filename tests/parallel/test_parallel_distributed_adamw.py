"""parallel.distributed_adamw: 4 gloo ranks (dense parameters over all 4, experts over pairs) against torch
AdamW on the mean gradients: the local gradients are reduce-scattered, each rank keeps the moments of one equal
range of the flat parameters (a parameter bigger than the total / DP straddles ranks), the parameters after 3
steps are bit-identical to AdamW's, the gathered state equals AdamW's, a plain AdamW state resumes in the
distributed one, and the distributed state of DP 4 resumes at DP 2.

The gradients are multiples of 1/64 of magnitude below 4, so every sum of them is exact in fp32 and gloo's
reduce-scatter (whose summation order need not be the all-reduce's) gives the same mean bit for bit."""

from __future__ import annotations

import copy
import datetime
import faulthandler
from unittest import mock

import pytest
import torch
import torch.distributed as dist

from support.spawn import free_ports, spawn_ranks
from v4train.parallel.data_parallel import all_reduce_gradients, reduce_flat_gradients
from v4train.parallel.distributed_adamw import DistributedAdamW
from v4train.parallel.optim import global_state
from v4train.parallel.ownership import FlatShard

RANK_HANG_S = 240
POOL_DEADLINE_S = 480
WORLD = 4
SETTINGS = dict(lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
# the (96, 40) "embedding" holds 3840 of the 4994 dense elements: more than the 1249 of a quarter
DENSE = [(24, 40), (40,), (7, 3), (96, 40), (128,), (5,)]
EXPERT = [(12, 20), (12, 20), (20, 12)]


def _params(seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in DENSE + EXPERT]


def _local_grads(step, rank):
    """Rank ``rank``'s unreduced gradients of a step: multiples of 1/64 in (-4, 4), so sums are exact."""
    gen = torch.Generator().manual_seed(100 * step + rank)
    return [torch.randint(-255, 256, s, generator=gen).float() / 64 for s in DENSE + EXPERT]


def _mean_grads(step, rank):
    """What the reduction gives ``rank``: dense summed over all ranks, experts over its pair, both / WORLD."""
    n = len(DENSE)
    per_rank = [_local_grads(step, r) for r in range(WORLD)]
    pair = (rank // 2 * 2, rank // 2 * 2 + 1)
    dense = [sum(g[i] for g in per_rank) / WORLD for i in range(n)]
    expert = [sum(per_rank[r][i] for r in pair) / WORLD for i in range(n, n + len(EXPERT))]
    return dense + expert


def _groups(params):
    return [{"params": params[:3]}, {"params": params[3:], "weight_decay": 0.0}]


def _rank(rank: int, port: int, world: int, out_dir: str) -> None:
    faulthandler.dump_traceback_later(RANK_HANG_S, exit=True)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        expert_group = pairs[rank // 2]
        plain, mine = _params(0), _params(0)
        n = len(DENSE)
        shard_groups = [(dist.group.WORLD, mine[:n]), (expert_group, mine[n:])]
        reference = torch.optim.AdamW(_groups(plain), **SETTINGS)
        distributed = DistributedAdamW(_groups(mine), **SETTINGS, shard_groups=shard_groups)
        for step in range(3):
            for p, g in zip(plain, _mean_grads(step, rank), strict=True):
                p.grad = g
            for p, g in zip(mine, _local_grads(step, rank), strict=True):
                p.grad = g
            if step == 0:  # unused by every rank in the first step: its gradient stays None, it is not stepped
                plain[2].grad = mine[2].grad = None
            reference.step()
            distributed.reduce_scatter_gradients(WORLD)
            owned_grads = [(i, g.clone()) for i, p in enumerate(mine)
                           for q, g in distributed.owned_gradients() if q is p]
            distributed.step()
        ranges = [distributed.owned_range(p) for p in mine]
        state_numel = sum(v.numel() for s in distributed.state.values() for k, v in s.items() if k != "step")
        plain_state = [{k: v.clone() for k, v in reference.state[p].items()} for p in plain]
        with global_state(distributed):
            gathered = [{k: v.clone() for k, v in distributed.state[p].items()} for p in mine]
            saved = copy.deepcopy(distributed.state_dict())
        after = [distributed.owned_range(p) is not None and p in distributed.state for p in mine]
        params = [p.detach().clone() for p in mine]
        # resume: the plain optimizer's state loaded into a fresh distributed one, then one more step each
        fresh = [torch.nn.Parameter(p.detach().clone()) for p in plain]
        resumed = DistributedAdamW(_groups(fresh), **SETTINGS,
                                   shard_groups=[(dist.group.WORLD, fresh[:n]), (expert_group, fresh[n:])])
        with global_state(resumed):  # a copy: torch's load keeps the saved step tensors, which AdamW bumps in place
            resumed.load_state_dict(copy.deepcopy(reference.state_dict()))
        for p, g in zip(plain, _mean_grads(3, rank), strict=True):
            p.grad = g
        reference.step()
        for p, g in zip(fresh, _local_grads(3, rank), strict=True):
            p.grad = g
        resumed.reduce_scatter_gradients(WORLD)
        resumed.step()
        # another data-parallel size: the state written at DP 4 resumed with the dense parameters over pairs
        # (DP 2) and the experts unsharded; the mean gradients given directly (the reduction is tested above)
        again = [torch.nn.Parameter(p.clone()) for p in params]
        regrouped = DistributedAdamW(_groups(again), **SETTINGS, shard_groups=[(expert_group, again[:n]),
                                                                             (None, again[n:])])
        with global_state(regrouped):
            regrouped.load_state_dict(saved)
        for p, g in zip(again, _mean_grads(3, rank), strict=True):
            p.grad = g
        regrouped.step()
        torch.save({"order_probe": _order_probe(rank), "params": params, "plain_params": [p.detach() for p in plain],
                    "plain_state": plain_state,
                    "resumed": [p.detach() for p in fresh],
                    "regrouped": [p.detach() for p in again], "gathered": gathered, "ranges": ranges,
                    "state_numel": state_numel, "after": after, "owned_grads": owned_grads,
                    "last_mean": _mean_grads(2, rank)}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
        faulthandler.cancel_dump_traceback_later()


def _order_probe(rank):
    """Inexact gradients (magnitudes 1e-3 to 1e3) of the dense parameters reduced three ways over the 4 ranks:
    the flat buffer reduce-scattered (the owned ranges), the same buffer all-reduced, and the bucketed all-reduce
    of the parameters in reverse order (each element at another place of the buffer: another summation order in
    gloo's ring)."""
    gen = torch.Generator().manual_seed(1000 + rank)
    local = [torch.randn(s, generator=gen) * 10.0 ** torch.randint(-3, 4, s, generator=gen) for s in DENSE]
    probe = [torch.nn.Parameter(torch.zeros(s)) for s in DENSE]
    shard = FlatShard(probe, dist.group.WORLD)
    out = {}
    for way in ("scatter", "all_reduce", "buckets"):
        for p, g in zip(probe, local, strict=True):
            p.grad = g.clone()
        if way == "buckets":
            all_reduce_gradients(probe[::-1], dist.group.WORLD)
        else:
            reduce_flat_gradients(shard, WORLD, scatter=way == "scatter")
        out[way] = [p.grad.clone() for p in probe]
    out["pieces"] = [(pc.index, pc.lo, pc.hi) for pc in shard.pieces]
    return out


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed_adamw")
    spawn_ranks(_rank, (free_ports(1)[0], WORLD, str(out)), WORLD, POOL_DEADLINE_S, "distributed AdamW ranks")
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


def test_distributed_adamw_equals_adamw_bitwise(four_ranks):
    for rank, res in enumerate(four_ranks):
        # the reduce-scattered owned ranges are the mean gradients' ranges
        for i, got in res["owned_grads"]:
            lo, hi = res["ranges"][i]
            assert torch.equal(got, res["last_mean"][i].reshape(-1)[lo:hi]), (rank, i)
        # a step before the resume: every parameter bit-identical to AdamW's; after the resume step as well
        assert not all(torch.equal(a, b) for a, b in zip(res["params"], res["plain_params"], strict=True))
        for got, want in zip(res["resumed"], res["plain_params"], strict=True):
            assert torch.equal(got, want), rank
        for got, want in zip(res["regrouped"], res["plain_params"], strict=True):
            assert torch.equal(got, want), rank
        for got, want in zip(res["gathered"], res["plain_state"], strict=True):
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), rank
        assert res["after"] == [r is not None for r in res["ranges"]], rank  # moments only with the owner


def test_the_flat_all_reduce_gives_the_reduce_scatter_bits(four_ranks):
    """The replicated run all-reduces the flat buffer the distributed optimizer reduce-scatters: every owned range
    is bit-identical (gloo sums an element in the same order in both collectives). The bucketed all-reduce with
    the parameters in another order sums in another order: some elements differ in their last bits, which is why
    both runs must reduce the same buffer. Fails when gloo's reduce-scatter stops matching its all-reduce."""
    differs = False
    for res in four_ranks:
        probe = res["order_probe"]
        assert probe["pieces"]
        for i, lo, hi in probe["pieces"]:
            assert torch.equal(probe["scatter"][i].view(-1)[lo:hi], probe["all_reduce"][i].view(-1)[lo:hi])
        for a, b in zip(probe["all_reduce"], probe["buckets"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-3)
            differs |= not torch.equal(a, b)
    assert differs


def test_state_is_split_into_equal_element_ranges(four_ranks):
    n = len(DENSE)
    sizes = [torch.Size(s).numel() for s in DENSE + EXPERT]
    dense_total, expert_total = sum(sizes[:n]), sum(sizes[n:])
    assert max(sizes[:n]) > dense_total / WORLD  # whole-parameter ownership could not split this evenly
    # every element of a group owned by exactly one rank of it
    for i, size in enumerate(sizes):
        ranks = range(WORLD) if i < n else None
        for group in ([range(WORLD)] if ranks else [(0, 1), (2, 3)]):
            covered = sorted(four_ranks[r]["ranges"][i] for r in group if four_ranks[r]["ranges"][i] is not None)
            assert covered[0][0] == 0 and covered[-1][1] == size, (i, covered)
            assert all(a[1] == b[0] for a, b in zip(covered, covered[1:])), (i, covered)
    # two moments per owned element: at most ceil(total / group size) each, so 1/DP of the state per rank
    for res in four_ranks:
        bound = -(-dense_total // WORLD) + -(-expert_total // 2)
        assert res["state_numel"] <= 2 * bound
        assert res["state_numel"] >= 2 * (dense_total // WORLD + expert_total // 2 - 8)


def test_flat_shard_ranges_tile_the_parameters():
    """24 elements over 3 ranks: 8 each, the (5, 3) and (2,) parameters straddling a cut."""
    params = [torch.zeros(s) for s in ((5, 3), (2,), (7,))]
    pieces = [_pieces(params, rank, 3) for rank in range(3)]
    assert [[(pc.index, pc.lo, pc.hi, pc.at) for pc in ps] for ps in pieces] == [
        [(0, 0, 8, 0)], [(0, 8, 15, 0), (1, 0, 1, 7)], [(1, 1, 2, 0), (2, 0, 7, 1)]]
    with pytest.raises(ValueError, match="not contiguous"):
        FlatShard([torch.zeros(4, 3).t()], None)


def _pieces(params, rank, size):
    """The layout rank ``rank`` of a group of ``size`` computes (no process group needed: it is pure)."""
    with mock.patch("v4train.parallel.ownership.group_rank_size", return_value=(rank, size)):
        return FlatShard(params, object()).pieces


def test_distributed_adamw_refuses_bad_coverage():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))
    with pytest.raises(ValueError, match="in no shard_groups"):
        DistributedAdamW([a, b], shard_groups=[(None, [a])])
    with pytest.raises(ValueError, match="in two shard_groups"):
        DistributedAdamW([a, b], shard_groups=[(None, [a, b]), (None, [a])])
