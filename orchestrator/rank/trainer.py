"""The per-rank training engine: one process, one rank, no Ray.

:class:`RankTrainer` owns everything a rank holds (its torch.distributed membership, parallel context,
pipeline stage of the model, optimizer and data loader) and runs one optimizer step per
:meth:`RankTrainer.train_step` call from a :class:`orchestrator.curriculum.StepPlan`. The Ray actor in
``orchestrator/worker.py`` is a thin shell around it, so the same engine can be driven by ``torchrun`` or
a test harness. Activations and gradients move over torch.distributed (the data plane); only the plan and
the returned metrics cross the control plane.
"""

from __future__ import annotations

import collections
import datetime
import math
import resource
import time
import zlib

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint import async_save as dcp_async_save
from torch.distributed.checkpoint import save as dcp_save

from v4train.data.loader import GlobalBatchLoader, TokenDataset, eval_batches
from v4train.model import V4Stage
from v4train.model.moe import (Router, RoutingTape, discard_expert_counts, expert_parallel_experts, set_routing_tape,
                       update_expert_bias)
from v4train.orchestrator import checkpoint, faults
from v4train.orchestrator.control.decisions import EvalRequest
from v4train.orchestrator.control.rank_group import RankInfo, RankSave
from v4train.orchestrator.curriculum import StepPlan
from v4train.orchestrator.spec import JobSpec
from v4train.orchestrator.storage import Storage
from v4train.parallel import groups
from v4train.parallel.data_parallel import all_reduce_gradients
from v4train.parallel.fp8 import enable_fp8, fp8_autocast_context
from v4train.orchestrator.rank.build import muon_shard_groups
from v4train.parallel.optim import build_optimizer, clip_grad_norm_, describe_assignment
from v4train.parallel.schedules import forward_backward
from v4train.parallel.tensor_parallel import TensorParallel, is_sharded

__all__ = ["RankTrainer"]


def _replay_tape(rows: dict[int, torch.Tensor], micro_batch_size: int) -> RoutingTape:
    """A replay tape from {layer: [b, S, K]} rows, one entry per micro-batch of ``micro_batch_size`` rows."""
    return RoutingTape("replay", {layer: [chunk.reshape(-1, t.shape[-1]) for chunk in t.split(micro_batch_size)]
                                  for layer, t in rows.items()})


