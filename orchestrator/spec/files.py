"""Reading job and cluster files: YAML, ``--set`` overrides, the checks that need the dataset or the model
config, and one-line errors naming the file and the field (:class:`SpecError`)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import yaml
from pydantic import ValidationError

from v4train.orchestrator.checkpoint import init_from
from v4train.orchestrator.spec.cluster import ClusterSpec
from v4train.orchestrator.spec.job import JobSpec, SpecError

__all__ = ["load_job", "load_cluster", "apply_overrides", "validate_against_cluster", "job_warnings", "dump_job"]



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
    if job.model.init_from is not None:
        try:
            init_from.check_model(job.model.init_from, cfg)
        except (ValueError, RuntimeError) as exc:
            raise SpecError(f"{path}: {exc}") from None
    return job


def _layout_problem(job: JobSpec, cfg) -> str | None:
    """What makes the (TP, PP, EP) layout impossible for this model and schedule, naming the fields."""
    p = job.parallel
    if p.pp * p.vp > cfg.n_layers:
        return f"parallel.pp x parallel.vp: {p.pp * p.vp} (virtual) stages for {cfg.n_layers} layers"
    split_by_tp = {"n_heads": cfg.n_heads, "o_groups": cfg.o_groups, "index_n_heads": cfg.index_n_heads,
                   "vocab_size": cfg.vocab_size,
                   "n_shared_experts x moe_inter_dim": cfg.n_shared_experts * cfg.moe_inter_dim}
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


def validate_against_cluster(job: JobSpec, cluster: ClusterSpec, vocab_size: int | None = None) -> None:
    """Raise SpecError if the job's ranks (tp x cp x pp x dp) do not fit the cluster's nodes in whole
    tensor-parallel groups (:meth:`ClusterSpec.ranks_per_node`: more ranks than devices, a tensor-parallel
    group larger than a node, a node left empty), or if the planner's peak memory of a rank (with the job's
    precision, recompute and context parallelism, ``orchestrator/tools/plan.py``) does not fit a device of the
    cluster at some training shape."""
    p = job.parallel
    cluster.ranks_per_node(p.world_size, p.tp)
    from v4train.orchestrator.tools.plan import Layout, job_shapes, plan_layout  # the planner imports specs

    cfg = job.model.build(vocab_size=vocab_size)
    layout = Layout(p.tp, p.pp, p.ep, p.dp, job.train.micro_batch_size, job.train.recompute, cp=p.cp)
    for i, shape in enumerate(job_shapes(job)):
        plan = plan_layout(cfg, job, cluster, dataclasses.replace(layout, micro_batch_size=shape.micro_batch_size),
                           shape)
        if not plan.fits:
            field = f"curriculum.stages.{i}.seq_len" if job.curriculum is not None else "data.seq_len"
            need = f"{plan.peak.total / 2**30:.1f} GiB per device"
            offer = f"exceeds what a device of {cluster.name} offers ({plan.capacity / 2**30:.1f} GiB)"
            if p.cp > 1:
                raise SpecError(f"{field}={shape.seq_len}: {need} at parallel.cp={p.cp} (planner) {offer}")
            raise SpecError(f"parallel: layout {layout} with train.precision {job.train.precision} needs {need} at "
                            f"{field}={shape.seq_len} (planner), which {offer}; `v4train plan` lists layouts that fit")


def job_warnings(job: JobSpec, cluster: ClusterSpec | None = None) -> list[str]:
    """Choices that are valid but buy nothing, one line each naming the field (``submit`` prints them); with
    ``cluster``, also devices the job leaves idle (fewer ranks than ``nodes x devices_per_node``)."""
    out = []
    p = job.parallel
    if cluster is not None and p.world_size < cluster.world_size:
        shares = " + ".join(map(str, cluster.ranks_per_node(p.world_size, p.tp)))
        out.append(f"parallel: tp x cp x pp x dp = {p.world_size} ranks leave {cluster.world_size - p.world_size} of "
                   f"cluster {cluster.name}'s {cluster.world_size} devices idle (ranks per node: {shares})")
    expert_dp = p.tp * p.cp * p.dp // p.ep
    if job.train.distributed_optimizer and p.dp * p.cp == 1 and expert_dp == 1:
        # dense state is sharded over the data x context parallel ranks
        out.append("train.distributed_optimizer: true with parallel.dp 1 shards nothing (every rank owns all "
                   "of its optimizer state)")
    return out


def dump_job(job: JobSpec) -> str:
    """The resolved job as YAML (what ``RUN_DIR/job.yaml`` holds)."""
    data = job.model_dump(mode="json")
    data["model"] = {"preset": job.model.preset, **job.model.overrides()}
    if job.model.init_from is not None:
        data["model"]["init_from"] = job.model.init_from
    return yaml.safe_dump(data, sort_keys=False)
