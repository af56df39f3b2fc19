"""One rank of a job: the operations the supervisor's rank group calls, whatever drives the process.

:class:`RankTrainer` joins the job's torch.distributed world and Megatron's parallel groups, then composes
the rank's parts, one module each: the step engine (``engine.py``: model stage, optimizer, data, schedule),
checkpoint I/O (``checkpoint_io.py``), in-memory snapshots for spike rollbacks (``snapshots.py``) and the
anticipatory-routing capture and replay (``orchestrator/recovery/anticipatory_routing.py``). The Ray actor
(``worker.py``), the torchrun group and tests call its methods directly; only the plan and small results
cross the control plane.
"""

from __future__ import annotations

import datetime
import logging
import math
import resource
import time

import torch
import torch.distributed as dist

from v4train.model.moe import set_routing_tape
from v4train.orchestrator import checkpoint, faults
from v4train.orchestrator.control.decisions import EvalRequest
from v4train.orchestrator.control.rank_group import RankInfo, RankSave
from v4train.orchestrator.curriculum import StepPlan, plan_step
from v4train.orchestrator.rank import host_allocator, router_health
from v4train.orchestrator.rank.checkpoint_io import RankCheckpointIO
from v4train.orchestrator.rank.engine import StepEngine
from v4train.orchestrator.rank.devices import resolve_placement
from v4train.orchestrator.rank.phase_clock import PhaseClock
from v4train.orchestrator.rank.saved_copies import SavedCopies
from v4train.orchestrator.rank.snapshots import SnapshotRing
from v4train.orchestrator.recovery import anticipatory_routing as routing
from v4train.orchestrator.spec import JobSpec
from v4train.parallel import groups
from v4train.parallel.optim import describe_assignment

__all__ = ["RankTrainer"]

log = logging.getLogger(__name__)


