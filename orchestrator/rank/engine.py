"""The step engine: one rank's share of an optimizer step, evaluation, and the numbers it reports.

:class:`StepEngine` holds what a step computes with (the pipeline stage of the model, its parameter groups,
the optimizer, the data loader of this rank's data-parallel slice) and the pieces of a step: cutting the
global batch into micro-batches (and, with context parallelism, every sequence into this rank's
load-balanced share of its tokens), running the pipeline schedule (``parallel/schedules.py``; activations and
gradients move over torch.distributed, the data plane), synchronising gradients across data, expert-data
and embedding groups, the global gradient norm and its finiteness, the optimizer update, and the global
mean loss. :class:`orchestrator.rank.trainer.RankTrainer` sequences them into a step.
"""

from __future__ import annotations

import math
import zlib

import numpy as np
import torch
import torch.distributed as dist

from v4train.data.loader import GlobalBatchLoader, TokenDataset, eval_batches
from v4train.model.moe import discard_expert_counts, update_expert_bias
from v4train.orchestrator.control.decisions import EvalRequest
from v4train.orchestrator.control.preflight import check_vocabulary
from v4train.orchestrator.rank.abort import AbortSwitch
from v4train.orchestrator.rank.build import build_rank_optimizer, build_stage, group_parameters
from v4train.orchestrator.rank.devices import RankPlacement
from v4train.orchestrator.spec import JobSpec
from v4train.parallel.context_parallel import shard_tokens
from v4train.parallel.data_parallel import all_reduce_gradients, reduce_flat_gradients
from v4train.parallel.fp8 import fp8_autocast_context
from v4train.parallel.mixed_precision import MixedPrecision
from v4train.parallel.optim import adamw_flat_shards, clip_grad_norm_, distributed_adamw_of
from v4train.parallel.schedules import forward_backward

__all__ = ["StepEngine"]


