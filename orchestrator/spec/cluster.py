"""The cluster file (pydantic models): where ranks run, how Ray starts, what one device offers."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, PositiveInt

from v4train.orchestrator.spec.job import SpecError, _Strict
from v4train.orchestrator.tools.placement import ranks_per_node

__all__ = ["RaySpec", "HardwareSpec", "ClusterSpec"]


class RaySpec(_Strict):
    """How the embedded local Ray cluster is started (ignored when ``address`` names a running cluster).

    ``excludes`` adds gitignore-style patterns to what ``v4train submit`` leaves out of the working
    directory it ships to a running cluster (``orchestrator/tools/jobs.py`` lists the defaults).
    """

    num_cpus: PositiveInt | None = None
    object_store_memory_mb: PositiveInt = 512
    excludes: list[str] = []


class HardwareSpec(_Strict):
    """``hardware`` section: what one device offers, for ``v4train plan`` (never read by training).

    ``memory_gb`` per device (GB = 10^9 bytes, as vendors quote it; default: this machine's RAM /
    devices_per_node); ``peak_tflops`` dense BF16 (GPU) or FP32 (CPU) TFLOP/s per device, ``fp8`` whether matmuls
    run in FP8 through Transformer Engine (twice the BF16 rate); ``intra_node_gbps`` / ``inter_node_gbps``
    GB/s per device and direction within a node (NVLink) and between nodes (InfiniBand / RoCE);
    ``mfu`` the fraction of peak the step-time estimate assumes.
    """

    memory_gb: float | None = Field(default=None, gt=0)
    peak_tflops: float = Field(default=0.05, gt=0)
    fp8: bool = False
    intra_node_gbps: float = Field(default=2.0, gt=0)
    inter_node_gbps: float = Field(default=2.0, gt=0)
    mfu: float = Field(default=0.4, gt=0, le=1)


class ClusterSpec(_Strict):
    """Where ranks run: ``nodes x devices_per_node`` devices; one rank per device.

    A job may use fewer ranks than there are devices: it runs on all ``nodes`` nodes, each holding whole
    tensor-parallel groups, as evenly as they split (:meth:`ranks_per_node`; 8 ranks of TP 2 on 3 nodes of 4
    devices: 4 + 2 + 2), so a node may leave devices idle.

    ``simulated: true`` runs every rank as a CPU process (gloo): on this machine over 127.0.0.1, or on the
    hosts of a simulated multi-host cluster (``v4train sim-cluster``).
    ``collective_timeout_s`` bounds how long any collective may block, so a stalled peer fails the step;
    ``heartbeat_timeout_s`` is how long the supervisor waits without any rank making progress before it
    declares a stall and names the least advanced rank.

    ``interface`` names the network interface of the data plane on every node (gloo's
    ``GLOO_SOCKET_IFNAME``, NCCL's ``NCCL_SOCKET_IFNAME``; e.g. ``ib0``, ``eth1``): the rendezvous listens on
    its address on rank 0's node. Without it, each node uses the address Ray uses for it and the interface
    holding that address (``orchestrator/control/rendezvous.py``).

    ``address`` names a running Ray cluster's job server (its dashboard, ``http://HEAD:8265``): ``v4train
    submit`` then submits the supervisor there as a Ray job (``orchestrator/tools/jobs.py``) instead of starting
    an embedded cluster. ``hardware`` describes one device for ``v4train plan``.
    """

    name: str
    nodes: PositiveInt = 1
    devices_per_node: PositiveInt
    device: Literal["cpu", "gpu"] = "cpu"
    simulated: bool = True
    backend: Literal["gloo", "nccl"] = "gloo"
    address: str | None = None
    interface: str | None = None
    threads_per_rank: PositiveInt = 1
    collective_timeout_s: float = Field(default=300.0, gt=0)
    heartbeat_timeout_s: float = Field(default=60.0, gt=0)
    ray: RaySpec = RaySpec()
    hardware: HardwareSpec = HardwareSpec()

    @property
    def world_size(self) -> int:
        """How many devices the cluster offers: ``nodes x devices_per_node``."""
        return self.nodes * self.devices_per_node

    def ranks_per_node(self, world_size: int, tp: int) -> tuple[int, ...]:
        """How many of a job's ``world_size`` ranks each node holds (``[nodes]``, whole tensor-parallel groups
        of ``tp`` ranks; ``orchestrator/tools/placement.py``). Raises SpecError naming the field when the job
        does not fit the nodes."""
        try:
            return ranks_per_node(world_size, tp, self.nodes, self.devices_per_node)
        except ValueError as exc:
            raise SpecError(f"{exc} (cluster {self.name})") from None
