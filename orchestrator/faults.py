"""Fault injection for tests and recovery drills: ``--inject-fault KIND@STEP[:rank=R]`` (or ``faults:`` in the job).

Kinds (``STEP`` is the 1-based optimizer step; ``rank`` defaults to 0):

==========================  ============================================================================
``kill``                    the rank SIGKILLs itself at the start of the step (peers block in collectives)
``raise``                   the rank raises RuntimeError at the start of the step
``stall``                   the rank sleeps forever at the start of the step, without dying
``nan_grad``                one gradient element of the rank becomes NaN after the backward of the step
``kill_during_save``        the rank SIGKILLs itself after writing its shards of the checkpoint taken after
                            the step; with ``rank=supervisor`` the supervisor kills itself between the
                            last shard and ``COMMIT``
``kill_during_upload``      the rank SIGKILLs itself in the middle of writing its shard file of that
                            checkpoint (half the bytes handed to the storage layer)
``spike``                   the step runs at 1000x its learning rate on every rank (the rank is ignored):
                            a real loss spike at the next steps, for the spike guard
``anticipatory``            anticipatory routing switches on at the step for ``spike_guard.anticipatory_steps``
                            steps, as after a spike (a drill of the routing path; the rank is ignored)
``node_kill``               ``KIND@STEP:node=N``: every process of node ``N`` dies at once at the start of the
                            step: its ranks and, where the node is a Ray node of its own (not the
                            supervisor's), its raylet, which Ray then declares dead
``partition``               ``KIND@STEP:node=N``: node ``N``'s data-plane link goes down at the start of the
                            step; its processes live on but reach no other node (simulated hosts only:
                            ``v4train sim-cluster``)
==========================  ============================================================================

Node faults name a node of the cluster file (its ranks: ``ClusterSpec.ranks_per_node``, whole tensor-parallel
groups in rank order); the supervisor hands each rank of that node its share as ``KIND@STEP:rank=R``.

Each fault fires once: after a recovery the supervisor passes on only the faults that have not fired.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Fault", "parse_fault", "KINDS", "NODE_KINDS", "SUPERVISOR", "SPIKE_LR_FACTOR", "die", "kill_host",
           "cut_link", "stall_forever", "dying_writer", "take_fault"]

KINDS = ("kill", "raise", "stall", "nan_grad", "kill_during_save", "kill_during_upload", "spike", "anticipatory",
         "node_kill", "partition")
NODE_KINDS = ("node_kill", "partition")
SPIKE_LR_FACTOR = 1000.0
SUPERVISOR = -1


@dataclass(frozen=True)
class Fault:
    """One injected fault: ``kind`` at optimizer ``step`` on ``rank`` (SUPERVISOR = the supervisor), or on
    every rank of ``node`` (node faults)."""

    kind: str
    step: int
    rank: int = 0
    node: int | None = None

    def __str__(self) -> str:
        if self.node is not None:
            return f"{self.kind}@{self.step}:node={self.node}"
        who = "supervisor" if self.rank == SUPERVISOR else str(self.rank)
        return f"{self.kind}@{self.step}:rank={who}"

    def on_ranks(self, rank_nodes: list[int]) -> list[Fault]:
        """This fault as one per rank: a node fault on each rank of its node (``rank_nodes[r]``: rank ``r``'s
        node), else itself."""
        if self.node is None:
            return [self]
        return [Fault(self.kind, self.step, rank=r) for r, node in enumerate(rank_nodes) if node == self.node]


def parse_fault(text: str) -> Fault:
    """Parse ``KIND@STEP[:rank=R]`` or, for node faults, ``KIND@STEP:node=N``; raises ValueError saying
    what is wrong."""
    head, _, tail = text.partition(":")
    kind, at, step = head.partition("@")
    if kind not in KINDS:
        raise ValueError(f"{text!r}: unknown fault kind {kind!r} (one of {', '.join(KINDS)})")
    if not at or not step.isdigit() or int(step) < 1:
        raise ValueError(f"{text!r}: expected KIND@STEP with STEP >= 1")
    rank = 0
    key, eq, value = tail.partition("=")
    if kind in NODE_KINDS and key != "rank":
        if key != "node" or not eq or not value.isdigit():
            raise ValueError(f"{text!r}: expected {kind}@STEP:node=N with N a node index")
        return Fault(kind, int(step), node=int(value))
    if tail:
        if key != "rank" or not eq:
            raise ValueError(f"{text!r}: expected ':rank=R' after the step")
        if value == "supervisor":
            if kind != "kill_during_save":
                raise ValueError(f"{text!r}: only kill_during_save can target the supervisor")
            rank = SUPERVISOR
        elif value.isdigit():
            rank = int(value)
        else:
            raise ValueError(f"{text!r}: rank must be a non-negative integer or 'supervisor'")
    return Fault(kind, int(step), rank)


def take_fault(pending: list[Fault], kind: str, step: int) -> bool:
    """Remove a pending fault of ``kind`` at ``step`` from ``pending``; whether there was one."""
    fault = next((f for f in pending if f.kind == kind and f.step == step), None)
    if fault is not None:
        pending.remove(fault)
    return fault is not None


def die() -> None:
    """SIGKILL this process: no cleanup, no exception, exactly like an OOM kill or a lost node."""
    os.kill(os.getpid(), signal.SIGKILL)


def kill_host(own_ray_node: bool) -> None:
    """A lost machine, from one of its Ray worker processes: SIGKILL the raylet (this process's parent) when
    the node is a Ray node of its own, then this process."""
    if own_ray_node:
        os.kill(os.getppid(), signal.SIGKILL)
    die()


def cut_link(interface: str) -> None:
    """Take ``interface`` down in this process's network namespace. Refused (RuntimeError) unless that is a
    simulated host's namespace (``v4train sim-cluster`` names them ``v4sim-*``): the drill never touches a
    machine's real links."""
    own = os.stat("/proc/self/ns/net").st_ino
    run = Path("/run/netns")
    simulated = run.is_dir() and any(p.name.startswith("v4sim-") and p.stat().st_ino == own for p in run.iterdir())
    if not simulated:
        raise RuntimeError(f"partition drill: refusing to take {interface} down outside a simulated host's network "
                           "namespace (run it on a simulated cluster: v4train sim-cluster)")
    subprocess.run(["ip", "link", "set", interface, "down"], check=True, capture_output=True)


def stall_forever() -> None:
    """Block without dying and without consuming CPU."""
    while True:
        time.sleep(3600)


class _HalfThenDie:
    """A writable stream that passes on half of the first write, then kills the process."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, data) -> int:
        view = memoryview(data)
        self._stream.write(view[: max(1, len(view) // 2)])
        self._stream.flush()
        die()
        return 0  # unreachable

    def __getattr__(self, name):
        return getattr(self._stream, name)


def dying_writer(writer):
    """Wrap a DCP fsspec storage writer so the first shard write dies halfway (``kill_during_upload``)."""
    fs = writer.fs
    create_stream = fs.create_stream

    @contextlib.contextmanager
    def patched(path, mode):
        with create_stream(path, mode) as stream:
            yield _HalfThenDie(stream) if "w" in mode and not str(path).endswith("metadata") else stream

    fs.create_stream = patched
    return writer
