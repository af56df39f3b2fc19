"""Where a Ray rank group's placement-group bundles go: on the nodes that are alive now (docs/architecture.md
section 3).

Ray reports a node dead only once its health checks have failed ``health_check_failure_threshold`` times in a
row (by default 5 checks 3 s apart, each allowed 10 s): about 15 s after its raylet dies, about 65 s after its
link is cut. A placement group with a bundle on such a node never becomes ready. So :func:`live_nodes` takes
the nodes ``ray.nodes()`` calls alive and keeps those whose raylet accepts a TCP connection within
:data:`PROBE_TIMEOUT_S` (the supervisor reaches every raylet on a working cluster); a node lost moments ago is
left out at once, and a replacement node that has joined is used.

:func:`plan_placement` then chooses the bundles: one per node (``STRICT_SPREAD``) holding that node's share of
the ranks (``ClusterSpec.ranks_per_node``: whole tensor-parallel groups, so shares may differ, 4 + 2 + 2), each
pinned by Ray's node-id label to a live node, the supervisor's own first (node 0 holds rank 0, the rendezvous,
so node indices follow the cluster from its head) and the others by address (``ray.nodes()`` lists nodes by
their random ids, so its order differs between clusters of the same hosts), when enough live nodes can each
hold their share; else one bundle per rank packed (``PACK``) on the live nodes only.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from v4train.orchestrator.tools.placement import rank_nodes

__all__ = ["NODE_ID_LABEL", "PROBE_TIMEOUT_S", "LiveNode", "Placement", "NodePlacementError", "live_nodes",
           "plan_placement", "place_group"]

NODE_ID_LABEL = "ray.io/node-id"  # the label Ray gives every node (its id)
# How long a node's raylet may take to accept a connection before the node counts as gone (seconds): a
# refused connection (a dead raylet) answers at once, a cut link never does.
PROBE_TIMEOUT_S = 3.0


class NodePlacementError(RuntimeError):
    """The live nodes cannot hold the group's ranks; the message names what is missing."""


