"""The job file's sections (pydantic models): every field, its unit, its default and its check.

Every unknown key is an error and every value is type-checked; :class:`JobSpec` checks the cross-field
rules (global batch divisible by micro-batch size x data-parallel size, curriculum multiples, interleaving,
expert parallelism dividing tp x dp). Files are read by ``orchestrator/spec/files.py``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator

__all__ = ["SpecError", "ModelSpec", "DataSpec", "TrainSpec", "ParallelSpec", "CheckpointSpec", "StageSpec",
           "CurriculumSpec", "SpikeGuardSpec", "RouterHealthSpec", "JobSpec"]


class SpecError(ValueError):
    """A job or cluster file is invalid; the message is one line naming the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """``model`` section: a preset name plus overrides of any :class:`model.config.ModelConfig` field.

    ``init_from`` names a checkpoint root (e.g. one ``v4train convert from-hf`` wrote) whose newest committed
    model weights the job starts from (fresh optimizer, schedule from step 0; ``orchestrator/checkpoint/init_from.py``).
    """

    model_config = ConfigDict(extra="allow", frozen=True)
    preset: str = "nano"
    init_from: str | None = None

    def overrides(self) -> dict[str, Any]:
        """Fields other than ``preset``, as given in the YAML (validated by :meth:`build`)."""
        return dict(self.model_extra or {})

    def build(self, vocab_size: int | None = None):
        """Return the :class:`model.config.ModelConfig`; raises SpecError naming ``model.<field>``."""
        from v4train.model.config import ModelConfig

        overrides = self.overrides()
        known = {f.name for f in dataclasses.fields(ModelConfig)}
        for key in overrides:
            if key not in known:
                raise SpecError(f"model.{key}: unknown field of ModelConfig")
        if vocab_size is not None and "vocab_size" not in overrides:
            overrides["vocab_size"] = vocab_size
        try:
            return ModelConfig.preset(self.preset, **overrides)
        except (ValueError, TypeError, KeyError) as exc:
            raise SpecError(f"model: {exc}") from None


class DataSpec(_Strict):
    """``data`` section: a prepared dataset directory (``v4train prepare-data``) and the sequence length."""

    path: str
    seq_len: PositiveInt = 256
    seed: int = 0


