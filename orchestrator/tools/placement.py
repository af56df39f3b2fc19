"""Placement by node: which node each rank runs on, and which parallel groups cross nodes.

Rank ``r`` runs on node ``r // devices_per_node`` (``RayRankGroup.create`` places one placement-group
bundle per node). With Megatron's rank order ``tp-cp-ep-dp-pp`` (TP fastest, PP slowest) a tensor-parallel
group is ``tp`` consecutive ranks, so it stays on one node whenever ``devices_per_node`` is a multiple of
``tp``; expert-parallel groups (``ep`` consecutive ranks of the expert grid, expert-tensor-parallel 1) stay
on one node where ``ep`` divides ``devices_per_node``; data-parallel replicas and pipeline stages fill the
remaining ranks of a node, then spread over nodes. ``v4train plan`` counts each group's traffic on the
link it crosses (``hardware.intra_node_gbps`` or ``inter_node_gbps``); the run writes the placement it got
to ``RUN_DIR/placement.json``.
"""

from __future__ import annotations

import functools
import itertools

__all__ = ["rank_nodes", "groups", "crosses_nodes", "format_placement"]

KINDS = ("tp", "cp", "ep", "dp", "pp")


def rank_nodes(world_size: int, devices_per_node: int) -> list[int]:
    """The node of every rank: ``[world_size]`` node indices."""
    return [r // devices_per_node for r in range(world_size)]


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
def crosses_nodes(tp: int, pp: int, ep: int, dp: int, devices_per_node: int, cp: int = 1) -> dict[str, bool]:
    """For each group kind, whether any of its groups spans more than one node (cached: the planner asks for
    the same layout under every micro-batch size and recompute mode; do not mutate the result)."""
    nodes = rank_nodes(tp * cp * pp * dp, devices_per_node)
    return {kind: any(len({nodes[r] for r in g}) > 1 for g in gs)
            for kind, gs in groups(tp, pp, ep, dp, cp).items()}


def format_placement(tp: int, pp: int, ep: int, dp: int, devices_per_node: int, comm_bytes: dict[str, float],
                     intra_gbps: float, inter_gbps: float, cp: int = 1) -> str:
    """The rank-to-node map (first and last nodes when there are many) and each rank's traffic per step
    split into intra- and inter-node bytes with the groups that carry them."""
    world = tp * cp * pp * dp
    nodes = rank_nodes(world, devices_per_node)
    n_nodes = nodes[-1] + 1
    crosses = crosses_nodes(tp, pp, ep, dp, devices_per_node, cp)
    shown = range(n_nodes) if n_nodes <= 4 else [0, 1, n_nodes - 2, n_nodes - 1]
    lines = [f"  placement: {n_nodes} node(s) x {devices_per_node} ranks (rank r on node r // {devices_per_node})"]
    for n in shown:
        first, last = n * devices_per_node, min(world, (n + 1) * devices_per_node) - 1
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