@dataclass(frozen=True)
class LiveNode:
    """A Ray node that is alive and reachable: its id, address and total resources (``{"CPU": 8.0, ...}``)."""

    node_id: str
    address: str
    resources: dict[str, float]

    def holds(self, bundle: dict[str, float]) -> int:
        """How many copies of ``bundle`` this node's resources hold."""
        return min((int(self.resources.get(k, 0.0) // v) for k, v in bundle.items() if v), default=1 << 30)


@dataclass(frozen=True)
class Placement:
    """A placement group's bundles (``[{"CPU": n, ...}]``), its strategy, the node-id label selector of each
    bundle (``{NODE_ID_LABEL: id}`` pins it, ``"!in(...)"`` keeps it off nodes, ``{}`` anywhere) and the
    bundle of every rank (``bundle_of[rank]``)."""

    bundles: list[dict[str, float]]
    strategy: str
    selectors: list[dict[str, str]]
    bundle_of: list[int]


def _reachable(address: str, port: int, timeout_s: float) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _address_key(address: str) -> tuple:
    """Sort key of a node address: IP addresses in numeric order (10.0.0.9 before 10.0.0.10), then names."""
    try:
        ip = ipaddress.ip_address(address)
        return (0, ip.version, int(ip), "")
    except ValueError:
        return (1, 0, 0, address)


def live_nodes(nodes: list[dict], here: str | None = None,
               timeout_s: float = PROBE_TIMEOUT_S) -> tuple[list[LiveNode], list[str]]:
    """The nodes of ``nodes`` (``ray.nodes()`` entries) that Ray calls alive and whose raylet
    (``NodeManagerAddress:NodeManagerPort``) accepts a TCP connection within ``timeout_s``, in Ray's order;
    and the ids of those Ray calls alive that did not answer. The probes run in parallel; node ``here`` (the
    caller's own) is not probed: it is alive."""
    alive = [n for n in nodes if n["Alive"]]
    if not alive:
        return [], []

    def answers_probe(node: dict) -> bool:
        return node["NodeID"] == here or _reachable(node["NodeManagerAddress"], int(node["NodeManagerPort"]),
                                                    timeout_s)

    with ThreadPoolExecutor(max_workers=len(alive)) as pool:
        answers = list(pool.map(answers_probe, alive))
    live = [LiveNode(n["NodeID"], n["NodeManagerAddress"], dict(n["Resources"]))
            for n, ok in zip(alive, answers, strict=True) if ok]
    silent = [n["NodeID"] for n, ok in zip(alive, answers, strict=True) if not ok]
    return live, silent


def plan_placement(live: list[LiveNode], shares: Sequence[int], per_rank: dict[str, float],
                   here: str | None, unreachable: Sequence[str] = ()) -> Placement:
    """The bundles of a group whose ranks go ``shares[i]`` to node ``i`` (consecutive ranks; ``[nodes]``
    counts, ``ClusterSpec.ranks_per_node``), each rank needing ``per_rank`` resources, on the ``live`` nodes
    (``here``: the supervisor's node id, placed first; the others in address order, so the same hosts give
    the same rank-to-node map).

    Spread (more than one share, and a distinct live node holding each share, taken in that order): one
    bundle per node of its share's size, bundle ``i`` pinned to the node chosen for share ``i``. Otherwise
    one bundle per rank, ``PACK``, kept off the ``unreachable`` nodes (the ones Ray still calls alive).
    Raises NodePlacementError when the live nodes together hold fewer ranks than the shares add up to.
    """
    world_size = sum(shares)
    order = sorted(live, key=lambda n: (n.node_id != here, _address_key(n.address)))
    if len(shares) > 1:
        bundles = [{k: v * count for k, v in per_rank.items()} for count in shares]
        fit: list[LiveNode] = []
        for bundle in bundles:
            node = next((n for n in order if n not in fit and n.holds(bundle) >= 1), None)
            if node is None:
                break
            fit.append(node)
        if len(fit) == len(shares):
            return Placement(bundles, "STRICT_SPREAD", [{NODE_ID_LABEL: n.node_id} for n in fit],
                             rank_nodes(shares))
    room = sum(n.holds(per_rank) for n in live)
    if room < world_size:
        have = ", ".join(f"{n.address} {n.resources}" for n in order) or "none"
        raise NodePlacementError(f"{world_size} ranks of {per_rank} each do not fit on the live Ray nodes "
                             f"(room for {room}; live: {have}; unreachable: {len(unreachable)})")
    selector = {NODE_ID_LABEL: f"!in({', '.join(unreachable)})"} if unreachable else {}
    return Placement([dict(per_rank)] * world_size, "PACK", [dict(selector) for _ in range(world_size)],
                     list(range(world_size)))


def place_group(shares: Sequence[int], per_rank: dict[str, float], timeout_s: float, retry_s: float = 15.0):
    """Create a ready placement group for ranks going ``shares[i]`` to node ``i`` (:func:`plan_placement`)
    on the nodes alive now; returns ``(group, bundle_of)``.

    A group not ready within ``retry_s`` (a node lost after it was probed) is removed and placed anew on the
    nodes alive then. Raises NodePlacementError when the live nodes cannot hold the ranks, or when no group is
    ready within ``timeout_s``.
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    here = ray.get_runtime_context().get_node_id()
    deadline = time.monotonic() + timeout_s
    while True:
        live, silent = live_nodes(ray.nodes(), here)
        plan = plan_placement(live, shares, per_rank, here, silent)
        selectors = plan.selectors if any(plan.selectors) else None
        pg = placement_group(plan.bundles, strategy=plan.strategy, bundle_label_selector=selectors)
        wait_s = max(1.0, min(retry_s, deadline - time.monotonic()))
        try:
            ray.get(pg.ready(), timeout=wait_s)
            return pg, plan.bundle_of
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(pg)
            if time.monotonic() >= deadline:
                raise NodePlacementError(f"placement group of {len(plan.bundles)} bundle(s) {plan.bundles[0]} "
                                     f"({plan.strategy}) not ready within {timeout_s:.0f} s") from None
