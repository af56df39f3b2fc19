"""Job and cluster specifications: YAML files validated with pydantic before anything starts.

A job file has the sections ``model``, ``data``, ``train``, ``parallel`` and ``checkpoint`` (plus ``name``
and ``seed``); a cluster file describes where the ranks run. Every unknown key is an error, every value is
type-checked, and the cross-field rules (layout product = device count, global batch divisible by
micro-batch size x data-parallel size, a dataset that exists, a model config that validates) run in
:func:`load_job` so that a bad file exits with one line naming the field before Ray or any rank starts
(DESIGN section 3, "validates JobSpec + ClusterSpec before anything starts").
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, model_validator

__all__ = [
    "SpecError",
    "ModelSpec",
    "DataSpec",
    "TrainSpec",
    "ParallelSpec",
    "CheckpointSpec",
    "StageSpec",
    "CurriculumSpec",
    "SpikeGuardSpec",
    "JobSpec",
    "ClusterSpec",
    "HardwareSpec",
    "load_job",
    "load_cluster",
    "apply_overrides",
    "validate_against_cluster",
]


class SpecError(ValueError):
    """A job or cluster file is invalid; the message is one line naming the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    """``model`` section: a preset name plus overrides of any :class:`model.config.ModelConfig` field."""

    model_config = ConfigDict(extra="allow", frozen=True)
    preset: str = "nano"

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
    the momentum lives with its owner, checkpoints stay global.

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
    def _distributed_muon_needs_muon(self) -> "TrainSpec":
        if self.distributed_muon and self.optimizer != "muon":
            raise ValueError(f"train.distributed_muon: true needs train.optimizer: muon, got {self.optimizer!r}")
        return self


class ParallelSpec(_Strict):
    """``parallel`` section: tensor, pipeline, expert and data parallel sizes, and ``vp`` virtual pipeline
    stages per pipeline rank (interleaved 1F1B when > 1; needs pp > 1 and micro-batches per step a
    multiple of pp)."""

    tp: PositiveInt = 1
    pp: PositiveInt = 1
    ep: PositiveInt = 1
    dp: PositiveInt = 1
    vp: PositiveInt = 1

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp


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
    def _stages(self) -> "CurriculumSpec":
        for i, stage in enumerate(self.stages[:-1]):
            if stage.tokens is None:
                raise ValueError(f"curriculum.stages.{i}.tokens: required on every stage but the last")
        return self