class StepEngine:
    """One rank's model, optimizer and data for ``job`` under parallel context ``pctx``, on ``placement.device``
    (:mod:`orchestrator.rank.devices`; default: CPU).

    ``heartbeat`` ({step, progress, phase}) moves as the step advances; the Ray actor reads it from
    another thread to tell a slow step from a stalled one. ``abort`` (:mod:`orchestrator.rank.abort`) is
    set from that thread when a peer has failed; the step then raises StepAborted at its next module.
    """

    def __init__(self, job: JobSpec, pctx, placement: RankPlacement | None = None) -> None:
        self.job = job
        self.pctx = pctx
        self.placement = placement or RankPlacement(torch.device("cpu"), "gloo", "torch",
                                                    "emulation" if job.train.fp8 else "off")
        self.device = self.placement.device
        self.heartbeat = {"step": 0, "progress": 0, "phase": "setup"}
        self.train_data = TokenDataset.open(job.data.path, "train")
        self.cfg = job.model.build(vocab_size=self.train_data.vocab_size)
        # every token id must have an embedding row (preflight checks it too; a rank must not index past it)
        check_vocabulary(self.train_data.vocab_size, self.cfg.vocab_size, f"{job.data.path}/dataset.json")
        self.stage, self.tp = build_stage(job, self.cfg, pctx, self.placement)
        # what the schedule runs: the stage, or its virtual-stage chunks (interleaved 1F1B)
        self.schedule_model = self.stage.chunks() if job.parallel.vp > 1 else self.stage
        self.groups = group_parameters(self.stage, pctx)
        self.optimizer = build_rank_optimizer(self.stage, job, pctx)
        self.zero = distributed_adamw_of(self.optimizer)  # train.distributed_optimizer's AdamW part, or None
        # the AdamW gradients' flat buffers, reduce-scattered with the distributed optimizer and all-reduced without
        self.flat_shards = adamw_flat_shards(self.optimizer, [(pctx.data_group, self.groups.dense),
                                                              (pctx.expert_dp_group, self.groups.expert)])
        # under bf16 the distributed optimizer also shards the fp32 masters of what it updates
        self.precision = MixedPrecision(self.stage, job.train.precision, getattr(
            self.optimizer, "optimizers", (self.optimizer,)) if job.train.distributed_optimizer else ())
        self.loader = GlobalBatchLoader(self.train_data, seed=job.data.seed)
        self.abort = AbortSwitch()  # set from the heartbeat thread when a peer has failed
        self.abort.install(self.stage, [*self.stage.layers.values(), *getattr(self.stage, "mtp", {}).values()])

    def beat(self, phase: str) -> None:
        """Record progress for the heartbeat (read from another thread); raises StepAborted when the
        supervisor has asked this rank to abandon the step."""
        self.abort.check()
        self.heartbeat = {"step": self.heartbeat["step"], "progress": self.heartbeat["progress"] + 1, "phase": phase}

    def micro_batches(self, batch, micro_batch_size: int) -> list[dict[str, torch.Tensor]]:
        """This rank's rows of a global batch as micro-batches of ``micro_batch_size`` sequences
        ({input_ids, position_ids, labels}: [micro_batch_size, seq / cp] int64, on the rank's device).

        With context parallelism every CP rank of a data-parallel replica reads the same rows and keeps
        its load-balanced share of each sequence's tokens (:func:`parallel.context_parallel.shard_tokens`;
        the labels are the next tokens of the whole sequence, so they shard like the inputs)."""
        cp, cp_rank = self.pctx.cp, self.pctx.cp_rank
        out = []
        for i in range(0, batch.input_ids.shape[0], micro_batch_size):
            sl = slice(i, i + micro_batch_size)
            mb = {}
            for key in ("input_ids", "position_ids", "labels"):
                x_BT = torch.from_numpy(np.ascontiguousarray(getattr(batch, key)[sl]))
                mb[key] = (shard_tokens(x_BT, cp, cp_rank) if cp > 1 else x_BT).to(self.device)
            out.append(mb)
        return out

    def _forward_step(self, data_iterator, model):
        self.beat("forward")
        mb = next(data_iterator)
        labels = mb["labels"] if model.is_last_stage else None
        with fp8_autocast_context(self.job.train.fp8):
            output = model(mb["input_ids"], mb["position_ids"], labels)

        def loss_func(per_token_loss_BS: torch.Tensor):
            loss = per_token_loss_BS.mean()
            # Every CP rank holds the same number of a sequence's tokens, so the whole sequences' mean is the
            # mean of the ranks' means: this rank's share of it is loss / cp, and the shares' gradients sum
            # over the CP ranks like the model's auxiliary losses (MTP, indexer KL, balance), which are
            # shares normalised by whole-sequence counts (parallel/context_parallel.py).
            return loss / self.pctx.cp, {"lm_loss": loss.detach().clone()}

        return output, loss_func

    def run_schedule(self, micro: list[dict], seq_len: int, micro_batch_size: int, forward_only: bool) -> list[dict]:
        """The pipeline schedule over ``micro`` (sequences of ``seq_len`` tokens, ``seq_len / cp`` of them on
        this rank); the last stage's per-micro-batch ``{"lm_loss"}`` (this rank's tokens' mean)."""
        chunked = isinstance(self.schedule_model, list)
        with self.precision.compute():  # bf16 weights inside, fp32 masters and gradients after
            return forward_backward(
                self._forward_step,
                [iter(micro) for _ in self.schedule_model] if chunked else iter(micro),  # every chunk reads each one
                self.schedule_model,
                num_microbatches=len(micro),
                seq_length=seq_len // self.pctx.cp,  # what crosses a stage boundary: this rank's tokens
                micro_batch_size=micro_batch_size,
                hidden_size=self.cfg.hc_mult * self.cfg.dim,
                pctx=self.pctx,
                forward_only=forward_only,
            )

    def sync_gradients(self) -> None:
        """Dense gradients: mean over data parallel (with context parallelism: summed over the data x
        context parallel group, each CP rank holding its share of its replica's gradient, divided by dp);
        routed experts: sum over the expert-data-parallel group (each expert's rank already holds the
        gradient of every token dispatched to it), divided by dp; the embedding copies of the first and
        last stage: summed.

        The AdamW parameters' gradients go through one flat buffer per group (:func:`parallel.optim.adamw_flat_shards`),
        all-reduced, or with ``train.distributed_optimizer`` reduce-scattered (each rank receiving its owned range
        only, :mod:`parallel.distributed_adamw`); the rest (Muon matrices, the embedding copies) through the same
        buckets either way. Both runs so sum every gradient element in one order: their gradients agree bit for
        bit. The embedding copies are all-reduced whole (the two stages lay out different parameters, so their
        owned ranges differ)."""
        g = self.groups
        shared = {id(p) for p in g.shared}
        flat = {id(p) for s in self.flat_shards for p in s.params} - shared
        dense = [p for p in g.dense if id(p) not in flat]
        if self.pctx.cp > 1:
            all_reduce_gradients(dense, self.pctx.dp_cp_group, average=False)
            if self.pctx.dp > 1:
                for p in dense:
                    if p.grad is not None:
                        p.grad.div_(self.pctx.dp)
        else:
            all_reduce_gradients(dense, self.pctx.dp_group)
        expert = [p for p in g.expert if id(p) not in flat]
        all_reduce_gradients(expert, self.pctx.expert_dp_group, average=False)
        if self.pctx.dp > 1:
            for p in expert:
                if p.grad is not None:
                    p.grad.div_(self.pctx.dp)
        if g.shared:
            all_reduce_gradients(g.shared, self.pctx.embedding_group, average=False)
        for shard in self.flat_shards:
            reduce_flat_gradients(shard, self.pctx.dp, scatter=self.zero is not None, reduced=g.shared)

    def clip_gradients(self) -> tuple[float, bool]:
        """Clip to ``train.grad_clip`` by the global norm; (that norm, whether it is finite on every rank:
        one MAX all-reduce over the world)."""
        excluded, shard_grads = self.groups.norm_excluded, []
        if self.zero is not None:  # each owned range counted by its owner, a replica's range by nobody
            replicas = {id(p) for p in self.groups.norm_replicas}
            excluded = excluded + self.zero.sharded_params()
            shard_grads = [g for p, g in self.zero.owned_gradients() if id(p) not in replicas]
        grad_norm = clip_grad_norm_(self.groups.params, self.job.train.grad_clip, dist.group.WORLD,
                                    exclude_from_norm=excluded, shard_grads=shard_grads)
        bad = torch.tensor([0.0 if math.isfinite(grad_norm) else 1.0], device=self.device)
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        return grad_norm, bad.item() == 0.0

    def update(self, lr: float, finite: bool, warmup: bool) -> dict:
        """Expert-bias balancing and the optimizer step at ``lr``, both only for a finite gradient (the bias
        also not during the indexer warm-up); returns the MoE balance metrics."""
        moe_metrics = {}
        if finite and not warmup:
            moe_metrics = update_expert_bias(self.stage, self.pctx.data_group)  # every token of the batch once
        else:
            discard_expert_counts(self.stage)
        if finite:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
        return moe_metrics

    def global_mean_loss(self, loss_dicts: list[dict]) -> torch.Tensor:
        """Mean next-token loss over the global batch, identical on every rank of the last stage (the mean
        over the data x context parallel ranks of their means: every CP rank holds as many tokens)."""
        loss = torch.zeros((), dtype=torch.float64, device=self.device)
        if self.pctx.is_last_stage:
            loss = torch.stack([d["lm_loss"].double() for d in loss_dicts]).mean()
            replicas = self.pctx.dp * self.pctx.cp
            if replicas > 1:
                dist.all_reduce(loss, group=self.pctx.data_group)
                loss /= replicas
        return loss

    def fingerprint(self, batch) -> int:
        """Sum over the global batch's sequences of their tokens' crc32 (the same data, any layout: the same)."""
        rows = np.ascontiguousarray(batch.input_ids)
        crc = torch.tensor([sum(zlib.crc32(row.tobytes()) for row in rows)], dtype=torch.int64, device=self.device)
        if self.pctx.dp > 1:
            dist.all_reduce(crc, group=self.pctx.dp_group)
        return int(crc.item())

    @torch.no_grad()
    def evaluate(self, request: EvalRequest) -> dict:
        """Mean next-token loss (nats) over ``request.batches`` fixed validation batches of
        ``request.global_batch`` sequences of ``request.seq_len`` tokens."""
        val = TokenDataset.open(self.job.data.path, "val")
        losses = []
        seq_len, mbs = request.seq_len, request.micro_batch_size
        for batch in eval_batches(val, request.batches, request.global_batch, seq_len, self.pctx.dp_rank,
                                  self.pctx.dp):
            micro = self.micro_batches(batch, mbs)
            losses.append(self.global_mean_loss(self.run_schedule(micro, seq_len, mbs, True)))
        self.stage.pop_aux_metrics()
        return {"val_loss": float(torch.stack(losses).mean()) if losses else float("nan"), "val_batches": len(losses)}
