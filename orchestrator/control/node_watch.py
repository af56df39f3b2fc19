"""A node that stops answering: every rank on it silent to heartbeats while the other nodes' ranks answer
(docs/architecture.md section 3).

A node whose link is cut keeps its processes: nothing dies, so Ray reports the loss only when its health
checks give up (about 65 s by default), and its peers block in collectives until the collective timeout. The
supervisor's heartbeats see it sooner: a rank answers them on its own thread even while a step blocks in a
collective, so when every rank of one node has answered none for :data:`NODE_SILENCE_S` while a rank of
another node has answered, the node is cut off from the supervisor: a node loss.
"""

from __future__ import annotations

from v4train.orchestrator.control.rank_group import RankFailure

__all__ = ["NODE_SILENCE_S", "NodeWatch"]

# How long every rank of one node may leave heartbeats unanswered, while another node's ranks answer, before
# the node counts as lost (seconds). Far above a loaded machine's heartbeat delays (a beat is answered on its
# own thread), far below Ray's health checks and the collective timeout.
NODE_SILENCE_S = 20.0


class NodeWatch:
    """Follows the heartbeats of one call of a multi-node group.

    Args:
        nodes: each rank's node address (index = rank).
        start: when the call began (``time.monotonic()`` seconds): every rank counts as heard from then.
        silence_s: how long a whole node may be silent.
    """

    def __init__(self, nodes: list[str], start: float, silence_s: float = NODE_SILENCE_S) -> None:
        self.nodes = nodes
        self.silence_s = silence_s
        self.heard = dict.fromkeys(range(len(nodes)), start)  # rank -> last time it answered a heartbeat

    def observe(self, beats: dict[int, dict], now: float, method: str) -> RankFailure | None:
        """Record one round of heartbeats (``{rank: beat}``; an unanswered one has phase ``unresponsive``).

        Returns a ``node_lost`` failure naming the node, its first rank and its silent ranks when every
        rank of the node in ``beats`` has been silent for ``silence_s`` while a rank of another node was
        heard within that time; else None.
        """
        for rank, beat in beats.items():
            if beat.get("phase") != "unresponsive":
                self.heard[rank] = now
        for node in dict.fromkeys(self.nodes[r] for r in beats):
            ranks = [r for r in beats if self.nodes[r] == node]
            silent_for = now - max(self.heard[r] for r in ranks)
            others_heard = any(now - self.heard[r] < self.silence_s for r in beats if self.nodes[r] != node)
            if silent_for >= self.silence_s and others_heard:
                return RankFailure(ranks[0], "node_lost", f"node {node} unreachable: ranks {ranks[0]}-{ranks[-1]} "
                                   f"answered no heartbeat for {silent_for:.0f} s while other nodes' ranks did",
                                   method)
        return None
