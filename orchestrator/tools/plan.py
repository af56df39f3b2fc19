"""Layout planner: per-rank memory, pipeline bubble, communication and step time before any rank starts.

``v4train plan JOB.yaml --cluster CLUSTER.yaml`` evaluates the job's layout (or ``--layout``) on the cluster's
devices and, when it does not fit, searches layouts that do. Nothing is trained; the model is never built
(parameter counts come from the real modules instantiated on the meta device, so they are exact).

**Memory of one rank** (pipeline stage ``r`` of ``pp``), in bytes:

- ``baseline``: the process before any model exists. CPU: :data:`RUNTIME_BASELINE_MB` measured here (a Ray
  rank worker after ``import v4train.orchestrator.rank.trainer`` is 517 MiB of resident memory: Python 3.11, Ray 2.60,
  torch 2.13 CPU, Megatron-core 0.16.1, pyarrow; ``RankTrainer`` setup adds about 80 MiB besides its
  parameters: gloo and Megatron groups, the opened dataset). GPU: an assumed allowance for the CUDA
  context, cuBLAS and NCCL workspaces (not measured here: no GPU).
- ``parameters``, ``gradients``, ``optimizer``: the stage's parameters (dense ones split over TP, routed
  experts over EP), as the trainer holds them (every term follows a job option, :func:`state_bytes`): fp32
  parameters (``train.precision: fp32``) or, under ``bf16``, the fp32-kept parameters plus the bf16-computed
  ones' fp32 masters and bf16 copies (``parallel/mixed_precision.py``; with ``train.distributed_optimizer``
  the masters are sharded with the optimizer: 2 + 4 / DP bytes, :func:`parameter_bytes`), fp32 gradients,
  and the optimizer state (:func:`optimizer_bytes`): two fp32 moments per parameter (AdamW; Muon's single
  momentum is counted as two, an upper bound). With
  ``train.distributed_optimizer`` (and only then) the optimizer term is divided by the group each part is
  sharded over: the data x context parallel size (dp x cp) for dense parameters, the expert-data-parallel size
  (tp x cp x dp / ep) for routed experts (AdamW in equal element ranges, exactly 1/DP; Muon matrices whole by a
  FLOP-balanced partition, 1/DP on average). Gradients and bf16 copies stay replicated (ZeRO-1).
- ``activations``: what autograd keeps per micro-batch (per-token element counts per layer fitted to
  saved-tensor measurements of this code's nano/small models, :func:`activation_elements`), times the
  micro-batches in flight: 1F1B keeps ``min(pp - r, m)`` on stage ``r``. ``train.recompute`` (``Layout.recompute``):
  ``selective`` keeps each layer's mHC and norm tensors and the inputs of its attention and MoE sub-layers;
  ``full`` keeps only each layer's input (the N-stream residual); both rebuild one layer at a time in the
  backward. Bytes per element: 4 under fp32, :data:`BF16_ACTIVATION_BYTES` under bf16 (2 for the bf16 residual
  streams ``full`` keeps).
- ``kv_compressor``: the part of the activations that is the attention's key/value entries (window and
  compressed) and the compressor's buffers at the job's sequence length, shown on its own line.
- ``workspace``: the backward's transient peak: one layer's activations again, plus the logits' gradient
  on the last stage. ``recomputed_layer`` (recompute selective or full): the layer the backward rebuilds
  keeps its activations while its backward runs, one layer's worth on top of the workspace.
- ``head_weight_grad`` (last stage): the fused head and loss forms each head's weight gradient in the
  forward, one ``[V / tp, D]`` buffer per head and micro-batch in flight.
- ``saved_copies``: every checkpoint save (synchronous or asynchronous) copies what the rank writes, its fp32
  parameters and whole optimizer state (:func:`saved_copy_bytes`; TP shards whole), into host memory and keeps
  the :data:`SAVED_COPIES` newest (``orchestrator/rank/saved_copies.py``: a survivor restores from them; an
  asynchronous save writes that copy, no second staging copy). Counted on CPU while ``checkpoint.every_steps``
  saves; on GPU reported as host memory (``host ckpt staging``), not counted. A save with the newest copies
  held writes into the oldest one's memory, or frees it first, so a rank never holds more than that many.
- ``checkpoint_save``: a save's transient, between steps when activations are free: the sharded optimizer state
  and masters gathered whole (with ``train.distributed_optimizer``), and on CPU, for a job that saves only at
  its end, the copy that save makes; counted where it exceeds the activations it replaces.

**Pipeline bubble** (1F1B): ``(pp - 1) / (m + pp - 1)`` with ``m`` micro-batches per data-parallel rank.
**Communication per step per rank**: DP gradient all-reduce (or reduce-scatter + all-gather), TP
all-gathers/reduce-scatters (4 per layer per micro-batch, forward and backward), EP all-to-all (dispatch
and combine, forward and backward), PP activations and their gradients at each stage boundary.
**Layers per stage**: the job's ``parallel.stage_layers``, as the trainer resolves it (``auto``: balanced by the
stage cost model of :mod:`orchestrator.tools.stage_costs`); a layout with another pp than the job's, or with
virtual stages, is planned with the balanced split of pp contiguous stages.
**Step time**: ``(m + pp - 1)`` times the slowest stage's micro-batch time (the stage cost model's prediction:
calibrated seconds on a calibrated device kind, else its FLOPs over ``peak_tflops x mfu``; divided by tp and
cp, x 4/3 under recompute), plus its TP/EP/PP transfers over
the link each group uses: inter-node when one of its groups spans two nodes, else intra-node, with the
ranks dealt to the nodes in whole tensor-parallel groups (:mod:`orchestrator.tools.placement`)) plus the unoverlapped
data-parallel gradient sync. An estimate: good for ranking
layouts and spotting what dominates, not a promise.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field

from v4train.orchestrator.tools import stage_costs
from v4train.orchestrator.tools.placement import crosses_nodes
from v4train.orchestrator.tools.plan_memory import (activation_elements, cp_buffer_elements, head_elements,
                                                    head_weight_elements, mhc_elements, stage_fp32_parameters,
                                                    stage_parameters)

__all__ = ["RUNTIME_BASELINE_MB", "BF16_ACTIVATION_BYTES", "RECOMPUTE_MODES", "FIT_FRACTION", "state_bytes",
           "optimizer_bytes", "parameter_bytes", "saved_copy_bytes", "SAVED_COPIES",
           "Layout", "Shape", "StageMemory", "Plan",
           "stage_parameters", "activation_elements", "cp_buffer_elements", "planned_stage_layers", "plan_layout",
           "plan_job", "suggest", "job_shapes"]

# Resident memory of a rank process before its model exists (MiB). cpu: measured (module docstring);
# gpu: device memory taken by the CUDA context, cuBLAS/NCCL workspaces and allocator slack (assumed).
RUNTIME_BASELINE_MB = {"cpu": 595.0, "gpu": 4096.0}
# Bytes per activation element (as counted under fp32) under train.precision bf16, measured: autograd's saved
# storages of a bf16 forward of nano and small (tests/orchestrator/test_plan.py) are 4.24-4.29 bytes per element
# an fp32 forward saves: beside the bf16 matmul inputs it keeps the fp32 upcasts the mHC, norms, router,
# SwiGLU activation and logits compute from (spec 0.1 item 8), so bf16 saves no activation memory here.
BF16_ACTIVATION_BYTES = 4.3
RECOMPUTE_MODES = ("none", "selective", "full")
# A layout fits when its peak rank uses at most this share of the device's memory (allocator fragmentation,
# transient spikes the model does not count).
FIT_FRACTION = 0.9
MiB = 1 << 20
GiB = 1 << 30
# checkpoint copies a rank keeps in host memory (orchestrator/rank/saved_copies.py, SavedCopies.keep)
SAVED_COPIES = 2


@dataclass(frozen=True)
class Layout:
    """A parallel layout plus the per-rank choices that change memory: micro-batch size and recompute
    (``train.recompute``: none | selective | full; ValueError naming ``recompute`` otherwise)."""

    tp: int
    pp: int
    ep: int
    dp: int
    micro_batch_size: int
    recompute: str = "none"
    cp: int = 1  # context parallel: each sequence split over cp ranks

    def __post_init__(self):
        if self.recompute not in RECOMPUTE_MODES:
            raise ValueError(f"recompute {self.recompute!r}: choose one of {', '.join(RECOMPUTE_MODES)}")

    def __str__(self) -> str:
        cp = f" cp{self.cp}" if self.cp > 1 else ""
        return (f"tp{self.tp}{cp} pp{self.pp} ep{self.ep} dp{self.dp} mbs{self.micro_batch_size} "
                f"recompute={self.recompute}")


@dataclass(frozen=True)
class Shape:
    """One training shape of the job: a curriculum stage (or the whole run without a curriculum)."""

    seq_len: int
    global_batch: int
    micro_batch_size: int
    attention: str = "dense"


@dataclass
class StageMemory:
    """Bytes one rank of pipeline stage ``pp_rank`` holds (module docstring), and what it is made of."""

    pp_rank: int
    layers: range
    dense_params: int
    expert_params: int
    parts: dict[str, float] = field(default_factory=dict)
    host_staging: float = 0.0

    @property
    def total(self) -> float:
        return sum(self.parts.values())


@dataclass
class Plan:
    layout: Layout
    shape: Shape
    stages: list[StageMemory]
    capacity: float
    bubble: float
    comm_bytes: dict[str, float]
    step_time_s: float
    time_parts: dict[str, float]
    tokens_per_step: int
    stage_time_s: list[float] = field(default_factory=list)  # predicted forward + backward per micro-batch

    @property
    def peak(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.total)

    @property
    def fits(self) -> bool:
        return self.peak.total <= FIT_FRACTION * self.capacity


# ------------------------------------------------------------------ one layout
def state_bytes(precision: str) -> dict[str, float]:
    """Bytes per gradient element (``grad``), per activation element (``act``; ``stream``: an element of the
    N-stream residual a layer keeps under full recompute) and per communicated value (``comm``) under
    ``train.precision`` (module docstring; parameters: :func:`parameter_bytes`); ValueError naming
    ``precision`` otherwise."""
    if precision == "bf16":
        return {"grad": 4, "act": BF16_ACTIVATION_BYTES, "stream": 2, "comm": 2}
    if precision == "fp32":
        return {"grad": 4, "act": 4, "stream": 4, "comm": 4}
    raise ValueError(f"precision {precision!r}: choose fp32 or bf16")


def _shard_sizes(layout: Layout, distributed: bool) -> tuple[int, int]:
    """(dense, routed-expert) group sizes the distributed optimizer shards over; (1, 1) without it. Dense
    parameters: the data x context parallel group (the trainer's ``ParallelContext.data_group``: CP ranks hold
    replicas and sum their gradients over it); routed experts: the expert-data-parallel group."""
    if not distributed:
        return 1, 1
    return layout.dp * layout.cp, max(1, layout.tp * layout.cp * layout.dp // layout.ep)


def parameter_bytes(cfg, layout: Layout, precision: str, distributed: bool,
                    stage_layers: list[int] | None = None) -> list[float]:
    """Parameter bytes of one rank of each pipeline stage (module docstring), dense split over TP and experts over
    EP: 4 per parameter under fp32; under bf16 4 per parameter kept in fp32 (:func:`stage_fp32_parameters`) and,
    per bf16-computed one, its fp32 master and bf16 copy: 4 + 2, or with ``distributed`` (the masters sharded
    with the optimizer, ``parallel/sharded_masters.py``) 2 + 4 / the group it is sharded over."""
    tp, ep = layout.tp, layout.ep
    stages = stage_parameters(cfg, layout.pp, stage_layers)
    if precision == "fp32":
        return [4 * (dense / tp + expert / ep) for _, dense, expert in stages]
    state_bytes(precision)  # validates
    dp, edp = _shard_sizes(layout, distributed)
    return [4 * kept / tp + (2 + 4 / dp) * (dense - kept) / tp + (2 + 4 / edp) * expert / ep
            for (_, dense, expert), kept in zip(stages, stage_fp32_parameters(cfg, layout.pp, stage_layers),
                                                strict=True)]


def saved_copy_bytes(cfg, layout: Layout, stage_layers: list[int] | None = None) -> list[float]:
    """Bytes of one checkpoint copy a rank of each pipeline stage keeps in host memory (``orchestrator/rank/
    saved_copies.py``: exactly what it writes): its fp32 parameters and whole optimizer state (two fp32 moments
    per parameter; Muon's one momentum counted as two), tensor-parallel shards gathered whole, its EP share of
    the experts, whatever the precision or distributed optimizer (both are gathered for the save)."""
    return [12 * (dense + expert / layout.ep) for _, dense, expert in stage_parameters(cfg, layout.pp, stage_layers)]


def optimizer_bytes(cfg, layout: Layout, distributed: bool, stage_layers: list[int] | None = None) -> list[float]:
    """Optimizer-state bytes of one rank of each pipeline stage (``stage_layers[r]`` layers on stage r, default
    the even split; module docstring): two fp32 moments per parameter, dense parameters split over TP and routed
    experts over EP; with ``distributed``
    (``train.distributed_optimizer``) divided over the data-parallel (dense) and expert-data-parallel (experts)
    groups."""
    tp, ep = layout.tp, layout.ep
    dp, edp = _shard_sizes(layout, distributed)
    return [8 * (dense / tp / dp + expert / ep / edp)
            for _, dense, expert in stage_parameters(cfg, layout.pp, stage_layers)]


def _capacity(cluster) -> float:
    if cluster.hardware.memory_gb is not None:
        return cluster.hardware.memory_gb * 1e9
    import psutil

    return psutil.virtual_memory().total / cluster.devices_per_node


def _communication(cfg, layout: Layout, stages: list[StageMemory], m: int, tokens_mb: int, b: dict,
                   seq_len: int) -> dict:
    """Bytes each rank moves per step over the tensor-, expert-, pipeline-, context- and data-parallel groups
    (``{"tp", "ep", "pp", "dp"}``, and ``"cp"`` when cp > 1; the terms are those of the module docstring)."""
    from v4train.parallel.context_parallel import exchange_bytes

    tp, pp, ep, dp, cp = layout.tp, layout.pp, layout.ep, layout.dp, layout.cp
    edp = max(1, tp * cp * dp // ep)
    n_moe_max = max(len(s.layers) for s in stages) + cfg.mtp_depth
    comm = {}
    comm["tp"] = 0.0 if tp == 1 else m * n_moe_max * 4 * 2 * (tp - 1) / tp * tokens_mb * cfg.dim * b["comm"]
    comm["ep"] = 0.0 if ep == 1 else \
        m * n_moe_max * 4 * (ep - 1) / ep * tokens_mb * cfg.n_activated_experts * cfg.dim * b["comm"]
    comm["pp"] = 0.0 if pp == 1 else m * 2 * tokens_mb * cfg.hc_mult * cfg.dim * b["comm"]
    if cp > 1:  # the peak stage's share of the layers' halo and entry exchanges, per micro-batch
        comm["cp"] = m * layout.micro_batch_size * exchange_bytes(cfg, seq_len, cp, bytes_per_value=b["comm"])[
            "cp_exchange"] * (max(len(s.layers) for s in stages) / cfg.n_layers)
    peak = max(stages, key=lambda s: s.dense_params / tp + s.expert_params / ep)
    grad_elems = [peak.dense_params / tp, peak.expert_params / ep]
    # dense gradients are summed over the data x context parallel ranks
    comm["dp"] = sum(2 * (g_dp - 1) / g_dp * g * b["grad"]
                     for g, g_dp in zip(grad_elems, (dp * cp, edp), strict=True) if g_dp > 1)
    return comm


def _activation_parts(cfg, layout: Layout, shape: Shape, layers: range, r: int, in_flight: int,
                      act_bytes: float, stream_bytes: float) -> dict[str, float]:
    """Activation memory of pipeline stage ``r`` (bytes): what autograd keeps for ``in_flight`` micro-batches
    (``activations``, of which the attention's KV entries as ``kv_compressor``), the backward's transient
    ``workspace``, the fused head's weight gradients (``head_weight_grad``, last stage) and the context-parallel
    exchange buffers (``cp_exchange``, when cp > 1)."""
    tp, pp, cp, mbs = layout.tp, layout.pp, layout.cp, layout.micro_batch_size
    tokens_mb = mbs * shape.seq_len // cp
    last = r == pp - 1
    ids = list(layers) + ([cfg.n_layers + k for k in range(cfg.mtp_depth)] if last else [])
    per_layer = [activation_elements(cfg, i, shape.seq_len, shape.attention, tp) for i in ids]
    head = head_elements(cfg, tp) if last else 0.0
    if layout.recompute == "full":  # each layer's input: the N-stream residual, in the streams' dtype
        kept_other, kept_kv = cfg.hc_mult * cfg.dim * len(ids) * stream_bytes / act_bytes + head, 0.0
    elif layout.recompute == "selective":  # the mHC and norm terms, and each sub-layer's input
        kept_other = sum(mhc_elements(cfg, i) + 2 * cfg.dim for i in ids) + head
        kept_kv = 0.0
    else:
        kept_other, kept_kv = sum(o for o, _ in per_layer) + head, sum(k for _, k in per_layer)
    biggest = max((o + k for o, k in per_layer), default=0.0)
    parts = {"activations": in_flight * tokens_mb * kept_other * act_bytes,
             "kv_compressor": in_flight * tokens_mb * kept_kv * act_bytes,
             "workspace": tokens_mb * (biggest + (cfg.vocab_size / tp if last else 0)) * act_bytes}
    if layout.recompute != "none":  # the rebuilt layer's activations live beside the backward's workspace
        parts["recomputed_layer"] = tokens_mb * biggest * act_bytes
    if last:  # the fused head's weight gradients, formed in the forward: per micro-batch, not per token
        parts["head_weight_grad"] = in_flight * head_weight_elements(cfg, tp) * act_bytes
    if cp > 1:
        buffers = sum(cp_buffer_elements(cfg, i, shape.seq_len, cp) for i in ids)
        parts["cp_exchange"] = in_flight * mbs * buffers * act_bytes
    return parts


def planned_stage_layers(cfg, job, device: str, pp: int) -> list[int]:
    """Layers per pipeline stage the planner assumes for ``pp`` stages (module docstring, *Layers per stage*):
    the trainer's split, balanced at the job's :meth:`JobSpec.sequence_for_costs` whatever the shape planned."""
    p = job.parallel
    seq_len, mode = job.sequence_for_costs()
    chosen = p.stage_layers if pp == p.pp and p.vp == 1 else "auto"
    return stage_costs.resolve_stage_layers(chosen, cfg, pp, seq_len, mode, device)


def plan_layout(cfg, job, cluster, layout: Layout, shape: Shape) -> Plan:
    """Memory, bubble, communication and step time of ``layout`` for ``shape`` of ``job`` on ``cluster``.
    Raises SpecError when the layout's ranks do not fit the cluster's nodes (``ClusterSpec.ranks_per_node``)."""
    device = cluster.device
    b = state_bytes(job.train.precision)
    tp, pp, ep, dp, mbs, cp = layout.tp, layout.pp, layout.ep, layout.dp, layout.micro_batch_size, layout.cp
    m = max(1, shape.global_batch // (mbs * dp))
    # context parallel: a rank holds seq_len / cp tokens of each sequence (activations, KV, FLOPs); the
    # per-token terms keep the whole sequence's visible compressed entries (they are all-gathered)
    tokens_mb = mbs * shape.seq_len // cp
    hw = cluster.hardware
    rate = hw.peak_tflops * 1e12 * hw.mfu * (2 if hw.fp8 and device == "gpu" else 1)
    sizes = planned_stage_layers(cfg, job, device, pp)
    costs = stage_costs.stage_costs(cfg, shape.seq_len, shape.attention,
                                    stage_costs.load_calibration(device, flops_per_s=rate))
    # a recomputed layer runs its forward twice: 8 instead of 6 FLOPs per parameter and token
    stage_time = [c * mbs / (tp * cp) * (4 / 3 if layout.recompute != "none" else 1) for c in costs.of_stages(sizes)]
    stages = []
    ckpt = job.checkpoint
    saves, kept = ckpt.every_steps > 0 or ckpt.at_end, SAVED_COPIES if ckpt.every_steps > 0 else 0
    distributed = job.train.distributed_optimizer
    optimizer = optimizer_bytes(cfg, layout, distributed, sizes)
    whole_optimizer = optimizer_bytes(cfg, layout, False, sizes)
    params = parameter_bytes(cfg, layout, job.train.precision, distributed, sizes)
    whole_params = parameter_bytes(cfg, layout, job.train.precision, False, sizes)
    copies = saved_copy_bytes(cfg, layout, sizes)
    for r, (layers, dense, expert) in enumerate(stage_parameters(cfg, pp, sizes)):
        local = dense / tp + expert / ep
        parts = {"baseline": RUNTIME_BASELINE_MB[device] * MiB, "parameters": params[r],
                 "gradients": local * b["grad"]}
        parts["optimizer"] = optimizer[r]
        parts.update(_activation_parts(cfg, layout, shape, layers, r, min(pp - r, m), b["act"], b["stream"]))
        stage = StageMemory(r, layers, dense, expert, parts)
        # a save gathers the sharded state whole (on the device); one that no kept copy covers (the end's save of a
        # job without periodic saves) adds its host copy; between steps, when activations are free
        gathered = (whole_optimizer[r] - optimizer[r]) + (whole_params[r] - params[r]) if saves else 0.0
        transient = (parts["activations"] + parts["kv_compressor"] + parts["workspace"]
                     + parts.get("head_weight_grad", 0.0) + parts.get("recomputed_layer", 0.0))
        if device == "cpu":
            parts["saved_copies"] = kept * copies[r]
            parts["checkpoint_save"] = max(0.0, gathered + (copies[r] if saves and not kept else 0.0) - transient)
        else:
            parts["checkpoint_save"] = max(0.0, gathered - transient)
            stage.host_staging = max(kept, 1) * copies[r] if saves else 0.0
        stages.append(stage)

    comm = _communication(cfg, layout, stages, m, tokens_mb, b, shape.seq_len)
    crosses = crosses_nodes(tp, pp, ep, dp, cluster.ranks_per_node(tp * cp * pp * dp, tp), cp)
    link = {k: (hw.inter_node_gbps if crossing else hw.intra_node_gbps) * 1e9 for k, crossing in crosses.items()}
    t_mb = max(stage_time) + (comm["tp"] / link["tp"] + comm["ep"] / link["ep"] + comm["pp"] / link["pp"]
                              + comm.get("cp", 0.0) / link["cp"]) / m
    time_parts = {"compute": (m + pp - 1) * max(stage_time),
                  "tp_ep_pp_comm": (m + pp - 1) * (t_mb - max(stage_time)),
                  "dp_sync": comm["dp"] / link["dp"]}
    return Plan(layout=layout, shape=shape, stages=stages, capacity=_capacity(cluster),
                bubble=(pp - 1) / (m + pp - 1), comm_bytes=comm, step_time_s=sum(time_parts.values()),
                time_parts=time_parts, tokens_per_step=shape.global_batch * shape.seq_len, stage_time_s=stage_time)


def job_shapes(job) -> list[Shape]:
    """The training shapes of ``job``: one per curriculum stage (at the full global batch), else one."""
    cur = getattr(job, "curriculum", None)
    if cur is None:
        return [Shape(job.data.seq_len, job.train.global_batch, job.train.micro_batch_size)]
    return [Shape(s.seq_len, job.train.global_batch, s.micro_batch_size or job.train.micro_batch_size, s.attention)
            for s in cur.stages]


def plan_job(cfg, job, cluster, layout: Layout) -> Plan:
    """The plan of the job's most memory-hungry shape under ``layout`` (its step time is that shape's)."""
    plans = []
    for shape in job_shapes(job):
        mbs = layout.micro_batch_size if len(job_shapes(job)) == 1 else shape.micro_batch_size
        plans.append(plan_layout(cfg, job, cluster, dataclasses.replace(layout, micro_batch_size=mbs), shape))
    return max(plans, key=lambda p: p.peak.total)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def suggest(cfg, job, cluster, limit: int = 5) -> list[Plan]:
    """Layouts of the cluster's devices that fit, fastest first (at most ``limit``).

    Searched: tp among the divisors of devices_per_node that divide n_heads, pp up to n_layers, ep dividing
    tp*dp and n_routed_experts, micro-batch sizes dividing the per-rank batch (up to 8), every recompute mode;
    the job's precision.
    """
    world = cluster.world_size
    found = []
    for tp in [t for t in _divisors(cluster.devices_per_node) if cfg.n_heads % t == 0]:
        for pp in [p for p in _divisors(world // tp) if p <= cfg.n_layers]:
            dp = world // (tp * pp)
            eps = [e for e in _divisors(tp * dp) if cfg.n_routed_experts % e == 0]
            for ep, recompute in itertools.product(eps, RECOMPUTE_MODES):
                for mbs in [x for x in (1, 2, 4, 8) if job.train.global_batch % (x * dp) == 0]:
                    plan = plan_job(cfg, job, cluster, Layout(tp, pp, ep, dp, mbs, recompute))
                    # a curriculum's stages fix their micro-batch size: several mbs give one plan
                    if plan.fits and all(p.layout != plan.layout for p in found):
                        found.append(plan)
    found.sort(key=lambda p: (p.step_time_s, p.peak.total))
    return found[:limit]
