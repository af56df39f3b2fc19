"""The Ray actor shell of one rank: owns a :class:`orchestrator.rank.trainer.RankTrainer` and runs what
:class:`orchestrator.control.ray_group.RayRankGroup` asks of it.

Operations arrive as functions of the trainer (``RankTrainer.train_step`` and its siblings, pickled by
reference), so the actor has no forwarding method per operation and every call is type-checked where it
is written. Heartbeats are answered on their own concurrency group while a step runs.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import sys
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import psutil
import ray
import torch.distributed as dist

from v4train.orchestrator.control import rendezvous
from v4train.orchestrator.control.rank_group import RankInfo, SetupRequest
from v4train.orchestrator import faults
from v4train.orchestrator.faults import NODE_KINDS, parse_fault
from v4train.orchestrator.rank.phase_clock import PhaseClock
from v4train.orchestrator.rank.saved_copies import SavedCopies
from v4train.orchestrator.rank.trainer import RankTrainer

__all__ = ["RankWorker"]

T = TypeVar("T")
log = logging.getLogger(__name__)


class RankWorker:
    """One rank (a Ray actor).

    Args:
        log_path: file receiving this rank's stdout/stderr and logging (None keeps Ray's defaults).
    """

    def __init__(self, log_path: str | None = None) -> None:
        if log_path:
            Path(log_path).parent.mkdir(parents=True, exist_ok=True)
            stream = open(log_path, "a", buffering=1)  # noqa: SIM115 - lives as long as the actor
            os.dup2(stream.fileno(), 1)
            os.dup2(stream.fileno(), 2)
            sys.stdout = sys.stderr = stream
            logging.basicConfig(stream=stream, level=logging.INFO, force=True,
                                format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        # the process's start until now: Ray's worker start and every import above (torch, Megatron-core)
        log.info("process up in %.2f s (%.2f CPU s)", time.time() - psutil.Process().create_time(), time.process_time())
        self.trainer: RankTrainer | None = None
        self.listener: rendezvous.RendezvousListener | None = None
        self.node_faults: set[tuple[str, int]] = set()
        self.own_host = False
        self.interface: str | None = None
        self.saved = SavedCopies()  # outlives the trainer: a kept rank restores its last commit from memory

    def pid(self) -> int:
        return os.getpid()

    def node_address(self) -> str:
        """The address Ray uses for this actor's node."""
        return ray.util.get_node_ip_address()

    def open_rendezvous(self, interface: str | None) -> tuple[str, int]:
        """On rank 0: hold a free port on this node's data-plane address until :meth:`setup` hands it to the
        rendezvous store; returns ``(address, port)`` for every rank."""
        address, _ = self._data_plane(interface)
        self._release_rendezvous()
        self.listener = rendezvous.RendezvousListener(address)
        return address, self.listener.port

    def preflight(self, request: SetupRequest, address: tuple[str, int], timeout_s: float) -> None:
        """Check that this node has the data-plane interface and reaches ``address`` (rank 0's rendezvous)
        and the checkpoint root; raises :class:`rendezvous.PreflightError` naming the host. The storage
        credentials in ``request.env`` are set first: the probe must use what the rank will have."""
        os.environ.update(request.env)
        self._data_plane(request.interface)
        c = request.job.checkpoint
        rendezvous.preflight(self.node_address(), address, request.checkpoint_root, timeout_s,
                             {"endpoint_url": c.endpoint_url, "region": c.region})

    def setup(self, request: SetupRequest, rank: int, world_size: int, init_method: str) -> RankInfo:
        """Join a job as ``rank`` (credentials in ``request.env`` are set in this process, never logged);
        gloo and NCCL bind to this node's data-plane interface."""
        os.environ.update(request.env)
        node = self.node_address()
        os.environ.update(rendezvous.socket_env(rendezvous.data_plane(request.interface, node)[1]))
        log.info("rank %d of %d on node %s, rendezvous %s", rank, world_size, node, init_method)
        self.close()
        store = self._rendezvous_store(rank, world_size, init_method, request.collective_timeout_s)
        inject = [parse_fault(f) for f in request.faults]
        self.node_faults = {(f.kind, f.step) for f in inject if f.rank == rank and f.kind in NODE_KINDS}
        self.own_host = request.supervisor_node not in (None, ray.get_runtime_context().get_node_id())
        self.interface = rendezvous.data_plane(request.interface, node)[1]
        self.trainer = RankTrainer(
            request.job, rank=rank, world_size=world_size, init_method=init_method,
            timeout_s=request.collective_timeout_s, threads=request.threads, backend=request.backend,
            device=request.device, inject=inject, saved=self.saved, store=store,
        )
        return dataclasses.replace(self.trainer.describe(), node=node)

    def _data_plane(self, interface: str | None) -> tuple[str, str | None]:
        """This node's data-plane (address, interface); a missing interface is a PreflightError."""
        node = self.node_address()
        try:
            return rendezvous.data_plane(interface, node)
        except ValueError as exc:
            raise rendezvous.PreflightError(f"host {node}: {exc}") from None

    def _rendezvous_store(self, rank: int, world_size: int, init_method: str, timeout_s: float) -> dist.TCPStore:
        """This rank's handle on the rendezvous store at ``init_method`` (``tcp://ADDRESS:PORT``). Rank 0 serves
        it on the socket :meth:`open_rendezvous` holds, so the port passes from the probe listener to the store
        without being free in between (it binds the port itself where no listener was opened); the others join.

        Raises:
            torch.distributed.DistStoreError: the store or a peer did not answer within ``timeout_s``.
        """
        url = urllib.parse.urlsplit(init_method)
        timeout = datetime.timedelta(seconds=timeout_s)
        if rank != 0 or self.listener is None:
            self._release_rendezvous()
            return dist.TCPStore(url.hostname, url.port, world_size, is_master=rank == 0, timeout=timeout)
        sock = self.listener.hand_over()
        self.listener = None
        try:
            store = dist.TCPStore(url.hostname, url.port, world_size, is_master=True, timeout=timeout,
                                  master_listen_fd=sock.fileno())
        except BaseException:
            sock.close()
            raise
        sock.detach()  # the store's descriptor now, closed with the store
        return store

    def _release_rendezvous(self) -> None:
        if self.listener is not None:
            self.listener.release()
            self.listener = None

    def run(self, operation: Callable[..., T], *args) -> T:
        """``operation(trainer, *args)``: one of the trainer's methods, passed as a function.

        Node faults (``orchestrator/faults.py``) strike here, at the start of their step: they concern the
        host, not the trainer. A failing operation first leaves this rank's process groups: their
        connections close, so every peer waiting on this rank fails at once instead of at the collective
        timeout, and the process is idle for the next ``setup`` (the supervisor keeps healthy processes
        after a failure).
        """
        if operation is RankTrainer.train_step and self.node_faults:
            step = args[0].step
            if ("node_kill", step) in self.node_faults:
                faults.kill_host(self.own_host)
            if ("partition", step) in self.node_faults:
                self.node_faults.discard(("partition", step))
                faults.cut_link(self.interface or "")
        try:
            return operation(self.trainer, *args)
        except BaseException as exc:
            clock = PhaseClock()
            self.close()
            clock.lap("close")
            log.info("%s failed (%s); left the process groups: %s", operation.__name__,
                     str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__, clock)
            raise

    @ray.method(concurrency_group="heartbeat")
    def heartbeat(self) -> dict:
        """Progress of the running call: step, a counter that moves as work is done, and the phase.

        Answered by the actor's own ``heartbeat`` thread while ``train_step`` runs on the default one.
        """
        return dict(self.trainer.heartbeat) if self.trainer is not None else {"step": 0, "progress": 0, "phase": "idle"}

    @ray.method(concurrency_group="heartbeat")
    def abort(self) -> None:
        """Make the running call raise StepAborted at its next check (a peer failed: waiting for this rank
        to reach a collective with it would only delay the recovery). Answered on the heartbeat thread."""
        trainer = self.trainer
        if trainer is not None:
            trainer.engine.abort.request()

    def close(self) -> None:
        if self.trainer is not None:
            self.trainer.close()
            self.trainer = None
