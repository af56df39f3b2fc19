"""Spawning gloo rank processes for the multi-process unit tests (not a test module).

Each test's rank function writes its results to a file; :func:`spawn_ranks` starts the ranks, waits for
them within a deadline and, past it, kills them and fails the test, so a hang is a failure, never a wait.
"""

from __future__ import annotations

import time

import pytest
import torch.multiprocessing as mp

from v4train.orchestrator.control import rendezvous


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free now on every local address, below the ephemeral range
    (:func:`rendezvous.free_port`), for the ranks' rendezvous."""
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(rendezvous.free_port())
    return sorted(ports)


def spawn_ranks(main, args: tuple, nprocs: int, deadline_s: float, what: str) -> None:
    """Run ``main(rank, *args)`` in ``nprocs`` spawned processes until all exit; re-raise a rank's error.

    Raises (pytest.fail) when they have not finished within ``deadline_s`` seconds, naming ``what``,
    after killing them.
    """
    context = mp.start_processes(main, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + deadline_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{what} did not finish within {deadline_s} s")


def run_in_world(main, args: tuple, world_size: int, layout: dict, deadline_s: float, what: str) -> list:
    """Run ``main(pctx, *args)`` on ``world_size`` spawned gloo ranks joined in Megatron's groups for ``layout``
    (the keyword arguments of ``parallel.groups.initialize``: tp, pp, ep, dp, cp); returns each rank's return
    value, in rank order (anything ``torch.save`` takes).

    ``main`` must be a module-level function (the ranks import it by name). A rank's error is re-raised; a
    hang fails the test after ``deadline_s`` seconds, naming ``what`` (:func:`spawn_ranks`).
    """
    import tempfile
    from pathlib import Path

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        spawn_ranks(_world_rank, (main, args, world_size, layout, free_ports(1)[0], tmp), world_size, deadline_s,
                    what)
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(world_size)]


def _world_rank(rank: int, main, args: tuple, world_size: int, layout: dict, port: int, out_dir: str) -> None:
    from pathlib import Path

    import torch
    import torch.distributed as dist

    from v4train.parallel import groups

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        pctx = groups.initialize(**{"tp": 1, "pp": 1, "ep": 1, "dp": 1, **layout})
        torch.save(main(pctx, *args), Path(out_dir) / f"rank{rank}.pt")
    finally:
        groups.destroy()
        dist.destroy_process_group()
