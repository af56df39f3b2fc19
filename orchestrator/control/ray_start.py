"""Start (or join) the embedded local Ray cluster, importing nothing of torch: the ``v4train submit`` driver
starts Ray while another thread imports the supervisor and the rank group (``orchestrator/tools/cli.py``)."""

from __future__ import annotations

import logging
import os

import ray

__all__ = ["start_ray"]


def start_ray(num_cpus: int, object_store_memory_mb: int, address: str | None = None) -> None:
    """Start (or join) the embedded local Ray cluster.

    Token auth off for the local cluster, logical CPUs >= ranks, a small object store (only small control
    messages travel through Ray), no dashboard, worker logs kept out of the driver's terminal.

    ``address`` (or ``RAY_ADDRESS``, which Ray sets for a job's entrypoint) joins that running cluster
    instead; its resources are the cluster's own, so ``num_cpus`` and the object store size are not used.
    Without either a new local cluster always starts, never one found on this machine by ``ray start``.
    """
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is not None:
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        return
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
             object_store_memory=object_store_memory_mb * 1024 * 1024, log_to_driver=False,
             logging_level=logging.WARNING)
