"""Placement by node: which node each rank runs on, and which parallel groups cross nodes.

A cluster file offers ``nodes x devices_per_node`` devices; a job of ``world`` ranks (at most that many) runs
on all ``nodes`` nodes, one rank per device, each node holding whole tensor-parallel groups
(:func:`ranks_per_node`). With Megatron's rank order ``tp-cp-ep-dp-pp`` (TP fastest, PP slowest) a
tensor-parallel group is ``tp`` consecutive ranks, so node ``i`` takes the next ``ranks_per_node(...)[i]``
ranks: the groups are dealt out as evenly as the nodes allow, the first nodes taking one more where they do
not split evenly (8 ranks of TP 2 on 3 nodes of 4 devices: 4 + 2 + 2). When the job fills the cluster and
``tp`` divides ``devices_per_node`` this is rank ``r`` on node ``r // devices_per_node``. Expert-parallel
groups (``ep`` consecutive ranks of the expert grid, expert-tensor-parallel 1) stay on one node where ``ep``
divides a node's share; data-parallel replicas and pipeline stages fill the remaining ranks of a node, then
spread over nodes. ``RayRankGroup.create`` places one placement-group bundle of each node's share on its
node; ``v4train plan`` counts each group's traffic on the link it crosses (``hardware.intra_node_gbps`` or
``inter_node_gbps``); the run writes the placement it got to ``RUN_DIR/placement.json``.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

__all__ = ["ranks_per_node", "rank_nodes", "groups", "crosses_nodes", "format_placement"]

KINDS = ("tp", "cp", "ep", "dp", "pp")


def ranks_per_node(world_size: int, tp: int, nodes: int, devices_per_node: int) -> tuple[int, ...]:
    """How many ranks each of the ``nodes`` nodes holds: ``[nodes]`` counts summing to ``world_size``.

    The ``world_size / tp`` tensor-parallel groups are dealt out whole, ``groups // nodes`` to every node
    and one more to each of the first ``groups % nodes``; a node holds at most ``devices_per_node`` ranks.
    Raises ValueError naming the field when a tensor-parallel group fits no node (``parallel.tp``), the
    ranks exceed the devices, fewer groups than ``nodes`` leave a node empty (``nodes``), or the whole
    groups do not fit the nodes (``tp`` not dividing ``devices_per_node``).
    """
    devices = nodes * devices_per_node
    if world_size > devices:
        raise ValueError(f"parallel: tp x cp x pp x dp = {world_size} ranks exceed the cluster's nodes x "
                         f"devices_per_node = {nodes} x {devices_per_node} = {devices} devices")
    if tp > devices_per_node:
        raise ValueError(f"parallel.tp={tp}: a tensor-parallel group of {tp} ranks fits no node of "
                         f"devices_per_node={devices_per_node} (tensor-parallel groups never span nodes)")
    n_groups, per_node = world_size // tp, devices_per_node // tp
    if n_groups < nodes:
        raise ValueError(f"nodes={nodes}: the job's {n_groups} tensor-parallel group(s) of parallel.tp={tp} ranks "
                         f"fill only {n_groups} node(s); every node of the cluster file holds at least one")
    if n_groups > nodes * per_node:
        raise ValueError(f"parallel.tp={tp}: {n_groups} whole tensor-parallel groups do not fit {nodes} node(s) "
                         f"of devices_per_node={devices_per_node} ({per_node} group(s) each)")
    base, extra = divmod(n_groups, nodes)
    return tuple(tp * (base + (i < extra)) for i in range(nodes))


def rank_nodes(shares: Sequence[int]) -> list[int]:
    """The node of every rank, given each node's rank count (:func:`ranks_per_node`): ``[sum(shares)]``."""
    return [n for n, count in enumerate(shares) for _ in range(count)]


def _rank(coords: dict[str, int], sizes: dict[str, int], order: tuple[str, ...]) -> int:
    rank, stride = 0, 1
    for k in order:
        rank += coords[k] * stride
        stride *= sizes[k]
    return rank