class TrainSpec(_Strict):
    """``train`` section: the schedule. Batches are in sequences, the LR schedule in optimizer steps.

    Evaluation runs at ``eval_seq_len`` tokens (default ``data.seq_len``), whatever the current training
    length. ``max_restarts`` bounds automatic recoveries from rank failures; a step whose global gradient norm is
    not finite is skipped (no parameter, optimizer or bias change), and ``max_consecutive_nonfinite`` such
    steps in a row escalate by ``nonfinite_policy``: ``halt`` stops the run with the cause; ``rollback``
    restores the last committed checkpoint and skips the data window since it (the loader keeps its
    position), then trains on.

    ``optimizer: muon`` is V4's split (spec 6): Muon with hybrid Newton-Schulz on the hidden matrices
    (Nesterov momentum ``muon_momentum``, update RMS 0.18), AdamW (``adam_betas``, ``adam_eps``) on the
    embedding, head, norms, sinks and mHC scalars, one LR schedule and ``weight_decay`` for both;
    ``adamw`` puts every parameter under AdamW. ``fp8`` runs the attention, expert and MTP projections in
    FP8 (``parallel/fp8.py``: Transformer Engine's blockwise recipe on GPU, an e4m3 1x128 / 128x128
    quantise-dequantise emulation on CPU); the embedding, head, router, mHC, compressors and indexer stay
    in full precision. ``distributed_muon`` (with ``optimizer: muon``) updates each Muon matrix on one
    rank of its data-parallel group (routed experts: expert-data-parallel group) and shares the update,
    instead of every replica repeating the whole Newton-Schulz (``parallel/distributed_muon.py``, spec 6);
    the momentum lives with its owner, checkpoints stay global. ``distributed_optimizer`` (ZeRO-1) also shards
    the AdamW moments over the data-parallel group (routed experts: expert-data-parallel) in equal element
    ranges of the flat parameters, reduce-scatters their gradients into the owned range and all-gathers the
    updated parameters, and implies ``distributed_muon`` for the Muon matrices (``parallel/distributed_adamw.py``);
    checkpoints stay global, so a run resumes with or without it at any data-parallel size. ``recompute`` is the
    activation recompute of every V4 block (``model/recompute.py``): ``none`` keeps every activation,
    ``selective`` re-runs each attention and MoE sub-layer in the backward, ``full`` keeps only each block's input
    streams and re-runs the block; MoE routing is replayed, never re-decided, so all three train the same model.
    ``precision: bf16`` computes the forward and backward with bf16 copies of the weights (fp32 where V4 keeps
    fp32: mHC, norms, compressors, router, sinks) while the optimizer, the gradient reduction and checkpoints stay
    on fp32 masters (``parallel/mixed_precision.py``); gradients accumulate over micro-batches in fp32.

    The LR rises linearly over ``warmup_steps`` to ``lr``, then decays with a cosine to ``lr * min_lr_ratio``
    at ``steps``. ``micro_batch_size`` sequences form one pipeline micro-batch; each data-parallel rank runs
    ``global_batch / (micro_batch_size * dp)`` micro-batches per step.
    """

    steps: PositiveInt
    global_batch: PositiveInt
    micro_batch_size: PositiveInt
    lr: float = Field(gt=0)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    warmup_steps: int = Field(default=0, ge=0)
    weight_decay: float = Field(default=0.1, ge=0)
    optimizer: Literal["muon", "adamw"] = "muon"
    fp8: bool = False
    distributed_muon: bool = False
    distributed_optimizer: bool = False
    recompute: Literal["none", "selective", "full"] = "none"
    precision: Literal["fp32", "bf16"] = "fp32"
    muon_momentum: float = Field(default=0.95, ge=0, lt=1)
    adam_betas: tuple[float, float] = (0.9, 0.95)
    adam_eps: float = Field(default=1e-20, gt=0)  # V4's (spec 6)
    grad_clip: float = Field(default=1.0, ge=0)
    eval_batches: int = Field(default=8, ge=0)
    eval_every: int = Field(default=0, ge=0)
    eval_seq_len: PositiveInt | None = None
    max_restarts: int = Field(default=3, ge=0)
    max_consecutive_nonfinite: int = Field(default=3, ge=1)
    nonfinite_policy: Literal["halt", "rollback"] = "halt"

    @model_validator(mode="after")
    def _distributed_muon_needs_muon(self) -> TrainSpec:
        if self.distributed_muon and self.optimizer != "muon":
            raise ValueError(f"train.distributed_muon: true needs train.optimizer: muon, got {self.optimizer!r}")
        return self


class ParallelSpec(_Strict):
    """``parallel`` section: tensor, context, pipeline, expert and data parallel sizes, and ``vp`` virtual
    pipeline stages per pipeline rank (interleaved 1F1B when > 1; needs pp > 1 and micro-batches per step a
    multiple of pp). ``cp`` splits each sequence over cp ranks (``parallel/context_parallel.py``; Megatron's
    rank order tp-cp-ep-dp-pp, TP fastest): every sequence length (training stages and ``train.eval_seq_len``)
    must split into 2 cp chunks of whole compression blocks; the global batch and the loss do not depend
    on cp.

    ``stage_layers`` cuts the layers into the pp x vp (virtual) pipeline stages: ``auto`` (default) balances the
    stages' predicted step times by the cost model of ``orchestrator/tools/stage_costs.py``, calibrated on the
    cluster's device kind, at the job's sequence length and attention mode (:meth:`JobSpec.sequence_for_costs`);
    a list gives the layers of each stage in order (each >= 1, summing to the model's ``n_layers``). Parameter
    names stay global, so a checkpoint saved under one split resumes under any other."""

    tp: PositiveInt = 1
    cp: PositiveInt = 1
    pp: PositiveInt = 1
    ep: PositiveInt = 1
    dp: PositiveInt = 1
    vp: PositiveInt = 1
    stage_layers: Literal["auto"] | list[PositiveInt] = "auto"

    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self.pp * self.dp


