"""Node faults: the ``node_kill`` / ``partition`` grammar, their expansion onto the ranks of the node, the
partition drill's refusal in the machine's own network namespace, and the rank group's node-loss verdict."""

from __future__ import annotations

import pytest

from v4train.orchestrator.control.node_watch import NodeWatch
from v4train.orchestrator.control.rank_group import RankFailure
from v4train.orchestrator.control.ray_group import RayRankGroup
from v4train.orchestrator.faults import Fault, cut_link, parse_fault


def test_node_fault_grammar_round_trips():
    fault = parse_fault("node_kill@3:node=1")
    assert fault == Fault("node_kill", 3, node=1) and str(fault) == "node_kill@3:node=1"
    assert parse_fault("partition@2:node=0") == Fault("partition", 2, node=0)
    # the per-rank share the supervisor hands out parses back to one rank
    assert parse_fault("node_kill@3:rank=5") == Fault("node_kill", 3, rank=5)


@pytest.mark.parametrize("text", ["node_kill@3", "node_kill@3:node=x", "partition@2:host=1", "node_kill@0:node=1"])
def test_bad_node_faults_say_what_is_wrong(text):
    with pytest.raises(ValueError, match="node_kill|partition|STEP"):
        parse_fault(text)


def test_node_fault_lands_on_every_rank_of_the_node():
    assert Fault("node_kill", 3, node=1).on_ranks([0] * 4 + [1] * 4) == [Fault("node_kill", 3, rank=r)
                                                                         for r in (4, 5, 6, 7)]
    # unequal shares (8 ranks of TP 2 on three nodes: 4 + 2 + 2)
    assert Fault("partition", 2, node=2).on_ranks([0] * 4 + [1] * 2 + [2] * 2) == [Fault("partition", 2, rank=r)
                                                                                   for r in (6, 7)]
    assert Fault("kill", 3, rank=2).on_ranks([0] * 8) == [Fault("kill", 3, rank=2)]


def test_partition_refuses_outside_a_simulated_host():
    with pytest.raises(RuntimeError, match="refusing to take eth0 down outside a simulated host's network namespace"):
        cut_link("eth0")


def _group(nodes: list[str]) -> RayRankGroup:
    group = RayRankGroup([None] * len(nodes), timeout_s=1.0)
    group.nodes = nodes
    return group


def test_every_rank_of_one_node_dying_is_a_node_loss():
    group = _group(["10.0.0.1"] * 2 + ["10.0.0.2"] * 2)
    died = [RankFailure(r, "died", "actor died", "run") for r in (2, 3)]
    lost = group._node_loss(died[0], died)
    assert (lost.rank, lost.kind) == (2, "node_lost")
    assert lost.message.startswith("node 10.0.0.2 lost: ranks 2-3 died")
    # one rank of the node alive: a rank death, not a node loss
    assert group._node_loss(died[0], died[:1]) is None
    # one node only: nothing to tell apart
    assert _group(["10.0.0.1"] * 4)._node_loss(died[0], died) is None


@pytest.mark.parametrize("kind", ["node_lost", "unreachable"])
def test_a_node_failure_is_never_rejoined_in_place(kind):
    """A lost or unreachable node takes several ranks with it: keeping the processes would set up again with
    dead actors, so the group declines and the supervisor rebuilds it on the nodes that are left."""
    group = RayRankGroup(actors=[object()] * 4, timeout_s=1.0, spares=[object()], make_spare=object)
    assert group.rejoin(RankFailure(2, kind, "node 10.0.0.2 lost", "train_step"), timeout_s=1.0) is False
    assert len(group.spares) == 1


def _beats(answering: list[int], silent: list[int]) -> dict[int, dict]:
    beats = {r: {"step": 3, "progress": 10, "phase": "forward"} for r in answering}
    beats.update({r: {"step": -1, "progress": -1, "phase": "unresponsive"} for r in silent})
    return beats


def test_a_node_silent_to_heartbeats_while_others_answer_is_lost():
    """A cut link: the node's ranks live on but answer nothing; the others (blocked on them) still answer."""
    watch = NodeWatch(["10.0.0.1"] * 2 + ["10.0.0.2"] * 2, start=0.0, silence_s=20.0)
    for now in (1.0, 10.0, 19.0):
        assert watch.observe(_beats([0, 1], [2, 3]), now, "train_step") is None
    lost = watch.observe(_beats([0, 1], [2, 3]), 21.0, "train_step")
    assert (lost.rank, lost.kind, lost.method) == (2, "node_lost", "train_step")
    assert lost.message.startswith("node 10.0.0.2 unreachable: ranks 2-3 answered no heartbeat for 21 s")


def test_a_partly_silent_node_or_a_silent_cluster_is_no_node_loss():
    watch = NodeWatch(["a"] * 2 + ["b"] * 2, start=0.0, silence_s=20.0)
    # one rank of node b still answers: a slow rank, for the stall detector
    assert watch.observe(_beats([0, 1, 3], [2]), 30.0, "train_step") is None
    # every rank silent (the supervisor's own side, or a machine paused): nothing to tell apart
    watch = NodeWatch(["a"] * 2 + ["b"] * 2, start=0.0, silence_s=20.0)
    assert watch.observe(_beats([], [0, 1, 2, 3]), 30.0, "train_step") is None
    # a node heard again before the silence ends starts over
    watch = NodeWatch(["a"] * 2 + ["b"] * 2, start=0.0, silence_s=20.0)
    watch.observe(_beats([0, 1, 2, 3], []), 15.0, "train_step")
    assert watch.observe(_beats([0, 1], [2, 3]), 30.0, "train_step") is None
    assert watch.observe(_beats([0, 1], [2, 3]), 35.0, "train_step").kind == "node_lost"