def groups(tp: int, pp: int, ep: int, dp: int, cp: int = 1) -> dict[str, list[list[int]]]:
    """Every tensor-, context-, expert-, data- and pipeline-parallel group as lists of global ranks.

    Dense groups follow Megatron's ``tp-cp-ep-dp-pp`` order (EP does not split dense ranks); expert groups
    its expert grid ``etp-ep-edp-pp`` with expert-tensor-parallel 1 and ``edp = tp*cp*dp / ep``
    (``parallel/groups.py``).
    """
    dense = {"tp": tp, "cp": cp, "dp": dp, "pp": pp}
    order = ("tp", "cp", "dp", "pp")
    out: dict[str, list[list[int]]] = {}
    for kind in ("tp", "cp", "dp", "pp"):
        others = [k for k in order if k != kind]
        found = []
        for fixed in itertools.product(*(range(dense[k]) for k in others)):
            base = dict(zip(others, fixed, strict=True))
            found.append([_rank({**base, kind: i}, dense, order) for i in range(dense[kind])])
        out[kind] = found
    edp = tp * cp * dp // ep
    expert = {"ep": ep, "edp": edp, "pp": pp}
    out["ep"] = [[_rank({"ep": i, "edp": d, "pp": s}, expert, ("ep", "edp", "pp")) for i in range(ep)]
                 for s in range(pp) for d in range(edp)]
    return out


@functools.cache
def crosses_nodes(tp: int, pp: int, ep: int, dp: int, shares: tuple[int, ...], cp: int = 1) -> dict[str, bool]:
    """For each group kind, whether any of its groups spans more than one node, with ``shares[i]`` ranks on
    node ``i`` (cached: the planner asks for the same layout under every micro-batch size and recompute mode;
    do not mutate the result)."""
    nodes = rank_nodes(shares)
    return {kind: any(len({nodes[r] for r in g}) > 1 for g in gs)
            for kind, gs in groups(tp, pp, ep, dp, cp).items()}


def format_placement(tp: int, pp: int, ep: int, dp: int, shares: tuple[int, ...], comm_bytes: dict[str, float],
                     intra_gbps: float, inter_gbps: float, cp: int = 1) -> str:
    """The rank-to-node map (``shares[i]`` ranks on node ``i``; first and last nodes when there are many) and
    each rank's traffic per step split into intra- and inter-node bytes with the groups that carry them."""
    world = tp * cp * pp * dp
    n_nodes = len(shares)
    crosses = crosses_nodes(tp, pp, ep, dp, tuple(shares), cp)
    shown = range(n_nodes) if n_nodes <= 4 else [0, 1, n_nodes - 2, n_nodes - 1]
    counts = " + ".join(map(str, shares)) if n_nodes <= 4 else f"{shares[0]} + ... + {shares[-1]}"
    lines = [f"  placement: {world} ranks on {n_nodes} node(s), {counts} (whole tensor-parallel groups per node)"]
    starts = list(itertools.accumulate(shares, initial=0))
    for n in shown:
        first, last = starts[n], starts[n + 1] - 1
        stages = sorted({r // (tp * cp * dp) for r in range(first, last + 1)})
        lines.append(f"    node {n}: ranks {first}-{last}, pipeline stage(s) {', '.join(map(str, stages))}")
    if n_nodes > 4:
        lines.insert(3, f"    ... {n_nodes - 4} more nodes")
    split = {"intra": [], "inter": []}
    for kind, bytes_ in comm_bytes.items():
        if bytes_:
            split["inter" if crosses.get(kind, False) else "intra"].append(kind)
    for side, gbps in (("intra", intra_gbps), ("inter", inter_gbps)):
        total = sum(comm_bytes[k] for k in split[side])
        kinds = ", ".join(k.upper() for k in split[side]) or "none"
        lines.append(f"    {side}-node traffic per step per rank: {total / 2**20:,.1f} MiB ({kinds}) at {gbps:g} GB/s")
    return "\n".join(lines)