class CheckpointSpec(_Strict):
    """``checkpoint`` section: save every ``every_steps`` steps (0 = only at the end) under ``root``.

    ``root`` is a local directory or ``s3://bucket/prefix`` (default: the run directory); ``endpoint_url``
    and ``region`` locate a non-AWS S3 service. Credentials are never part of the spec: they come from the
    environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``). ``keep`` (0 = all) limits how many
    committed checkpoints stay. With ``async_save`` ranks copy their state and write it in the background
    while training continues; the checkpoint commits once every rank has persisted its shards.
    """

    every_steps: int = Field(default=0, ge=0)
    root: str | None = None
    endpoint_url: str | None = None
    region: str | None = None
    keep: int = Field(default=0, ge=0)
    at_end: bool = True
    async_save: bool = True


class StageSpec(_Strict):
    """One curriculum stage: ``tokens`` trained at ``seq_len`` in attention mode ``attention``.

    ``tokens`` may be omitted only on the last stage (it runs to the end); ``micro_batch_size`` overrides
    ``train.micro_batch_size`` (longer sequences usually want fewer per micro-batch).
    """

    seq_len: PositiveInt
    tokens: PositiveInt | None = None
    attention: Literal["dense", "indexer_warmup", "sparse"] = "dense"
    micro_batch_size: PositiveInt | None = None


class CurriculumSpec(_Strict):
    """``curriculum`` section: V4-style sequence-length stages, batch ramp, token-based LR and MTP weight.

    See ``orchestrator/curriculum.py``. Global batch sizes (sequences) are multiples of ``batch_multiple``.
    """

    stages: list[StageSpec] = Field(min_length=1)
    batch_ramp_tokens: int = Field(default=0, ge=0)
    batch_ramp_start: PositiveInt | None = None
    batch_multiple: PositiveInt = 8
    lr_warmup_tokens: int = Field(default=0, ge=0)
    lr_decay_fraction: float = Field(default=0.1, ge=0, le=1)
    mtp_weight: float = Field(default=0.3, ge=0)
    mtp_weight_decay: float = Field(default=0.1, ge=0)

    @model_validator(mode="after")
    def _stages(self) -> CurriculumSpec:
        for i, stage in enumerate(self.stages[:-1]):
            if stage.tokens is None:
                raise ValueError(f"curriculum.stages.{i}.tokens: required on every stage but the last")
        return self


class SpikeGuardSpec(_Strict):
    """``spike_guard`` section: detection rule (``orchestrator/recovery/spike_guard.py``) and rollback policy
    (``orchestrator/recovery/spike_rollback.py``).

    Ranks keep an in-memory snapshot every ``snapshot_every`` steps (the two newest); on a spike the run
    rolls back to the newest snapshot at least two steps old (else to the last committed checkpoint),
    skips the data window that led to the spike when ``skip_data``, and continues with anticipatory
    routing on for ``anticipatory_steps`` steps (spec 8.1: the routing of step t is chosen with the
    parameters of step t-1, on the prefetched batch; the gate weights use the current parameters).
    """

    enabled: bool = False
    warmup_steps: int = Field(default=20, ge=1)
    beta: float = Field(default=0.9, gt=0, lt=1)
    sigma: float = Field(default=4.0, gt=0)
    ratio: float = Field(default=1.2, ge=1)
    grad_norm_ratio: float = Field(default=0.0, ge=0)
    snapshot_every: int = Field(default=10, ge=1)
    skip_data: bool = True
    anticipatory_steps: int = Field(default=20, ge=0)


class RouterHealthSpec(_Strict):
    """``router_health`` section: when a ``router_collapse`` event is raised
    (``orchestrator/control/router_watch.py``).

    A layer collapses when, for ``collapse_steps`` consecutive steps, some expert received no token from the
    whole data-parallel group (dead), or its busiest expert took more than ``max_load`` times the mean load
    (overloaded). One event per layer and episode; the run goes on.
    """

    collapse_steps: int = Field(default=20, ge=1)
    max_load: float = Field(default=4.0, gt=1)


