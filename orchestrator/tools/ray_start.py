"""``ray start`` with a patient node registration, for the simulated cluster's nodes (``sim_cluster.py``).

Ray 2.x's ``ray start`` gives a new node 30 s (a constant in ``ray._private.node.Node.__init__``) to appear
in the GCS, polling ``ray._private.services.get_node``; a raylet waits first for its agents (Python
processes) to start, which on a loaded machine takes longer, and the node then gives up. Here
``get_node`` itself waits up to :data:`REGISTER_WAIT_S` before it reports the node missing, and the raylet's
own wait (``RAY_raylet_start_wait_time_s``) is raised to match. Run as
``python -m v4train.orchestrator.tools.ray_start START_ARGS...``.
"""

from __future__ import annotations

import os
import sys
import time

REGISTER_WAIT_S = 300.0

__all__ = ["patient_get_node", "REGISTER_WAIT_S", "main"]


def patient_get_node(get_node):
    """``get_node`` retried on RuntimeError (node not registered yet) for up to REGISTER_WAIT_S seconds."""

    def wrapped(*args, **kwargs):
        deadline = time.monotonic() + REGISTER_WAIT_S
        while True:
            try:
                return get_node(*args, **kwargs)
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)

    return wrapped


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("RAY_raylet_start_wait_time_s", str(int(REGISTER_WAIT_S)))
    import ray._private.services as services
    from ray.scripts.scripts import cli

    services.get_node = patient_get_node(services.get_node)
    return cli.main(args=["start", *(sys.argv[1:] if argv is None else argv)], prog_name="ray")


if __name__ == "__main__":
    sys.exit(main())