class RankTrainer:
    """One rank of a training job.

    Args:
        job: the validated job spec (identical on every rank).
        rank: global rank in ``[0, world_size)``.
        world_size: number of ranks, equal to ``tp * pp * dp``.
        init_method: torch.distributed rendezvous, e.g. ``tcp://127.0.0.1:29500``.
        timeout_s: bound on every collective (seconds); a stalled peer fails the step instead of hanging.
        threads: intra-op CPU threads for this rank.
        backend: ``gloo`` (CPU) or ``nccl`` (GPU).
        inject: faults (see ``orchestrator/faults.py``) this rank must produce; others are ignored.
    """

    def __init__(
        self,
        job: JobSpec,
        *,
        rank: int,
        world_size: int,
        init_method: str,
        timeout_s: float,
        threads: int = 1,
        backend: str = "gloo",
        inject: list[faults.Fault] = (),
    ) -> None:
        self.job = job
        self.rank = rank
        self.faults = {(f.kind, f.step): f for f in inject if f.rank == rank}
        self.heartbeat = {"step": 0, "progress": 0, "phase": "setup"}
        torch.set_num_threads(threads)
        if dist.is_initialized():
            groups.destroy()
            dist.destroy_process_group()
        dist.init_process_group(
            backend,
            init_method=init_method,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        p = job.parallel
        self.pctx = groups.initialize(tp=p.tp, pp=p.pp, ep=p.ep, dp=p.dp,
                                      timeout_minutes=max(1, math.ceil(timeout_s / 60)))
        self.train_data = TokenDataset.open(job.data.path, "train")
        self.cfg = job.model.build(vocab_size=self.train_data.vocab_size)
        # Every rank seeds identically: parameter init is a function of (seed, parameter name) only.
        torch.manual_seed(job.seed)
        pctx = self.pctx
        self.tp = TensorParallel(pctx.tp_group, pctx.tp_rank, pctx.tp) if pctx.tp > 1 else TensorParallel()
        experts = None
        if pctx.ep > 1:
            def experts(_layer):
                return expert_parallel_experts(self.cfg, ep_group=pctx.ep_group, ep_rank=pctx.ep_rank, ep_size=pctx.ep)
        self.stage = V4Stage(self.cfg, pp_rank=pctx.pp_rank, pp_size=pctx.pp, vp_size=job.parallel.vp, tp=self.tp,
                             experts_factory=experts)
        # what the schedule runs: the stage, or its virtual-stage chunks (interleaved 1F1B)
        self.schedule_model = self.stage.chunks() if job.parallel.vp > 1 else self.stage
        self.stage.init_weights(job.seed)
        if job.train.fp8:
            enable_fp8(self.stage)  # same Parameter objects and names: checkpoints stay interchangeable
        named = [(n, p) for n, p in self.stage.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        # Routed experts: their gradients are summed over the expert-data-parallel group (the ranks holding
        # the same experts), the rest averaged over the data-parallel group (Megatron DDP's two buckets).
        self.expert_params = [p for n, p in named if ".ffn.experts." in n]
        expert_ids = {id(p) for p in self.expert_params}
        self.dense_params = [p for p in self.params if id(p) not in expert_ids]
        # Parameters held by both the first and the last stage (the embedding, for MTP): gradients are
        # summed over the embedding group, and the last stage's copy is left out of the global norm.
        self.shared = self.stage.shared_embedding_parameters() if pctx.embedding_group is not None else []
        # The global gradient norm counts every distinct tensor once over the whole world: a dense
        # parameter on data-parallel rank 0 (and TP rank 0 unless it is a TP shard), an expert on
        # expert-data-parallel rank 0, never the last stage's embedding copy.
        last_copy = {id(p) for p in self.shared} if pctx.is_last_stage else set()
        self.norm_excluded = [
            p for p in self.params
            if id(p) in last_copy
            or (id(p) in expert_ids and pctx.expert_dp_rank != 0)
            or (id(p) not in expert_ids and (pctx.dp_rank != 0 or (pctx.tp_rank != 0 and not is_sharded(p))))
        ]
        indexer = {id(p) for p in self.stage.indexer_parameters()}
        self.frozen_in_warmup = [p for p in self.params if id(p) not in indexer]
        t = job.train
        self.optimizer = build_optimizer(
            list(self.stage.named_parameters()),
            algorithm=t.optimizer,
            lr=t.lr,
            weight_decay=t.weight_decay,
            betas=tuple(t.adam_betas),
            eps=t.adam_eps,
            momentum=t.muon_momentum,
            tp_group=pctx.tp_group if pctx.tp > 1 else None,  # Muon gathers whole matrices of TP shards
            muon_shard_groups=muon_shard_groups(job, pctx, self.dense_params, self.expert_params),
        )
        self.loader = GlobalBatchLoader(self.train_data, seed=job.data.seed)
        self.step = 0
        # Asynchronous checkpoint writes coordinate over their own gloo group, so their collectives never
        # interleave with the training step's on the default group.
        self.ckpt_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
        self.pending_save = None
        self.snapshots: collections.deque = collections.deque(maxlen=2)  # spike-guard rollback targets
        # Anticipatory routing: step -> {layer: [b, S, K] int64 routed indices of this rank's rows}.
        self.routing_rows: dict[int, dict[int, torch.Tensor]] = {}
        self.heartbeat["phase"] = "ready"

    @property
    def is_reporter(self) -> bool:
        """The rank whose metrics the supervisor records: last pipeline stage, data- and tensor-parallel rank 0."""
        return self.pctx.is_last_stage and self.pctx.dp_rank == 0 and self.pctx.tp_rank == 0

    def describe(self) -> RankInfo:
        """Rank, layout coordinates and parameter count of this rank's stage."""
        return RankInfo(
            rank=self.rank,
            pp_rank=self.pctx.pp_rank,
            dp_rank=self.pctx.dp_rank,
            tp_rank=self.pctx.tp_rank,
            stage_params=sum(p.numel() for p in self.stage.parameters()),
            reporter=self.is_reporter,
            # one table per pipeline stage (the same on every TP/DP replica of it)
            optimizer_assignment=(describe_assignment(self.optimizer, self.stage.named_parameters())
                                  if self.pctx.dp_rank == 0 and self.pctx.tp_rank == 0 else None),
        )

    # ---------------------------------------------------------------- training
    def _micro_batches(self, batch, micro_batch_size: int) -> list[dict[str, torch.Tensor]]:
        out = []
        for i in range(0, batch.input_ids.shape[0], micro_batch_size):
            sl = slice(i, i + micro_batch_size)
            out.append(
                {
                    "input_ids": torch.from_numpy(np.ascontiguousarray(batch.input_ids[sl])),
                    "position_ids": torch.from_numpy(np.ascontiguousarray(batch.position_ids[sl])),
                    "labels": torch.from_numpy(np.ascontiguousarray(batch.labels[sl])),
                }
            )
        return out

    def _beat(self, phase: str) -> None:
        """Record progress for the supervisor's heartbeat (read from another thread)."""
        self.heartbeat = {"step": self.heartbeat["step"], "progress": self.heartbeat["progress"] + 1, "phase": phase}

    def _forward_step(self, data_iterator, model):
        self._beat("forward")
        mb = next(data_iterator)
        labels = mb["labels"] if model.is_last_stage else None
        with fp8_autocast_context(self.job.train.fp8):
            output = model(mb["input_ids"], mb["position_ids"], labels)

        def loss_func(per_token_loss_BS: torch.Tensor):
            loss = per_token_loss_BS.mean()
            return loss, {"lm_loss": loss.detach().clone()}

        return output, loss_func

    def _run_schedule(self, micro: list[dict], seq_len: int, micro_batch_size: int, forward_only: bool):
        chunked = isinstance(self.schedule_model, list)
        return forward_backward(
            self._forward_step,
            [iter(micro) for _ in self.schedule_model] if chunked else iter(micro),  # every chunk reads each micro-batch
            self.schedule_model,
            num_microbatches=len(micro),
            seq_length=seq_len,
            micro_batch_size=micro_batch_size,
            hidden_size=self.cfg.hc_mult * self.cfg.dim,
            pctx=self.pctx,
            forward_only=forward_only,
        )

    def _sync_gradients(self) -> None:
        """Dense gradients: mean over data parallel; routed experts: sum over the expert-data-parallel
        group (each expert's rank already holds the gradient of every token dispatched to it), divided by
        dp; the embedding copies of the first and last stage: summed."""
        all_reduce_gradients(self.dense_params, self.pctx.dp_group)
        all_reduce_gradients(self.expert_params, self.pctx.expert_dp_group, average=False)
        if self.pctx.dp > 1:
            for p in self.expert_params:
                if p.grad is not None:
                    p.grad.div_(self.pctx.dp)
        if self.shared:
            all_reduce_gradients(self.shared, self.pctx.embedding_group, average=False)

    def _global_mean_loss(self, loss_dicts: list[dict]) -> torch.Tensor:
        """Mean next-token loss over the global batch, identical on every rank of the last stage."""
        loss = torch.zeros((), dtype=torch.float64)
        if self.pctx.is_last_stage:
            loss = torch.stack([d["lm_loss"].double() for d in loss_dicts]).mean()
            if self.pctx.dp > 1:
                dist.all_reduce(loss, group=self.pctx.dp_group)
                loss /= self.pctx.dp
        return loss

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
        self.heartbeat = {"step": plan.step, "progress": 0, "phase": "data"}
        start = time.perf_counter()
        batch = self.loader.next_batch(plan.global_batch, plan.seq_len, self.pctx.dp_rank, self.pctx.dp)
        micro = self._micro_batches(batch, plan.micro_batch_size)
        self._beat("schedule")
        self.stage.aux_loss_scale = 1.0 / len(micro)
        self.stage.attention_mode = plan.attention_mode
        self.stage.mtp_loss_weight = plan.mtp_loss_weight
        self.optimizer.zero_grad(set_to_none=False)
        routing_fingerprint = None
        if plan.anticipatory_routing:
            rows = self.routing_rows.pop(plan.step, None)
            if rows is None:  # the first step after switching on: route with the current parameters
                rows = self._capture_routing(micro, plan.seq_len, plan.micro_batch_size)
            set_routing_tape(self.stage, _replay_tape(rows, plan.micro_batch_size))
            routing_fingerprint = self._routing_fingerprint(rows)
        loss_dicts = self._run_schedule(micro, plan.seq_len, plan.micro_batch_size, forward_only=False)
        set_routing_tape(self.stage, None)
        aux_metrics = self.stage.pop_aux_metrics()
        warmup = plan.attention_mode == "indexer_warmup"
        if warmup:
            # Indexer warm-up trains only the Lightning Indexer (spec 3.3, DSA recipe): every other
            # parameter keeps its value and its optimizer state (AdamW skips a parameter without a grad).
            for p in self.frozen_in_warmup:
                p.grad = None
        if self.faults.pop(("nan_grad", plan.step), None):
            # once (a rollback re-runs the step); one routed expert's gradient on this rank (C7), else the
            # first gradient it has
            target = next((p for p in self.expert_params + self.params if p.grad is not None))
            target.grad.view(-1)[0] = float("nan")
        self._beat("grad_sync")
        self._sync_gradients()
        grad_norm = clip_grad_norm_(self.params, self.job.train.grad_clip, dist.group.WORLD,
                                    exclude_from_norm=self.norm_excluded)
        finite = self._all_finite(grad_norm)
        if plan.prefetch_routing is not None:
            # Before this step's update: the next step's routing comes from these (older) parameters.
            self.routing_rows[plan.step + 1] = self._prefetch_routing(StepPlan(**plan.prefetch_routing))
        moe_metrics = {}
        if finite and not warmup:
            moe_metrics = update_expert_bias(self.stage, self.pctx.dp_group)
        else:
            discard_expert_counts(self.stage)
        if finite:
            for group in self.optimizer.param_groups:
                group["lr"] = plan.lr
            self.optimizer.step()
        loss = self._global_mean_loss(loss_dicts)
        self.step = plan.step
        self._beat("done")
        elapsed = time.perf_counter() - start
        metrics = {
            "step": plan.step,
            "loss": float(loss),
            "grad_norm": float(grad_norm),
            "lr": plan.lr,
            "seq_len": plan.seq_len,
            "global_batch_tokens": plan.global_batch_tokens,
            "step_time_s": elapsed,
            "tokens_per_s": plan.global_batch_tokens / elapsed,
            "data_fingerprint": self._fingerprint(batch),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
            "skipped": not finite,
        }
        if routing_fingerprint is not None:
            metrics["routing_fingerprint"] = routing_fingerprint
        metrics.update(aux_metrics)
        metrics.update(moe_metrics)
        guard = self.job.spike_guard
        if guard.enabled and plan.step % guard.snapshot_every == 0:
            self._snapshot()
        return metrics

    # ---------------------------------------------------------------- anticipatory routing
    @torch.no_grad()
    def _capture_routing(self, micro: list[dict], seq_len: int, micro_batch_size: int) -> dict[int, torch.Tensor]:
        """A routing-only forward (no gradients, no balancing counts) over ``micro``: {layer: [b, S, K]}."""
        tape = RoutingTape("capture")
        set_routing_tape(self.stage, tape)
        try:
            self._run_schedule(micro, seq_len, micro_batch_size, forward_only=True)
        finally:
            set_routing_tape(self.stage, None)
            self.stage.pop_aux_metrics()
        b = sum(m["input_ids"].shape[0] for m in micro)
        return {layer: torch.cat(chunks).view(b, seq_len, -1) for layer, chunks in tape.indices.items()}

    def _my_routing_rows(self, saved: dict) -> dict[int, dict[int, torch.Tensor]]:
        """This rank's rows of the saved global routing tape ({step: {layer: [G, S, K]}}), any layout."""
        mine = {m.layer_idx for m in self.stage.modules() if isinstance(m, Router) and not m.is_hash}
        out = {}
        for step, layers in saved.items():
            rows = {}
            for layer, blob in layers.items():
                if int(layer) in mine:
                    full = checkpoint.decode_rows(blob)
                    b = full.shape[0] // self.pctx.dp
                    rows[int(layer)] = full[self.pctx.dp_rank * b:(self.pctx.dp_rank + 1) * b].clone()
            out[int(step)] = rows
        return out

    def _prefetch_routing(self, plan: StepPlan) -> dict[int, torch.Tensor]:
        """Capture the routing of the batch ``plan`` will train on, without moving the data cursor."""
        cursor = self.loader.state_dict()
        batch = self.loader.next_batch(plan.global_batch, plan.seq_len, self.pctx.dp_rank, self.pctx.dp)
        self.loader.load_state_dict(cursor)
        self.stage.attention_mode = plan.attention_mode
        return self._capture_routing(self._micro_batches(batch, plan.micro_batch_size), plan.seq_len,
                                     plan.micro_batch_size)

    # ---------------------------------------------------------------- spike-guard snapshots
    def _snapshot(self) -> None:
        """Keep an in-memory copy of this rank's state after the current step (model, optimizer, loader)."""
        optim = {id(p): {k: v.clone() for k, v in self.optimizer.state[p].items()}
                 for p in self.stage.parameters() if self.optimizer.state.get(p)}
        self.snapshots.append({
            "step": self.step,
            "model": {k: v.clone() for k, v in self.stage.state_dict().items()},
            "optim": optim,
            "loader": self.loader.state_dict(),
        })

    def rollback(self, newest_allowed: int, skip_data: bool) -> int:
        """Restore the newest snapshot taken at or before step ``newest_allowed``; returns its step (-1: none).

        With ``skip_data`` the data loader keeps its current position, so the batches between the snapshot
        and now (the window that led to the spike) are not trained on again.
        """
        snap = next((s for s in reversed(self.snapshots) if s["step"] <= newest_allowed), None)
        if snap is None:
            return -1
        self.wait_saved()
        self.stage.load_state_dict(snap["model"])
        self.optimizer.state.clear()
        for p in self.stage.parameters():
            if id(p) in snap["optim"]:
                self.optimizer.state[p] = {k: v.clone() for k, v in snap["optim"][id(p)].items()}
        if not skip_data:
            self.loader.load_state_dict(snap["loader"])
        self.step = snap["step"]
        self.routing_rows.clear()  # captured on the abandoned trajectory
        while self.snapshots and self.snapshots[-1]["step"] > self.step:
            self.snapshots.pop()
        self.heartbeat = {"step": self.step, "progress": 0, "phase": "rolled_back"}
        return self.step

    def loader_state(self) -> dict:
        """The data loader's global cursor (for the supervisor's record after a rollback)."""
        return self.loader.state_dict()

    def set_loader_state(self, state: dict) -> None:
        """Move the data loader to a global cursor (a rollback that skips the data it had reached)."""
        self.loader.load_state_dict(state)

    def _fingerprint(self, batch) -> int:
        """Sum over the global batch's sequences of their tokens' crc32: the same data (any layout) gives the same value."""
        rows = np.ascontiguousarray(batch.input_ids)
        crc = torch.tensor([sum(zlib.crc32(row.tobytes()) for row in rows)], dtype=torch.int64)
        if self.pctx.dp > 1:
            dist.all_reduce(crc, group=self.pctx.dp_group)
        return int(crc.item())

    def _routing_fingerprint(self, rows: dict[int, torch.Tensor]) -> int:
        """Sum over layers and sequences of crc32 of the routed indices replayed this step (all ranks)."""
        # TP ranks replay the same rows: count them once
        crc = 0 if self.pctx.tp_rank else sum(zlib.crc32(r.to(torch.int16).numpy().tobytes())
                                              for t in rows.values() for r in t)
        total = torch.tensor([crc], dtype=torch.int64)
        dist.all_reduce(total)
        return int(total.item())

    def _inject_at_step_start(self, step: int) -> None:
        if ("kill", step) in self.faults:
            faults.die()
        if ("stall", step) in self.faults:
            faults.stall_forever()
        if ("raise", step) in self.faults:
            raise RuntimeError(f"injected fault raise@{step} on rank {self.rank}")

    def _all_finite(self, grad_norm: float) -> bool:
        """Whether every rank saw a finite global gradient norm (one MAX all-reduce over the world)."""
        bad = torch.tensor([0.0 if math.isfinite(grad_norm) else 1.0])
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return bad.item() == 0.0

    @torch.no_grad()
    def evaluate(self, request: EvalRequest) -> dict:
        """Mean next-token loss (nats) over ``request.batches`` fixed validation batches of
        ``request.global_batch`` sequences of ``request.seq_len`` tokens."""
        val = TokenDataset.open(self.job.data.path, "val")
        losses = []
        seq_len, mbs = request.seq_len, request.micro_batch_size
        for batch in eval_batches(val, request.batches, request.global_batch, seq_len, self.pctx.dp_rank,
                                  self.pctx.dp):
            micro = self._micro_batches(batch, mbs)
            losses.append(self._global_mean_loss(self._run_schedule(micro, seq_len, mbs, True)))
        self.stage.pop_aux_metrics()
        return {"val_loss": float(torch.stack(losses).mean()) if losses else float("nan"), "val_batches": len(losses)}

    # ---------------------------------------------------------------- checkpoints
    def _storage(self, root: str) -> Storage:
        c = self.job.checkpoint
        return Storage(root, endpoint_url=c.endpoint_url, region=c.region)

    def save(self, root: str, attempt: str, asynchronous: bool = False) -> RankSave:
        """Write this rank's shards of the step checkpoint into ``attempt`` under ``root`` (collective).

        With ``asynchronous``, the state is copied now and written by a background thread while training
        goes on (:meth:`save_done` / :meth:`wait_saved` report when it is persisted). Returns the
        rank-local state recorded in ``train_state.json`` (loader cursor, RNG), as of this step.
        """
        self.wait_saved()
        self.heartbeat = {**self.heartbeat, "phase": "save"}
        writer = self._storage(root).dcp_writer(attempt)
        if ("kill_during_upload", self.step) in self.faults:
            writer = faults.dying_writer(writer)
        state = checkpoint.shard_state(self.stage, self.optimizer, self.tp)
        if asynchronous:
            response = dcp_async_save(state, storage_writer=writer, process_group=self.ckpt_group)
            self.pending_save = (self.step, getattr(response, "upload_completion", response))
        else:
            dcp_save(state, storage_writer=writer, process_group=self.ckpt_group)
            self._after_persisted(self.step)
        return RankSave(rank=self.rank, dp_rank=self.pctx.dp_rank, loader=self.loader.state_dict(),
                        rng=checkpoint.rng_state(),
                        routing={str(step): {str(layer): checkpoint.encode_rows(t) for layer, t in rows.items()}
                                 for step, rows in self.routing_rows.items()})

    def save_done(self) -> bool:
        """Whether the pending asynchronous save (if any) has persisted; re-raises its error."""
        if self.pending_save is not None and self.pending_save[1].done():
            self.wait_saved()
        return self.pending_save is None

    def wait_saved(self) -> None:
        """Block until the pending asynchronous save has persisted; re-raises its error."""
        if self.pending_save is not None:
            step, future = self.pending_save
            future.result()
            self.pending_save = None
            self._after_persisted(step)

    def _after_persisted(self, step: int) -> None:
        if ("kill_during_save", step) in self.faults:
            faults.die()

    def load(self, root: str, name: str, train_state: dict) -> int:
        """Restore parameters, optimizer state, loader cursor and RNG from committed checkpoint ``name``.

        Returns the restored step. Raises checkpoint.CheckpointError naming any missing state, before any
        step runs.
        """
        checkpoint.load_shards(self._storage(root), name, self.stage, self.optimizer, self.tp)
        self.loader.load_state_dict(train_state["loader"])
        self.step = int(train_state["step"])
        self.routing_rows = self._my_routing_rows(train_state.get("anticipatory_routing", {}).get("rows", {}))
        self.heartbeat = {"step": self.step, "progress": 0, "phase": "loaded"}
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
