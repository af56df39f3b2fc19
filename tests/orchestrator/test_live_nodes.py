"""Placement on the live nodes: the raylet probe that leaves out a node Ray still calls alive, and the bundles
chosen from a node list (spread one bundle per node, the supervisor's node first; packed on what is left)."""

from __future__ import annotations

import socket

import pytest

from v4train.orchestrator.control.node_placement import (NODE_ID_LABEL, LiveNode, NodePlacementError, live_nodes,
                                                         plan_placement)


def _node(i: int, cpus: float = 4.0, gpus: float = 0.0) -> LiveNode:
    return LiveNode(f"id{i}", f"10.0.0.{i + 1}", {"CPU": cpus, **({"GPU": gpus} if gpus else {})})


def test_spread_pins_one_bundle_per_node_supervisor_first():
    live = [_node(0), _node(1), _node(2)]
    plan = plan_placement(live, shares=(4, 4), per_rank={"CPU": 1}, here="id2")
    assert plan.strategy == "STRICT_SPREAD"
    assert plan.bundles == [{"CPU": 4}, {"CPU": 4}]
    assert plan.selectors == [{NODE_ID_LABEL: "id2"}, {NODE_ID_LABEL: "id0"}]
    assert plan.bundle_of == [0, 0, 0, 0, 1, 1, 1, 1]


def test_the_other_nodes_follow_in_address_order_whatever_rays_order():
    """Ray lists nodes by random id: the rank-to-node map must not depend on it (10.0.0.9 before 10.0.0.10)."""
    nodes = [LiveNode("c", "10.0.0.10", {"CPU": 4.0}), LiveNode("b", "10.0.0.9", {"CPU": 4.0}),
             LiveNode("a", "10.0.0.2", {"CPU": 4.0})]
    for live in (nodes, nodes[::-1], [nodes[1], nodes[0], nodes[2]]):
        plan = plan_placement(live, shares=(4, 4, 4), per_rank={"CPU": 1}, here="b")
        assert plan.selectors == [{NODE_ID_LABEL: "b"}, {NODE_ID_LABEL: "a"}, {NODE_ID_LABEL: "c"}]


def test_a_lost_node_is_replaced_by_a_live_one_at_once():
    """Node 1 lost (not in the live list): the group spreads over node 0 and the replacement node 2."""
    plan = plan_placement([_node(0), _node(2)], shares=(4, 4), per_rank={"CPU": 1}, here="id0",
                          unreachable=["id1"])
    assert plan.selectors == [{NODE_ID_LABEL: "id0"}, {NODE_ID_LABEL: "id2"}]


def test_too_few_live_nodes_pack_the_ranks_off_the_unreachable_ones():
    plan = plan_placement([_node(0, cpus=8)], shares=(4, 4), per_rank={"CPU": 1}, here="id0",
                          unreachable=["id1", "id2"])
    assert plan.strategy == "PACK" and plan.bundles == [{"CPU": 1}] * 8 and plan.bundle_of == list(range(8))
    assert plan.selectors == [{NODE_ID_LABEL: "!in(id1, id2)"}] * 8
    # nothing unreachable: no selector at all (Ray packs where it likes, as on one machine)
    assert plan_placement([_node(0, cpus=8)], (8,), {"CPU": 1}, "id0").selectors == [{}] * 8


def test_a_node_too_small_for_a_node_share_is_not_spread_on():
    """Spread needs a node holding each node's share (GPUs counted too); else the ranks are packed."""
    live = [_node(0, cpus=8, gpus=4), _node(1, cpus=8, gpus=2), _node(2, cpus=8, gpus=4)]
    plan = plan_placement(live, shares=(4, 4), per_rank={"CPU": 1, "GPU": 1}, here="id0")
    assert plan.selectors == [{NODE_ID_LABEL: "id0"}, {NODE_ID_LABEL: "id2"}]
    assert plan.bundles == [{"CPU": 4, "GPU": 4}] * 2
    plan = plan_placement(live[:2], shares=(3, 3), per_rank={"CPU": 1, "GPU": 1}, here="id0")
    assert plan.strategy == "PACK"


def test_unequal_shares_each_get_a_node_that_holds_them():
    """8 ranks of TP 2 on three nodes (4 + 2 + 2): the largest share on the supervisor's node, the others in
    address order; a node too small for its share is passed over for one that holds it."""
    live = [_node(0), _node(1), _node(2)]
    plan = plan_placement(live, shares=(4, 2, 2), per_rank={"CPU": 1}, here="id0")
    assert plan.strategy == "STRICT_SPREAD" and plan.bundles == [{"CPU": 4}, {"CPU": 2}, {"CPU": 2}]
    assert plan.selectors == [{NODE_ID_LABEL: f"id{i}"} for i in range(3)]
    assert plan.bundle_of == [0, 0, 0, 0, 1, 1, 2, 2]
    small = [_node(0), _node(1, cpus=2), _node(2)]
    plan = plan_placement(small, shares=(4, 2, 2), per_rank={"CPU": 1}, here="id1")
    assert plan.selectors == [{NODE_ID_LABEL: "id0"}, {NODE_ID_LABEL: "id1"}, {NODE_ID_LABEL: "id2"}]
    # two live nodes for three shares: packed on them
    assert plan_placement(live[:2], shares=(4, 2, 2), per_rank={"CPU": 1}, here="id0").strategy == "PACK"


def test_ranks_that_fit_nowhere_are_refused_naming_the_room():
    with pytest.raises(NodePlacementError, match=r"8 ranks .* do not fit on the live Ray nodes \(room for 4"):
        plan_placement([_node(0)], shares=(4, 4), per_rank={"CPU": 1}, here="id0", unreachable=["id1"])


def _ray_node(node_id: str, port: int, alive: bool = True) -> dict:
    return {"NodeID": node_id, "Alive": alive, "NodeManagerAddress": "127.0.0.1", "NodeManagerPort": port,
            "Resources": {"CPU": 2.0}}


def test_live_nodes_keep_the_nodes_whose_raylet_answers():
    with socket.socket() as listening, socket.socket() as closed:
        listening.bind(("127.0.0.1", 0))
        listening.listen(4)
        closed.bind(("127.0.0.1", 0))  # bound, not listening: a connection is refused, as to a dead raylet
        nodes = [_ray_node("up", listening.getsockname()[1]), _ray_node("gone", closed.getsockname()[1]),
                 _ray_node("dead", listening.getsockname()[1], alive=False)]
        live, silent = live_nodes(nodes, timeout_s=2.0)
        assert [n.node_id for n in live] == ["up"] and live[0].resources == {"CPU": 2.0}
        assert silent == ["gone"]
        # the caller's own node is alive whatever its port says
        live, silent = live_nodes(nodes, here="gone", timeout_s=2.0)
        assert [n.node_id for n in live] == ["up", "gone"] and silent == []