class SpikeGuardSpec(_Strict):
    """``spike_guard`` section (``orchestrator/spike_guard.py``): detection rule and rollback policy.

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
    faults: list[str] = []

    @model_validator(mode="after")
    def _batching(self) -> "JobSpec":
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
        if (p.tp * p.dp) % p.ep:
            raise ValueError(f"parallel.ep: {p.ep} must divide tp x dp = {p.tp * p.dp} (the experts of a stage "
                             "are spread over its tensor- and data-parallel ranks)")
        return self

    @property
    def num_microbatches(self) -> int:
        return self.train.global_batch // (self.train.micro_batch_size * self.parallel.dp)


class RaySpec(_Strict):
    """How the embedded local Ray cluster is started (ignored when ``address`` names a running cluster).

    ``excludes`` adds gitignore-style patterns to what ``v4train submit`` leaves out of the working
    directory it ships to a running cluster (``orchestrator/jobs.py`` lists the defaults).
    """

    num_cpus: PositiveInt | None = None
    object_store_memory_mb: PositiveInt = 512
    excludes: list[str] = []


class HardwareSpec(_Strict):
    """``hardware`` section: what one device offers, for ``v4train plan`` (never read by training).

    ``memory_gb`` per device (GB = 10^9 bytes, as vendors quote it; default: this machine's RAM /
    devices_per_node); ``peak_tflops`` dense BF16 (GPU) or FP32 (CPU) TFLOP/s per device, ``fp8`` whether matmuls
    run in FP8 through Transformer Engine (twice the BF16 rate); ``intra_node_gbps`` / ``inter_node_gbps``
    GB/s per device and direction within a node (NVLink) and between nodes (InfiniBand / RoCE);
    ``mfu`` the fraction of peak the step-time estimate assumes.
    """

    memory_gb: float | None = Field(default=None, gt=0)
    peak_tflops: float = Field(default=0.05, gt=0)
    fp8: bool = False
    intra_node_gbps: float = Field(default=2.0, gt=0)
    inter_node_gbps: float = Field(default=2.0, gt=0)
    mfu: float = Field(default=0.4, gt=0, le=1)


class ClusterSpec(_Strict):
    """Where ranks run: ``nodes x devices_per_node`` devices; one rank per device.

    ``simulated: true`` runs every rank as a CPU process on this machine (gloo over 127.0.0.1).
    ``collective_timeout_s`` bounds how long any collective may block, so a stalled peer fails the step;
    ``heartbeat_timeout_s`` is how long the supervisor waits without any rank making progress before it
    declares a stall and names the least advanced rank.

    ``address`` names a running Ray cluster's job server (its dashboard, ``http://HEAD:8265``): ``v4train
    submit`` then submits the supervisor there as a Ray job (``orchestrator/jobs.py``) instead of starting
    an embedded cluster. ``hardware`` describes one device for ``v4train plan``.
    """

    name: str
    nodes: PositiveInt = 1
    devices_per_node: PositiveInt
    device: Literal["cpu", "gpu"] = "cpu"
    simulated: bool = True
    backend: Literal["gloo", "nccl"] = "gloo"
    address: str | None = None
    threads_per_rank: PositiveInt = 1
    collective_timeout_s: float = Field(default=300.0, gt=0)
    heartbeat_timeout_s: float = Field(default=60.0, gt=0)
    ray: RaySpec = RaySpec()
    hardware: HardwareSpec = HardwareSpec()

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices_per_node


def _format_validation_error(source: str, exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if p != "__root__")
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    return f"{source}: {loc + ': ' if loc else ''}{msg}"


def _read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"{p}: file not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        raise SpecError(f"{p}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise SpecError(f"{p}: expected a mapping at the top level")
    return data


def apply_overrides(raw: dict, overrides: list[str], source: str = "--set") -> dict:
    """Apply ``key.sub=value`` strings (values parsed as YAML scalars) to a nested dict, in place.

    Raises SpecError for a malformed override.
    """
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SpecError(f"{source} {item!r}: expected dotted.key=value")
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise SpecError(f"{source} {key}: {part} is not a section")
            node = child
        node[parts[-1]] = yaml.safe_load(value)
    return raw


def load_job(path: str | Path, overrides: list[str] | None = None, *, check_data: bool = True) -> JobSpec:
    """Read, override and validate a job file; also builds the model config and opens ``dataset.json``.

    Raises SpecError with one line naming the file and the dotted field.
    """
    raw = apply_overrides(_read_yaml(path), overrides or [])
    try:
        job = JobSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(_format_validation_error(str(path), exc)) from None
    vocab = None
    if check_data:
        vocab = _dataset_vocab(job.data.path, str(path))
    cfg = job.model.build(vocab_size=vocab)
    problem = _layout_problem(job, cfg)
    if problem:
        raise SpecError(f"{path}: {problem}")
    return job


def _layout_problem(job: JobSpec, cfg) -> str | None:
    """What makes the (TP, PP, EP) layout impossible for this model and schedule, naming the fields."""
    p = job.parallel
    if p.pp * p.vp > cfg.n_layers:
        return f"parallel.pp x parallel.vp: {p.pp * p.vp} (virtual) stages for {cfg.n_layers} layers"
    split_by_tp = {"n_heads": cfg.n_heads, "o_groups": cfg.o_groups, "index_n_heads": cfg.index_n_heads,
                   "vocab_size": cfg.vocab_size, "n_shared_experts x moe_inter_dim": cfg.n_shared_experts * cfg.moe_inter_dim}
    for name, value in split_by_tp.items():
        if value % p.tp:
            return f"parallel.tp: {p.tp} does not divide model.{name} = {value}"
    if cfg.n_routed_experts % p.ep:
        return f"parallel.ep: {p.ep} does not divide model.n_routed_experts = {cfg.n_routed_experts}"
    if p.tp > 1:
        # the routed experts run on a 1/tp split of each micro-batch's tokens
        shapes = {(job.train.micro_batch_size, job.data.seq_len),
                  (job.train.micro_batch_size, job.train.eval_seq_len or job.data.seq_len)}
        for stage in job.curriculum.stages if job.curriculum is not None else ():
            shapes.add((stage.micro_batch_size or job.train.micro_batch_size, stage.seq_len or job.data.seq_len))
        for mbs, seq in sorted(shapes):
            if (mbs * seq) % p.tp:
                return (f"parallel.tp: {p.tp} does not divide the {mbs} x {seq} tokens of a micro-batch "
                        "(train.micro_batch_size x sequence length)")
    return None


def _dataset_vocab(data_path: str, source: str) -> int:
    meta = Path(data_path) / "dataset.json"
    if not Path(data_path).is_dir():
        raise SpecError(f"{source}: data.path: directory {data_path} not found (run `v4train prepare-data`)")
    if not meta.is_file():
        raise SpecError(f"{source}: data.path: {meta} not found (run `v4train prepare-data`)")
    try:
        return int(json.loads(meta.read_text())["vocab_size"])
    except (ValueError, KeyError, TypeError) as exc:
        raise SpecError(f"{source}: data.path: {meta} is not a valid dataset.json ({exc})") from None


def load_cluster(path: str | Path) -> ClusterSpec:
    """Read and validate a cluster file; raises SpecError naming the field."""
    raw = _read_yaml(path)
    try:
        return ClusterSpec.model_validate(raw)
    except ValidationError as exc:
        raise SpecError(_format_validation_error(str(path), exc)) from None


def validate_against_cluster(job: JobSpec, cluster: ClusterSpec) -> None:
    """Raise SpecError if the job's layout does not use exactly the cluster's devices."""
    p = job.parallel
    if p.world_size != cluster.world_size:
        raise SpecError(
            f"parallel: tp x pp x dp = {p.tp} x {p.pp} x {p.dp} = {p.world_size} does not match "
            f"cluster {cluster.name}'s {cluster.world_size} devices"
        )


def dump_job(job: JobSpec) -> str:
    """The resolved job as YAML (what ``RUN_DIR/job.yaml`` holds)."""
    data = job.model_dump(mode="json")
    data["model"] = {"preset": job.model.preset, **job.model.overrides()}
    return yaml.safe_dump(data, sort_keys=False)
