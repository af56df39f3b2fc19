"""Placement by node: the planner's group enumeration equals Megatron's real process groups (4 gloo ranks),
and the node map keeps tensor-parallel groups on one node while pipeline stages cross nodes; nodes take whole
tensor-parallel groups, so a job may hold unequal shares of nodes (4 + 2 + 2), and a job that does not fit is
refused naming the field."""

from __future__ import annotations

import json

import pytest

from support.spawn import free_ports, spawn_ranks
from v4train.orchestrator.spec import ClusterSpec, SpecError
from v4train.orchestrator.tools.placement import crosses_nodes, format_placement, groups, rank_nodes, ranks_per_node

# (tp, pp, ep, dp) over 4 ranks
LAYOUTS = [(2, 2, 2, 1), (1, 2, 2, 2), (2, 1, 4, 2), (1, 4, 1, 1)]


def _rank_main(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from v4train.parallel import groups as pgroups

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=4)
    found = {}
    for tp, pp, ep, dp in LAYOUTS:
        ctx = pgroups.initialize(tp=tp, pp=pp, ep=ep, dp=dp)
        found[f"{tp}{pp}{ep}{dp}"] = {k: dist.get_process_group_ranks(g) if g is not None else [rank]
                                      for k, g in (("tp", ctx.tp_group), ("pp", ctx.pp_group),
                                                   ("dp", ctx.dp_group), ("ep", ctx.ep_group))}
    with open(f"{out}/{rank}.json", "w") as f:
        json.dump(found, f)
    pgroups.destroy()
    dist.destroy_process_group()


@pytest.mark.timeout(600)
def test_group_enumeration_equals_megatrons_groups(tmp_path):
    spawn_ranks(_rank_main, (free_ports(1)[0], str(tmp_path)), 4, 500, "placement ranks")
    real = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(4)]
    for tp, pp, ep, dp in LAYOUTS:
        mine = groups(tp, pp, ep, dp)
        for kind in ("tp", "pp", "dp", "ep"):
            theirs = sorted({tuple(real[r][f"{tp}{pp}{ep}{dp}"][kind]) for r in range(4)})
            assert theirs == sorted(tuple(g) for g in mine[kind]), (tp, pp, ep, dp, kind)


def test_tensor_parallel_stays_on_a_node_pipeline_crosses():
    assert rank_nodes((4, 4)) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert crosses_nodes(2, 2, 2, 2, (4, 4)) == {"tp": False, "cp": False, "dp": False, "pp": True, "ep": False}
    # data parallel wider than a node: DP crosses, TP still does not; EP over 16 ranks crosses
    assert crosses_nodes(8, 1, 16, 4, (8, 8, 8, 8)) == {"tp": False, "cp": False, "dp": True, "pp": False,
                                                        "ep": True}
    # one node: nothing crosses
    assert not any(crosses_nodes(2, 2, 2, 2, (8,)).values())
    # three nodes, 4 + 2 + 2: stage 1's two data-parallel replicas sit on nodes 1 and 2, so DP crosses too
    assert rank_nodes((4, 2, 2)) == [0, 0, 0, 0, 1, 1, 2, 2]
    assert crosses_nodes(2, 2, 2, 2, (4, 2, 2)) == {"tp": False, "cp": False, "dp": True, "pp": True, "ep": False}


def test_plan_text_splits_traffic_by_link():
    text = format_placement(2, 2, 2, 2, (4, 4), {"tp": 2**20, "ep": 0.0, "pp": 3 * 2**20, "dp": 5 * 2**20}, 450.0, 50.0)
    assert "node 0: ranks 0-3, pipeline stage(s) 0" in text and "node 1: ranks 4-7, pipeline stage(s) 1" in text
    assert "intra-node traffic per step per rank: 6.0 MiB (TP, DP) at 450 GB/s" in text
    assert "inter-node traffic per step per rank: 3.0 MiB (PP) at 50 GB/s" in text


@pytest.mark.parametrize("world, tp, nodes, devices, shares", [
    (8, 2, 2, 4, (4, 4)),                      # the exact fit: rank r on node r // devices_per_node
    (16, 8, 2, 8, (8, 8)),
    (8, 2, 3, 4, (4, 2, 2)),                   # fewer ranks than devices: whole TP groups, first nodes fuller
    (12, 2, 3, 6, (4, 4, 4)),
    (6, 1, 4, 2, (2, 2, 1, 1)),
    (4, 1, 1, 8, (4,)),                        # one node with idle devices
])
def test_ranks_go_to_nodes_in_whole_tensor_parallel_groups(world, tp, nodes, devices, shares):
    assert ranks_per_node(world, tp, nodes, devices) == shares
    owner = rank_nodes(shares)
    assert all(len({owner[r] for r in g}) == 1 for g in groups(tp, 1, 1, world // tp)["tp"])
    if world == nodes * devices:
        assert owner == [r // devices for r in range(world)]


@pytest.mark.parametrize("world, tp, nodes, devices, field", [
    (16, 2, 3, 4, r"parallel: tp x cp x pp x dp = 16 ranks exceed the cluster's nodes x devices_per_node = 3 x 4"),
    (8, 8, 2, 4, r"parallel.tp=8: a tensor-parallel group of 8 ranks fits no node of devices_per_node=4"),
    (4, 2, 3, 4, r"nodes=3: the job's 2 tensor-parallel group\(s\) of parallel.tp=2 ranks fill only 2 node"),
    (12, 4, 2, 6, r"parallel.tp=4: 3 whole tensor-parallel groups do not fit 2 node\(s\) of devices_per_node=6"),
])
def test_ranks_that_do_not_fit_the_nodes_are_refused_naming_the_field(world, tp, nodes, devices, field):
    with pytest.raises(ValueError, match=field):
        ranks_per_node(world, tp, nodes, devices)


def test_three_nodes_plan_text_and_validation():
    """8 ranks of (TP, PP, DP) = (2, 2, 2) on three nodes of four devices: stage 0 on node 0, stage 1's two
    replicas on nodes 1 and 2, so DP traffic goes inter-node; the job is accepted, a too-wide TP is refused."""
    text = format_placement(2, 2, 1, 2, (4, 2, 2), {"tp": 2**20, "pp": 3 * 2**20, "dp": 5 * 2**20}, 450.0, 50.0)
    assert "placement: 8 ranks on 3 node(s), 4 + 2 + 2 (whole tensor-parallel groups per node)" in text
    assert "node 1: ranks 4-5, pipeline stage(s) 1" in text and "node 2: ranks 6-7, pipeline stage(s) 1" in text
    assert "inter-node traffic per step per rank: 8.0 MiB (PP, DP) at 50 GB/s" in text
    cluster = ClusterSpec(name="three", nodes=3, devices_per_node=4)
    assert cluster.ranks_per_node(8, 2) == (4, 2, 2)
    with pytest.raises(SpecError, match=r"^parallel.tp=8: .* \(cluster three\)$"):
        cluster.ranks_per_node(8, 8)
