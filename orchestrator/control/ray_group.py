"""The ranks as Ray actors driven from one supervisor process (the control plane of docs/architecture.md section 3).

:class:`RayRankGroup` starts one :class:`orchestrator.rank.worker.RankWorker` actor per rank in a placement
group and runs each operation of :class:`orchestrator.control.rank_group.RankGroup` on all of them. Any
failure becomes a :class:`RankFailure` naming the rank: an exception or a dead actor as soon as Ray reports
it (the other ranks may still be blocked in a collective), a stall when no rank's heartbeat moves for the
call's timeout, a node loss when every rank of one node dies or stops answering heartbeats
(:mod:`orchestrator.control.node_watch`).

After a failure :meth:`RayRankGroup.rejoin` keeps the healthy rank processes: every survivor is asked to
abandon its call (``RankWorker.abort``: a replica of a dead rank would otherwise compute its whole step
before its next collective with it fails), a rank whose call fails leaves its process groups at once
(``RankWorker.run``), so every peer blocked on it fails too and the survivors come back idle; only the
failed rank's process is replaced, by a spare actor started ahead of time (its imports of torch and
Megatron-core already done). The next ``setup`` re-forms the process groups in the same processes, and the
survivors restore the last commit from their in-memory copy of what they wrote (``rank/saved_copies.py``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import ray

from v4train.orchestrator.control import node_placement, rendezvous
from v4train.orchestrator.control.decisions import EvalRequest
from v4train.orchestrator.control.node_watch import NodeWatch
from v4train.orchestrator.control.ray_start import start_ray
from v4train.orchestrator.control.rank_group import RankFailure, RankInfo, RankSave, SetupRequest
from v4train.orchestrator.curriculum import StepPlan
from v4train.orchestrator.rank.phase_clock import PhaseClock
from v4train.orchestrator.rank.trainer import RankTrainer
from v4train.orchestrator.rank.worker import RankWorker

__all__ = ["RayRankGroup", "start_ray", "start_spare", "PREFLIGHT_TIMEOUT_S"]

# How long a node may take to connect to the rendezvous before it counts as unreachable (seconds).
PREFLIGHT_TIMEOUT_S = 5.0
# How long new rank actors may take to start (seconds). An actor answers nothing, heartbeats included, until
# its process has imported torch and Megatron-core, which on a loaded machine takes minutes (Ray runs its
# workers at niceness 15); counted against the call's stall timeout, a whole new group (after a node loss)
# would fail as a stall of rank 0 before it reached the rendezvous.
START_TIMEOUT_S = 600.0
# How long a placement group may take to be ready before the live nodes are asked again and the group
# placed anew (seconds): a node may be lost between the question and the placement.
PLACE_RETRY_S = 15.0


def start_spare(log_path: str | None = None):
    """Start an idle RankWorker actor that can take a failed rank's place (its imports done by then).

    It reserves no logical CPU while it waits (on a CPU cluster a rank's CPU is a scheduling label only).
    """
    return ray.remote(num_cpus=0, max_restarts=0, concurrency_groups={"heartbeat": 1})(RankWorker).remote(log_path)


class RayRankGroup:
    """The rank actors of one job, addressed together.

    Args:
        actors: one RankWorker actor handle per rank (index = rank).
        timeout_s: bound on any call without progress: when no rank's heartbeat moves for this long, the
            call fails as a stall of the least advanced rank.
        poll_s: how often heartbeats are read while a call runs.
        grace_s: after a first failure, how long to wait for the others before naming the root cause.
        owned: whether :meth:`shutdown` kills the actors (False for actors borrowed from a longer-lived
            pool); :meth:`abort` kills them either way.
        spares: idle actors started ahead of time that :meth:`rejoin` puts in a failed rank's place.
        make_spare: starts one more spare actor; without spares or this, :meth:`rejoin` cannot replace a
            dead rank and declines.
        spares_wanted: how many spares each training step tops the group up to (default: ``len(spares)``).
    """

    launcher = "ray"

    def __init__(self, actors: list, timeout_s: float, poll_s: float = 1.0, owned: bool = True,
                 grace_s: float = 3.0, spares: list | None = None, make_spare: Callable | None = None,
                 spares_wanted: int | None = None) -> None:
        self.actors = actors
        self.world_size = len(actors)
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.grace_s = grace_s
        self.owned = owned
        self.placement_group = None
        self.spares = list(spares or [])
        self.make_spare = make_spare
        self.spares_wanted = len(self.spares) if spares_wanted is None else spares_wanted
        self._in_flight: list = []  # refs of the last call, one per rank
        self.nodes: list[str] = []  # each rank's node address, once set up
        self.setup_laps: dict[str, float] = {}  # wall seconds of the last setup's parts (the start event's)

    @classmethod
    def create(cls, world_size: int, timeout_s: float, log_dir: str | None = None,
               gpus_per_rank: int = 0, shares: Sequence[int] | None = None, spares: int = 1) -> RayRankGroup:
        """Start ``world_size`` RankWorker actors in one placement group, and ``spares`` idle ones outside it
        once the first step has run.

        ``gpus_per_rank`` (1 on a GPU cluster) makes each actor hold that many GPUs; there a spare would
        hold a GPU it does not use, so none is started and a failed rank is replaced by a new actor. On CPU a
        spare reserves no logical CPU: it only waits, its imports done. The bundles go on the nodes that are
        alive now (``node_placement.live_nodes``: Ray's alive nodes whose raylet answers, so a node lost
        moments ago is left out at once and a replacement node is used): with ``shares`` of several nodes
        (``ClusterSpec.ranks_per_node``: node ``i`` holds the next ``shares[i]`` ranks, whole tensor-parallel
        groups; default all on one node) and a live node holding each share, one bundle per node, pinned to
        it (``STRICT_SPREAD``, the supervisor's node first): consecutive ranks (a tensor-parallel group,
        Megatron's rank order) share a node, pipeline stages and data-parallel replicas spread over nodes
        (``orchestrator/tools/placement.py`` gives the map). Otherwise (one Ray node simulating them, or
        fewer live after a node loss) one bundle per rank, packed on the live nodes.
        """
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        per_rank = {"CPU": 1, **({"GPU": gpus_per_rank} if gpus_per_rank else {})}
        shares = tuple(shares or (world_size,))
        if sum(shares) != world_size:
            raise ValueError(f"shares {shares} hold {sum(shares)} ranks, not the group's {world_size}")
        pg, bundle_of = node_placement.place_group(shares, per_rank, timeout_s, PLACE_RETRY_S)
        # The rank's work runs on one thread (torch's intra-op thread count is per thread: a thread pool
        # would change reduction orders between calls); heartbeats are answered by a second group.
        remote_cls = ray.remote(num_cpus=1, num_gpus=gpus_per_rank, max_restarts=0,
                                concurrency_groups={"heartbeat": 1})(RankWorker)
        actors = [
            remote_cls.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle_of[r]),
            ).remote(str(Path(log_dir) / f"rank_{r}.log") if log_dir else None)
            for r in range(world_size)
        ]
        counter = iter(range(1 << 30))

        def make_spare():
            return start_spare(str(Path(log_dir) / f"spare_{next(counter)}.log") if log_dir else None)

        # The spares start after the first step (train_step tops them up), not beside the ranks: on a machine
        # whose cores the ranks share, a spare importing torch now would delay the ranks' own start.
        n_spares = 0 if gpus_per_rank else spares
        group = cls(actors, timeout_s, make_spare=make_spare if n_spares else None, spares_wanted=n_spares)
        group.placement_group = pg
        return group

    # ---------------------------------------------------------------- the RankGroup operations
    def coordinate(self, fn):
        return fn()

    def setup(self, request: SetupRequest, timeout_s: float) -> list[RankInfo]:
        """Every rank's process is started (bounded by :data:`START_TIMEOUT_S`); rank 0 opens the rendezvous on
        its node's data-plane address; every rank checks that it reaches it and the checkpoint root
        (:func:`rendezvous.preflight`, a failure is ``unreachable``), then joins."""
        clock = PhaseClock()
        request = dataclasses.replace(request, supervisor_node=ray.get_runtime_context().get_node_id())
        self._wait([a.pid.remote() for a in self.actors], "start", max(timeout_s, START_TIMEOUT_S))
        clock.lap("processes")
        address = self._wait([self.actors[0].open_rendezvous.remote(request.interface)], "rendezvous", timeout_s)[0]
        self._wait([a.preflight.remote(request, address, PREFLIGHT_TIMEOUT_S) for a in self.actors], "preflight",
                   timeout_s)
        clock.lap("rendezvous")
        init_method = rendezvous.tcp_url(*address)
        refs = [a.setup.remote(request, r, self.world_size, init_method) for r, a in enumerate(self.actors)]
        infos = self._wait(refs, "setup", timeout_s)
        clock.lap("setup")
        self.setup_laps = {k: round(v, 3) for k, v in clock.laps.items()}
        self.nodes = [i.node for i in infos]
        return infos

    def train_step(self, plan: StepPlan) -> list[dict]:
        results = self._run(RankTrainer.train_step, plan)
        # a spare used by a recovery is replaced once training runs again, off the recovery's critical path
        while self.make_spare is not None and len(self.spares) < self.spares_wanted:
            self.spares.append(self.make_spare())
        return results

    def evaluate(self, request: EvalRequest) -> list[dict]:
        return self._run(RankTrainer.evaluate, request)

    def save(self, root: str, attempt: str, asynchronous: bool, timeout_s: float) -> list[RankSave]:
        return self._run(RankTrainer.save, root, attempt, asynchronous, timeout_s=timeout_s)

    def save_done(self, timeout_s: float) -> bool:
        return all(self._run(RankTrainer.save_done, timeout_s=timeout_s))

    def wait_saved(self, timeout_s: float) -> None:
        self._run(RankTrainer.wait_saved, timeout_s=timeout_s)

    def load(self, root: str, name: str, train_state: dict, timeout_s: float) -> list[int]:
        return self._run(RankTrainer.load, root, name, train_state, timeout_s=timeout_s)

    def rollback(self, newest_allowed: int, skip_data: bool) -> list[int]:
        return self._run(RankTrainer.rollback, newest_allowed, skip_data)

    def loader_state(self) -> dict:
        return self._run(RankTrainer.loader_state)[0]  # global: the same on every rank

    def set_loader_state(self, state: dict) -> None:
        self._run(RankTrainer.set_loader_state, state)

    def shutdown(self) -> None:
        """End of a job: kill the actors and release the placement group if this group owns them."""
        if self.owned:
            self.abort()

    def abort(self) -> None:
        """Kill every actor (survivors may be blocked in a collective) and release the placement group."""
        for actor in self.actors + self.spares:
            ray.kill(actor, no_restart=True)
        self.spares = []
        if self.placement_group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.placement_group)

    def rejoin(self, failure: RankFailure, timeout_s: float) -> bool:
        """After ``failure``: keep the healthy ranks' processes for the next :meth:`setup` and replace the
        failed one (killed if it died or stalled; a rank that raised keeps its process). Returns False,
        leaving the group to :meth:`abort`, when a survivor's call has not returned within ``timeout_s``, no
        replacement can be had, or the failure is a node's (``node_lost``, ``unreachable``).
        """
        if failure.kind not in ("exception", "died", "stall"):
            return False  # a lost or unreachable node takes several ranks: rebuild the group on the nodes left
        replace = failure.kind in ("died", "stall")
        if replace:
            if not self.spares and self.make_spare is None:
                return False
            ray.kill(self.actors[failure.rank], no_restart=True)  # a stalled rank must let its peers go
        kept = [r for r in range(self.world_size) if not (replace and r == failure.rank)]
        self._abort_calls(kept)
        survivors = [self._in_flight[r] for r in kept if r < len(self._in_flight)]
        _, unfinished = ray.wait(survivors, num_returns=len(survivors), timeout=timeout_s)
        if unfinished:
            return False
        if replace:
            self.actors[failure.rank] = self.spares.pop(0) if self.spares else self.make_spare()
        self._in_flight = []
        return True

    def _abort_calls(self, ranks: list[int]) -> None:
        """Ask ``ranks`` to abandon their running call: a survivor learns of a peer's death only at its next
        collective with it, which may be a whole step away."""
        for r in ranks:
            self.actors[r].abort.remote()

    # ---------------------------------------------------------------- calls, failures, heartbeats
    def _run(self, fn: Callable, *args, timeout_s: float | None = None) -> list:
        """``fn(trainer, *args)`` on every rank's trainer; results ordered by rank."""
        return self._wait([a.run.remote(fn, *args) for a in self.actors], fn.__name__, timeout_s, watch_nodes=True)

    def _wait(self, refs: list, method: str, timeout_s: float | None, watch_nodes: bool = False) -> list:
        """Results of ``refs`` (one per rank). Raises RankFailure for the first rank that raises or dies (as
        soon as Ray reports it), or, when no rank has made progress for ``timeout_s`` (default: the group's),
        a stall of the least advanced unfinished rank. With ``watch_nodes`` (a call of set-up ranks on
        several nodes), a node whose every rank stops answering heartbeats while other nodes' ranks answer
        is a ``node_lost`` (:class:`NodeWatch`)."""
        stall_after = self.timeout_s if timeout_s is None else timeout_s
        self._in_flight = list(refs)
        rank_of = {ref: r for r, ref in enumerate(refs)}
        pending = list(refs)
        last_beats, last_change = None, time.monotonic()
        watch = NodeWatch(self.nodes, last_change) if watch_nodes and self._multi_node else None
        while pending:
            done, pending = ray.wait(pending, num_returns=1, timeout=self.poll_s)
            if done:
                failure = self._failure_of(done[0], rank_of[done[0]], method)
                if failure is not None:
                    raise self._root_failure(failure, pending, rank_of, method)
                last_change = time.monotonic()
                continue
            beats = self._heartbeats(sorted(rank_of[p] for p in pending), method)
            if watch is not None and (lost := watch.observe(beats, time.monotonic(), method)) is not None:
                raise lost
            if beats != last_beats:
                last_beats, last_change = beats, time.monotonic()
            elif time.monotonic() - last_change > stall_after:
                rank = min(beats, key=lambda r: (beats[r]["step"], beats[r]["progress"]))
                raise RankFailure(rank, "stall", f"no progress for {stall_after:.0f} s "
                                  f"(step {beats[rank]['step']}, phase {beats[rank]['phase']})", method)
        return ray.get(refs)

    def _failure_of(self, ref, rank: int, method: str) -> RankFailure | None:
        try:
            ray.get(ref)
        except _RANK_GONE as exc:
            return RankFailure(rank, "died", _first_line(exc), method)
        except ray.exceptions.RayTaskError as exc:
            if isinstance(getattr(exc, "cause", None), rendezvous.PreflightError):
                return RankFailure(rank, "unreachable", str(exc.cause), method)
            return RankFailure(rank, "exception", _root_cause(exc), method)
        return None

    def _root_failure(self, first: RankFailure, pending: list, rank_of: dict, method: str) -> RankFailure:
        """The root cause among the failures seen within ``grace_s`` of the first one.

        When a rank dies, its peers' collectives fail with connection errors, often before Ray reports
        the death; a dead rank or a rank's own exception outranks such consequences.
        """
        failures = [first]
        deadline = time.monotonic() + self.grace_s
        # after a death keep collecting for the grace period: every rank of one node dying is a node loss
        while pending and (min(map(_severity, failures)) > 0 or self._multi_node) and time.monotonic() < deadline:
            finished, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            failures += [f for ref in finished if (f := self._failure_of(ref, rank_of[ref], method)) is not None]
        root = min(failures, key=_severity)
        return self._node_loss(root, failures) or root

    @property
    def _multi_node(self) -> bool:
        return len(set(self.nodes)) > 1

    def _node_loss(self, root: RankFailure, failures: list[RankFailure]) -> RankFailure | None:
        """A ``node_lost`` failure when every rank of the dead root rank's node died (and ranks ran on
        other nodes), else None."""
        if root.kind != "died" or not self._multi_node:
            return None
        node = self.nodes[root.rank]
        on_node = [r for r, n in enumerate(self.nodes) if n == node]
        died = {f.rank for f in failures if f.kind == "died"}
        if not set(on_node) <= died:
            return None
        return RankFailure(root.rank, "node_lost", f"node {node} lost: ranks {on_node[0]}-{on_node[-1]} died "
                           f"({root.message})", root.method)

    def _heartbeats(self, ranks: list[int], method: str) -> dict[int, dict]:
        """Heartbeats of ``ranks``; a rank that cannot answer within ``poll_s`` reads as phase ``unresponsive``
        (what :class:`NodeWatch` counts)."""
        refs = {r: self.actors[r].heartbeat.remote() for r in ranks}
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=self.poll_s)
        beats = {}
        for r, ref in refs.items():
            if ref in ready:
                try:
                    beats[r] = ray.get(ref)
                except _RANK_GONE as exc:
                    raise RankFailure(r, "died", _first_line(exc), method) from None
            else:
                beats[r] = {"step": -1, "progress": -1, "phase": "unresponsive"}
        return beats


# Ray's errors for a rank whose process is gone: killed or crashed (RayActorError), killed by Ray's memory
# monitor when its node ran low on memory (OutOfMemoryError, not a RayActorError), or lost with its node.
_RANK_GONE = (ray.exceptions.RayActorError, ray.exceptions.OutOfMemoryError, ray.exceptions.WorkerCrashedError,
              ray.exceptions.NodeDiedError)

# Messages of errors that are consequences of another rank's failure (a peer gone or silent).
_PEER_ERRORS = ("Connection closed by peer", "Connection reset", "Timed out", "timed out", "gloo", "Socket")


def _severity(failure: RankFailure) -> int:
    """Lower is more likely the root cause: a dead rank, a rank's own error, a stall, a peer's collective error."""
    if failure.kind in ("died", "unreachable", "node_lost"):
        return 0
    if failure.kind == "stall":
        return 2
    return 3 if any(p in failure.message for p in _PEER_ERRORS) else 1


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _root_cause(exc) -> str:
    cause = getattr(exc, "cause", None)
    if cause is not None:
        return f"{type(cause).__name__}: {cause}"
    return _first_line(exc)