class JobSpec(_Strict):
    """A whole training job (the resolved form is written to ``RUN_DIR/job.yaml``)."""

    name: str = "job"
    seed: int = 1234
    model: ModelSpec = ModelSpec()
    data: DataSpec
    train: TrainSpec
    parallel: ParallelSpec = ParallelSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    curriculum: CurriculumSpec | None = None
    spike_guard: SpikeGuardSpec = SpikeGuardSpec()
    router_health: RouterHealthSpec = RouterHealthSpec()
    faults: list[str] = []

    @model_validator(mode="after")
    def _batching(self) -> JobSpec:
        from v4train.orchestrator.faults import parse_fault

        for i, text in enumerate(self.faults):
            try:
                parse_fault(text)
            except ValueError as exc:
                raise ValueError(f"faults.{i}: {exc}") from None
        t, p = self.train, self.parallel
        per_step = t.micro_batch_size * p.dp
        if t.global_batch % per_step:
            raise ValueError(
                f"train.global_batch: {t.global_batch} is not divisible by "
                f"train.micro_batch_size x parallel.dp = {per_step}"
            )
        if self.curriculum is not None:
            c = self.curriculum
            if t.global_batch % c.batch_multiple:
                raise ValueError(f"train.global_batch: {t.global_batch} is not a multiple of "
                                 f"curriculum.batch_multiple = {c.batch_multiple}")
            for i, stage in enumerate(c.stages):
                unit = (stage.micro_batch_size or t.micro_batch_size) * p.dp
                if c.batch_multiple % unit:
                    raise ValueError(f"curriculum.stages.{i}: micro-batch size x parallel.dp = {unit} does not "
                                     f"divide curriculum.batch_multiple = {c.batch_multiple}")
        if p.vp > 1:
            if p.pp < 2:
                raise ValueError(f"parallel.vp: {p.vp} virtual stages need pipeline parallelism (pp >= 2)")
            # Megatron's interleaved schedule runs micro-batches in groups of pp; with a batch ramp every
            # global batch is a multiple of batch_multiple
            c = self.curriculum
            units = ([c.batch_multiple // ((s.micro_batch_size or t.micro_batch_size) * p.dp) for s in c.stages]
                     if c is not None else [t.global_batch // per_step])
            field = "curriculum.batch_multiple" if c is not None else "train.global_batch"
            for unit in units:
                if unit % p.pp:
                    raise ValueError(f"parallel.vp: interleaving needs micro-batches per step a multiple of pp = "
                                     f"{p.pp}; {field} / (micro_batch_size x dp) = {unit}")
        if p.stage_layers != "auto":
            n_layers, stages = self.model.build().n_layers, p.pp * p.vp
            if len(p.stage_layers) != stages or sum(p.stage_layers) != n_layers:
                raise ValueError(f"parallel.stage_layers: {p.stage_layers} must give {stages} stages (pp x vp) "
                                 f"summing to the model's n_layers = {n_layers}")
        if (p.tp * p.cp * p.dp) % p.ep:
            raise ValueError(f"parallel.ep: {p.ep} must divide tp x cp x dp = {p.tp * p.cp * p.dp} (the experts of "
                             "a stage are spread over its tensor-, context- and data-parallel ranks)")
        if p.cp > 1:
            from v4train.parallel.context_parallel import check_cp_seq_len

            ratios = self.model.build().compress_ratios
            lengths = ([(f"curriculum.stages.{i}.seq_len", st.seq_len) for i, st in enumerate(self.curriculum.stages)]
                       if self.curriculum is not None else [("data.seq_len", self.data.seq_len)])
            # evaluation runs at train.eval_seq_len, else data.seq_len (also under a curriculum)
            if t.eval_batches and t.eval_seq_len is not None:
                lengths.append(("train.eval_seq_len", t.eval_seq_len))
            elif t.eval_batches and self.curriculum is not None:
                lengths.append(("data.seq_len", self.data.seq_len))
            for field, seq_len in lengths:
                check_cp_seq_len(seq_len, p.cp, ratios, field=field)
        return self

    def sequence_for_costs(self) -> tuple[int, str]:
        """``(seq_len, attention mode)`` the stage split is balanced for: the last curriculum stage's (where a
        V4 recipe spends most of its tokens, at its longest sequences), else ``data.seq_len`` in dense mode."""
        if self.curriculum is None:
            return self.data.seq_len, "dense"
        last = self.curriculum.stages[-1]
        return last.seq_len, last.attention

    @property
    def num_microbatches(self) -> int:
        return self.train.global_batch // (self.train.micro_batch_size * self.parallel.dp)
