"""Placement by node: the planner's group enumeration equals Megatron's real process groups (4 gloo ranks),
and the node map keeps tensor-parallel groups on one node while pipeline stages cross nodes."""

from __future__ import annotations

import json

import pytest

from support.spawn import free_ports, spawn_ranks
from v4train.orchestrator.tools.placement import crosses_nodes, format_placement, groups, rank_nodes

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
    assert rank_nodes(8, 4) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert crosses_nodes(2, 2, 2, 2, devices_per_node=4) == {"tp": False, "cp": False, "dp": False, "pp": True,
                                                              "ep": False}
    # data parallel wider than a node: DP crosses, TP still does not; EP over 16 ranks crosses
    assert crosses_nodes(8, 1, 16, 4, devices_per_node=8) == {"tp": False, "cp": False, "dp": True, "pp": False,
                                                              "ep": True}
    # one node: nothing crosses
    assert not any(crosses_nodes(2, 2, 2, 2, devices_per_node=8).values())


def test_plan_text_splits_traffic_by_link():
    text = format_placement(2, 2, 2, 2, 4, {"tp": 2**20, "ep": 0.0, "pp": 3 * 2**20, "dp": 5 * 2**20}, 450.0, 50.0)
    assert "node 0: ranks 0-3, pipeline stage(s) 0" in text and "node 1: ranks 4-7, pipeline stage(s) 1" in text
    assert "intra-node traffic per step per rank: 6.0 MiB (TP, DP) at 450 GB/s" in text
    assert "inter-node traffic per step per rank: 3.0 MiB (PP) at 50 GB/s" in text