class RankTrainer:
    """One rank of a training job.

    Args:
        job: the validated job spec (identical on every rank).
        rank: global rank in ``[0, world_size)``.
        world_size: number of ranks, equal to ``tp * cp * pp * dp``.
        init_method: torch.distributed rendezvous, e.g. ``tcp://127.0.0.1:29500``.
        store: a rendezvous store to join through instead of ``init_method``'s
            (:func:`orchestrator.control.elastic_restart.attempt_store`).
        timeout_s: bound on every collective (seconds); a stalled peer fails the step instead of hanging.
        threads: intra-op CPU threads for this rank.
        backend: ``gloo`` (CPU) or ``nccl`` (GPU).
        device: ``cpu`` or ``gpu`` (the cluster file's); with ``backend`` and ``train.fp8`` resolved by
            :func:`orchestrator.rank.devices.resolve_placement` before anything else (PlacementError if
            this process cannot run them).
        inject: faults (see ``orchestrator/faults.py``) this rank must produce; others are ignored.
        saved: the process's copies of what it wrote into its latest checkpoint saves
            (:mod:`orchestrator.rank.saved_copies`); they outlive the trainer, so a rank kept after a peer's
            failure restores the committed checkpoint from memory. None: a new, empty store.
    """

    def __init__(self, job: JobSpec, *, rank: int, world_size: int, init_method: str, timeout_s: float,
                 threads: int = 1, backend: str = "gloo", device: str = "cpu",
                 inject: list[faults.Fault] = (), saved: SavedCopies | None = None,
                 store: dist.Store | None = None) -> None:
        self.placement = resolve_placement(device, backend, job.train.fp8)
        if self.placement.device.type == "cuda":
            torch.cuda.set_device(self.placement.device)
        if rank == 0:  # the Ray worker's log (torchrun's launch prints it before the rank starts)
            log.info("rank placement: %s", self.placement.describe())
        self.job = job
        self.rank = rank
        self.faults = {(f.kind, f.step): f for f in inject if f.rank == rank}
        torch.set_num_threads(threads)
        host_allocator.keep_freed_memory()
        clock = PhaseClock()
        if dist.is_initialized():
            groups.destroy()
            dist.destroy_process_group()
        clock.lap("left_old_groups")
        rendezvous = {"store": store} if store is not None else {"init_method": init_method}
        dist.init_process_group(self.placement.backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout_s), **rendezvous)
        clock.lap("process_group")
        p = job.parallel
        self.pctx = groups.initialize(tp=p.tp, pp=p.pp, ep=p.ep, dp=p.dp, cp=p.cp,
                                      timeout_minutes=max(1, math.ceil(timeout_s / 60)))
        clock.lap("megatron_groups")
        self.engine = StepEngine(job, self.pctx, self.placement)
        clock.lap("engine")
        self.step = 0
        self.io = RankCheckpointIO(job, self.faults, timeout_s)
        clock.lap("save_group")
        self.snapshots = SnapshotRing(keep=2)
        self.saved = saved if saved is not None else SavedCopies()
        self.restored_from: str | None = None  # "memory" or "storage", after load
        self.routing = routing.RoutingRows()
        self.engine.heartbeat["phase"] = "ready"
        log.info("rank %d set up in %s", rank, clock)

    @property
    def heartbeat(self) -> dict:
        return self.engine.heartbeat

    @property
    def is_reporter(self) -> bool:
        """The rank whose metrics the supervisor records: last pipeline stage, data-, context- and
        tensor-parallel rank 0."""
        p = self.pctx
        return p.is_last_stage and p.dp_rank == 0 and p.cp_rank == 0 and p.tp_rank == 0

    def describe(self) -> RankInfo:
        """Rank, layout coordinates and parameter count of this rank's stage."""
        e = self.engine
        return RankInfo(
            rank=self.rank, pp_rank=self.pctx.pp_rank, dp_rank=self.pctx.dp_rank, tp_rank=self.pctx.tp_rank,
            cp_rank=self.pctx.cp_rank,
            stage_params=sum(p.numel() for p in e.stage.parameters()), reporter=self.is_reporter,
            # one table per pipeline stage (the same on every TP/CP/DP replica of it)
            optimizer_assignment=(describe_assignment(e.optimizer, e.stage.named_parameters())
                                  if self.pctx.dp_rank == 0 and self.pctx.cp_rank == 0 and self.pctx.tp_rank == 0
                                  else None),
        )

    # ---------------------------------------------------------------- training
    def train_step(self, plan: StepPlan) -> dict:
        """Run optimizer step ``plan.step``; return its metrics (meaningful on the reporter rank).

        The plan sets the attention mode and MTP loss weight; in ``indexer_warmup`` only the Lightning
        Indexer's parameters are updated. A step whose global gradient norm is not finite on any rank is
        skipped everywhere: no parameter, optimizer-state or expert-bias change (``skipped: true``).
        Raises RuntimeError if the plan's step is not the next one (the counters must stay global).
        """
        if plan.step != self.step + 1:
            raise RuntimeError(f"rank {self.rank}: asked for step {plan.step} but at step {self.step}")
        self._inject_at_step_start(plan.step)
        e = self.engine
        e.heartbeat = {"step": plan.step, "progress": 0, "phase": "data"}
        start = time.perf_counter()
        step_cpu_start = time.process_time()
        clock = PhaseClock()
        batch = e.loader.next_batch(plan.global_batch, plan.seq_len, self.pctx.dp_rank, self.pctx.dp)
        micro = e.micro_batches(batch, plan.micro_batch_size)
        clock.lap("data")
        e.beat("schedule")
        compute_start = time.process_time()
        loss_dicts, aux_metrics, routing_fingerprint, router_layers = self._forward_backward(plan, micro)
        compute_cpu_s = time.process_time() - compute_start
        clock.lap("forward_backward")
        warmup = plan.attention_mode == "indexer_warmup"
        if warmup:
            # Indexer warm-up trains only the Lightning Indexer (spec 3.3, DSA recipe): every other
            # parameter keeps its value and its optimizer state (AdamW skips a parameter without a grad).
            for p in e.groups.frozen_in_warmup:
                p.grad = None
        self._inject_nan_grad(plan.step)
        e.beat("grad_sync")
        router_metrics = router_health.reduce(router_layers, self.pctx.data_group)  # every token once
        e.sync_gradients()
        grad_norm, finite = e.clip_gradients()
        clock.lap("grad_sync")
        if plan.prefetch_routing is not None:
            # Before this step's update: the next step's routing comes from these (older) parameters.
            self.routing.put(plan.step + 1, self._prefetch_routing(StepPlan(**plan.prefetch_routing)))
        update_cpu_start = time.process_time()
        moe_metrics = e.update(plan.lr, finite, warmup)
        update_cpu_s = time.process_time() - update_cpu_start
        loss = e.global_mean_loss(loss_dicts)
        clock.lap("update")
        self.step = plan.step
        e.beat("done")
        elapsed = time.perf_counter() - start
        log.info("rank %d step %d: %s", self.rank, plan.step, clock)
        metrics = {
            "step": plan.step, "loss": float(loss), "grad_norm": float(grad_norm), "lr": plan.lr,
            "seq_len": plan.seq_len, "attention_mode": plan.attention_mode,
            "global_batch_tokens": plan.global_batch_tokens, "step_time_s": elapsed,
            "tokens_per_s": plan.global_batch_tokens / elapsed, "data_fingerprint": e.fingerprint(batch),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
            # CPU seconds of this rank's forward and backward passes: its stage's compute, without the waits
            # for other stages (blocked receives sleep), the figure the stage balance is judged by on CPU
            "compute_cpu_s": compute_cpu_s,
            # CPU seconds of this rank's process (every thread: gloo, checkpoint writer) over the whole step,
            # and of its optimizer update alone: on a CPU cluster sharing cores, the sum over ranks is the step
            "step_cpu_s": time.process_time() - step_cpu_start,
            "update_cpu_s": update_cpu_s,
            "skipped": not finite,
        }
        if routing_fingerprint is not None:
            metrics["routing_fingerprint"] = routing_fingerprint
        metrics.update(aux_metrics)
        metrics.update(moe_metrics)
        metrics.update(router_metrics)
        guard = self.job.spike_guard
        if guard.enabled and plan.step % guard.snapshot_every == 0:
            with e.precision.whole_masters():
                self.snapshots.take(self.step, e.stage, e.optimizer, e.loader)
        return metrics

    def _forward_backward(self, plan: StepPlan, micro: list[dict]) -> tuple[list[dict], dict, int | None, list]:
        """Forward and backward of every micro-batch (replaying captured routing while anticipatory routing
        is on); the per-micro-batch losses, the stage's auxiliary metrics, the routing fingerprint and the
        MoE layers' routing counts (:func:`router_health.collect`)."""
        e = self.engine
        e.stage.aux_loss_scale = 1.0 / len(micro)
        e.stage.attention_mode = plan.attention_mode
        e.stage.mtp_loss_weight = plan.mtp_loss_weight
        e.optimizer.zero_grad(set_to_none=False)
        routing_fingerprint = None
        if plan.anticipatory_routing:
            rows = self.routing.take(plan.step)
            if rows is None:  # the first step after switching on: route with the current parameters
                rows = self._capture_routing(micro, plan.seq_len, plan.micro_batch_size)
            set_routing_tape(e.stage, routing.replay_tape(rows, plan.micro_batch_size))
            routing_fingerprint = routing.fingerprint(rows, self.pctx.tp_rank, e.stage.cp)
        loss_dicts = e.run_schedule(micro, plan.seq_len, plan.micro_batch_size, forward_only=False)
        set_routing_tape(e.stage, None)
        router_layers = router_health.collect(e.stage)  # before pop_aux_metrics clears the routing statistics
        return loss_dicts, self._whole_sequence_metrics(e.stage.pop_aux_metrics()), routing_fingerprint, router_layers

    # the auxiliary losses a CP rank logs as its share of the whole sequences' value (parallel/context_parallel.py)
    _CP_SHARES = ("balance_loss", "mtp_loss", "indexer_loss", "indexer_recall")

    def _whole_sequence_metrics(self, aux: dict) -> dict:
        """The stage's auxiliary metrics with the CP ranks' shares summed into the whole sequences' values
        (collective over the CP group; every CP rank logs the same keys)."""
        if self.pctx.cp == 1:
            return aux
        keys = [k for k in self._CP_SHARES if k in aux]
        if keys:
            shares = torch.tensor([aux[k] for k in keys], dtype=torch.float64, device=groups.collective_device())
            dist.all_reduce(shares, group=self.pctx.cp_group)
            aux = {**aux, **dict(zip(keys, shares.tolist(), strict=True))}
        return aux

    def _capture_routing(self, micro: list[dict], seq_len: int, micro_batch_size: int) -> dict[int, torch.Tensor]:
        rows = sum(m["input_ids"].shape[0] for m in micro)
        return routing.capture(self.engine.stage,
                               lambda: self.engine.run_schedule(micro, seq_len, micro_batch_size, forward_only=True),
                               rows, seq_len // self.pctx.cp)  # this CP rank's tokens

    def _prefetch_routing(self, plan: StepPlan) -> dict[int, torch.Tensor]:
        """Capture the routing of the batch ``plan`` will train on, without moving the data cursor."""
        e = self.engine
        cursor = e.loader.state_dict()
        batch = e.loader.next_batch(plan.global_batch, plan.seq_len, self.pctx.dp_rank, self.pctx.dp)
        e.loader.load_state_dict(cursor)
        e.stage.attention_mode = plan.attention_mode
        return self._capture_routing(e.micro_batches(batch, plan.micro_batch_size), plan.seq_len,
                                     plan.micro_batch_size)

    def _inject_at_step_start(self, step: int) -> None:
        if ("kill", step) in self.faults:
            faults.die()
        if ("stall", step) in self.faults:
            faults.stall_forever()
        if ("raise", step) in self.faults:
            raise RuntimeError(f"injected fault raise@{step} on rank {self.rank}")

    def _inject_nan_grad(self, step: int) -> None:
        if self.faults.pop(("nan_grad", step), None):
            # once (a rollback re-runs the step); one routed expert's gradient on this rank (C7), else the
            # first gradient it has
            g = self.engine.groups
            target = next(p for p in g.expert + g.params if p.grad is not None)
            target.grad.view(-1)[0] = float("nan")

    def evaluate(self, request: EvalRequest) -> dict:
        """Validation loss ``{"val_loss", "val_batches"}`` (see :meth:`StepEngine.evaluate`), in the attention
        mode of the curriculum stage of the last step trained (its first step before any)."""
        self.engine.stage.attention_mode = plan_step(self.job, max(1, self.step)).attention_mode
        return self.engine.evaluate(request)

    # ---------------------------------------------------------------- rollback
    def rollback(self, newest_allowed: int, skip_data: bool) -> int:
        """Restore the newest snapshot taken at or before step ``newest_allowed``; returns its step (-1: none).

        With ``skip_data`` the data loader keeps its current position, so the batches between the snapshot
        and now (the window that led to the spike) are not trained on again.
        """
        self.io.wait()
        e = self.engine
        with e.precision.whole_masters():
            step = self.snapshots.restore(newest_allowed, e.stage, e.optimizer, e.loader, skip_data)
        if step < 0:
            return step
        self.step = step
        self.routing.clear()  # captured on the abandoned trajectory
        e.heartbeat = {"step": self.step, "progress": 0, "phase": "rolled_back"}
        return self.step

    def loader_state(self) -> dict:
        """The data loader's global cursor (for the supervisor's record after a rollback)."""
        return self.engine.loader.state_dict()

    def set_loader_state(self, state: dict) -> None:
        """Move the data loader to a global cursor (a rollback that skips the data it had reached)."""
        self.engine.loader.load_state_dict(state)

    # ---------------------------------------------------------------- checkpoints
    def save(self, root: str, attempt: str, asynchronous: bool = False) -> RankSave:
        """Write this rank's shards of the step checkpoint into ``attempt`` under ``root`` (collective).

        The state is copied now (the copy a restore from memory uses); with ``asynchronous`` that copy is
        written by a background thread while training goes on (:meth:`save_done` / :meth:`wait_saved` report
        when it is persisted). Returns the rank-local state recorded in ``train_state.json`` (loader cursor,
        RNG, routing rows), as of this step.
        """
        self.io.wait()
        e = self.engine
        e.heartbeat = {**e.heartbeat, "phase": "save"}
        with e.precision.whole_masters():  # sharded fp32 masters gathered whole for the save only
            state = checkpoint.shard_state(e.stage, e.optimizer, e.tp)
        # the copy kept for a restore from memory is what gets written: exactly the bytes on storage, and
        # training goes on without touching it while an asynchronous write runs
        copy = self.saved.put(root, attempt, self.rank, state)
        self.io.write(root, attempt, self.step, copy, asynchronous)
        return RankSave(rank=self.rank, dp_rank=self.pctx.dp_rank, loader=e.loader.state_dict(),
                        rng=checkpoint.rng_state(), routing=self.routing.encoded(e.stage.cp))

    def save_done(self) -> bool:
        """Whether the pending asynchronous save (if any) has persisted; re-raises its error."""
        return self.io.done()

    def wait_saved(self) -> None:
        """Block until the pending asynchronous save has persisted; re-raises its error."""
        self.io.wait()

    def load(self, root: str, name: str, train_state: dict) -> int:
        """Restore parameters, optimizer state, loader cursor and RNG from committed checkpoint ``name``.

        Model and optimizer tensors come from this process's copy of the save that was committed as ``name``
        when it has one (``train_state["attempt"]`` names that save; same rank, same layout): bit for bit
        what storage holds, without reading it. Otherwise from storage.

        Returns the restored step. Raises checkpoint.CheckpointError naming any missing state, before any
        step runs.
        """
        e = self.engine
        copy = self.saved.get(root, train_state.get("attempt"), self.rank)
        with e.precision.whole_masters():  # loaded whole, then each rank keeps its sharded masters' part
            if copy is not None and train_state.get("layout") == self.job.parallel.model_dump():
                checkpoint.load_state(copy, f"{root}/{name}", e.stage, e.optimizer, e.tp)
                self.restored_from = "memory"
            else:
                self.io.read(root, name, e.stage, e.optimizer, e.tp)
                self.restored_from = "storage"
        log.info("rank %d restored %s from %s", self.rank, name, self.restored_from)
        e.loader.load_state_dict(train_state["loader"])
        self.step = int(train_state["step"])
        self.routing.load(train_state.get("anticipatory_routing", {}).get("rows", {}), e.stage,
                          self.pctx.dp_rank, self.pctx.dp, e.stage.cp)
        e.heartbeat = {"step": self.step, "progress": 0, "phase": "loaded"}
        rng = train_state.get("rng", {}).get(str(self.rank))
        if train_state.get("layout") == self.job.parallel.model_dump() and rng is not None:
            checkpoint.set_rng_state(rng)
        else:
            # Another layout: no per-rank RNG stream to continue; derive one from (seed, step, rank).
            torch.manual_seed(self.job.seed * 1_000_003 + self.step * 1009 + self.rank)
        return self.step

    def close(self) -> None:
        """Leave the process group so the rank can join another job."""
        groups.destroy()
        if dist.is_initialized():
            dist.destroy_process_group()
