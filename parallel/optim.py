"""The V4 optimizer split (Muon for hidden matrices, AdamW for the rest) and global gradient-norm clipping.

DeepSeek-V4 (spec section 6, R §2.4 and §4.2.2) trains with two optimizers on one learning-rate
schedule. :func:`build_optimizer` builds either

* ``algorithm="muon"`` (V4): a :class:`HybridOptimizer` over a :class:`parallel.muon.Muon` group
  ``"muon"`` and a torch AdamW with groups ``"adamw_decay"`` / ``"adamw_no_decay"``, or
* ``algorithm="adamw"``: one torch AdamW with groups ``"decay"`` / ``"no_decay"`` (every parameter).

AdamW settings follow V4: betas (0.9, 0.95), epsilon given by the caller (V4 uses 1e-20), decoupled
weight decay 0.1 on matrices and embeddings, 0 on vectors. Parameter assignment (spec section 6 with
its ambiguous cases resolved as it suggests), by fully qualified name:

* AdamW: the embedding (a module named ``embed``) and the output head (``head``), every parameter
  of a module whose name contains ``norm`` (RMSNorm weights), 1-D and 0-D parameters (attention sinks,
  mHC static biases ``base`` and gating factors ``scale``), biases (``*.bias``) and the bias-like
  compressor position biases ``ape`` (2-D but a per-slot bias). Weight decay only for ndim >= 2
  parameters that are neither norms nor bias-like (embedding, head).
* Muon: every other 2-D weight: attention and indexer projections, compressor ``wkv``/``wgate``, the
  router ``gate.weight``, routed and shared experts (each a matrix of its own), MTP ``e_proj``/``h_proj``,
  and the mHC dynamic matrices ``fn`` (also ``hc_head.fn``).

A weight's ``muon_split`` attribute (:class:`parallel.muon.MuonSplit`, set by the model modules that
concatenate logically independent matrices) tells Muon to orthogonalise each block on its own.
:func:`describe_assignment` renders the assignment for the trainer's start-up log, and
:func:`initial_state` gives the state an optimizer would create lazily (for checkpoints of never-stepped
parameters).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, MutableMapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from v4train.parallel.distributed_adamw import DistributedAdamW
from v4train.parallel.distributed_muon import DistributedMuon
from v4train.parallel.muon import UPDATE_RMS, V4_NS_STEPS, Muon, MuonSplit
from v4train.parallel.ownership import FlatShard, resolve_shard_groups
from v4train.parallel.tensor_parallel import is_sharded

__all__ = [
    "ALGORITHMS", "HybridOptimizer", "adamw_flat_shards", "build_optimizer", "clip_grad_norm_", "describe_assignment",
    "distributed_adamw_of", "global_state", "initial_state",
]

ALGORITHMS = ("muon", "adamw")


def build_optimizer(
    named_params: Iterable[tuple[str, torch.nn.Parameter]],
    *,
    algorithm: str = "adamw",
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float,
    momentum: float = 0.95,
    nesterov: bool = True,
    update_rms: float = UPDATE_RMS,
    tp_group: dist.ProcessGroup | None = None,
    muon_shard_groups: Sequence[tuple[dist.ProcessGroup | None, Sequence[torch.nn.Parameter]]] | None = None,
    adamw_shard_groups: Sequence[tuple[dist.ProcessGroup | None, Sequence[torch.nn.Parameter]]] | None = None,
) -> torch.optim.AdamW | HybridOptimizer:
    """The optimizer of this rank's stage (module docstring for the assignment rule).

    ``algorithm="adamw"`` (the default, today's behaviour): torch AdamW in two groups. Group
    ``"decay"`` (``weight_decay``): matrices and embeddings (ndim >= 2). Group ``"no_decay"`` (weight
    decay 0): 1-D and 0-D parameters (norm scales, biases, sinks, scalars), any ``*.bias``, and any
    parameter of a module whose name contains ``norm`` (Megatron's rule plus the norm names).

    ``algorithm="muon"`` (V4, spec section 6): a :class:`HybridOptimizer` with groups ``"muon"``
    (:class:`parallel.muon.Muon`, ``weight_decay``, ``momentum``, ``nesterov``, ``update_rms``, V4's
    10 hybrid Newton-Schulz steps), ``"adamw_decay"`` (``weight_decay``) and ``"adamw_no_decay"`` (0).
    Muon reads each weight's ``muon_split`` (set by the model) to orthogonalise its blocks separately.

    Every group carries its ``"name"`` and ``"lr"``; empty groups are left out, and so are parameters
    that do not require grad. Parameters of more than 2 dims (none in a V4Stage) go to AdamW with decay,
    since Muon orthogonalises matrices only.

    Args:
        named_params: ``module.named_parameters()`` of this rank's stage (fully qualified names).
        algorithm: ``"muon"`` or ``"adamw"``.
        lr: learning rate of every group (the trainer sets ``group["lr"]`` each step).
        weight_decay: decoupled weight decay of the decaying groups; V4 uses 0.1.
        betas: Adam's (beta1, beta2); V4 uses (0.9, 0.95).
        eps: Adam's epsilon; V4 uses 1e-20.
        momentum: Muon's mu; V4 uses 0.95.
        nesterov: Muon's Nesterov input; V4 uses it.
        update_rms: Muon's update RMS gamma; V4 uses 0.18.
        tp_group: the tensor-parallel group, over which Muon gathers the sharded matrices; None
            without tensor parallelism.
        muon_shard_groups: with ``algorithm="muon"``, ``(data-parallel group, parameters)`` pairs
            covering every parameter once (V4: dense over data parallel, routed experts over expert data
            parallel): Muon becomes :class:`parallel.distributed_muon.DistributedMuon`, each matrix
            updated by one rank of its group. Non-Muon parameters in the pairs are ignored. None: every
            rank updates every matrix.
        adamw_shard_groups: the same pairs for the AdamW parameters: AdamW becomes
            :class:`parallel.distributed_adamw.DistributedAdamW`, each parameter's moments and update on one
            rank of its group (ZeRO-1). Non-AdamW parameters in the pairs are ignored. None: replicated.
    Returns:
        torch AdamW (``"adamw"``) or a :class:`HybridOptimizer` (``"muon"``).
    Raises:
        ValueError: an unknown ``algorithm``, no trainable parameter was given (naming
            ``named_params``), or torch / Muon rejects a hyperparameter or a parameter.
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"build_optimizer: algorithm={algorithm!r}, choose one of {', '.join(ALGORITHMS)}")
    rule = _hybrid_group if algorithm == "muon" else _adamw_group
    groups: dict[str, list[torch.nn.Parameter]] = {name: [] for name in _GROUP_NAMES[algorithm]}
    for name, param in named_params:
        if param.requires_grad:
            groups[rule(name, param)].append(param)
    if not any(groups.values()):
        raise ValueError("build_optimizer: named_params holds no parameter that requires grad")
    decays = {"decay": weight_decay, "no_decay": 0.0, "adamw_decay": weight_decay, "adamw_no_decay": 0.0}
    adamw_groups = [
        {"name": group, "params": params, "weight_decay": decays[group]}
        for group, params in groups.items()
        if params and group != "muon"
    ]
    adamw = None
    if adamw_groups and adamw_shard_groups is None:
        adamw = torch.optim.AdamW(adamw_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    elif adamw_groups:
        in_adamw = {id(p) for g in adamw_groups for p in g["params"]}
        adamw = DistributedAdamW(adamw_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, shard_groups=[
            (group, [p for p in params if id(p) in in_adamw]) for group, params in adamw_shard_groups])
    if algorithm == "adamw":
        return adamw
    muon = None
    if groups["muon"]:
        settings = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_steps=V4_NS_STEPS, update_rms=update_rms, tp_group=tp_group)
        muon_group = [{"name": "muon", "params": groups["muon"]}]
        if muon_shard_groups is None:
            muon = Muon(muon_group, **settings)
        else:
            in_muon = {id(p) for p in groups["muon"]}
            muon = DistributedMuon(muon_group, **settings, shard_groups=[
                (group, [p for p in params if id(p) in in_muon]) for group, params in muon_shard_groups])
    return HybridOptimizer([opt for opt in (muon, adamw) if opt is not None])


_GROUP_NAMES = {"adamw": ("decay", "no_decay"), "muon": ("muon", "adamw_decay", "adamw_no_decay")}


def _adamw_group(name: str, param: torch.nn.Parameter) -> str:
    *module_path, leaf = name.split(".")
    decays = param.ndim >= 2 and leaf != "bias" and not any("norm" in part for part in module_path)
    return "decay" if decays else "no_decay"


def _hybrid_group(name: str, param: torch.nn.Parameter) -> str:
    *module_path, leaf = name.split(".")
    # norms, biases and bias-like tensors never decay (Megatron's rule); ``ape`` is a per-slot bias
    plain = not any("norm" in part for part in module_path) and leaf not in ("bias", "ape")
    if param.ndim == 2 and plain and not any(part in ("embed", "head") for part in module_path):
        return "muon"
    return "adamw_decay" if param.ndim >= 2 and plain else "adamw_no_decay"


class HybridOptimizer:
    """One optimizer object over torch optimizers that own disjoint parameters (V4: Muon + AdamW).

    What the trainer and the checkpoint use of a torch optimizer: ``step(closure=None)`` (each
    optimizer in order; the closure runs once), ``zero_grad(set_to_none=True)``, ``param_groups`` (the
    optimizers' group dicts, concatenated: assigning ``group["lr"]`` reaches the owner), ``state`` (a
    mutable mapping param -> state dict that reads and writes the owning optimizer's state),
    ``state_dict()`` / ``load_state_dict()``. ``owner(param)`` names the optimizer of a parameter.

    Raises:
        ValueError: no optimizer is given, or two optimizers share a parameter.
    """

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]):
        if not optimizers:
            raise ValueError("HybridOptimizer: needs at least one optimizer")
        self.optimizers = tuple(optimizers)
        self._owner: dict[int, torch.optim.Optimizer] = {}
        for opt in self.optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    if id(p) in self._owner:
                        raise ValueError(f"HybridOptimizer: a parameter of shape {tuple(p.shape)} belongs to both "
                                         f"{type(self._owner[id(p)]).__name__} and {type(opt).__name__}")
                    self._owner[id(p)] = opt
        self.state = _MergedState(self)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for opt in self.optimizers for group in opt.param_groups]

    def owner(self, param: torch.Tensor) -> torch.optim.Optimizer:
        """The optimizer that updates ``param``; KeyError when none does."""
        try:
            return self._owner[id(param)]
        except KeyError:
            raise KeyError(f"HybridOptimizer: no optimizer owns the parameter of shape {tuple(param.shape)}") from None

    def owns(self, param: torch.Tensor) -> bool:
        return id(param) in self._owner

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Step every optimizer; ``closure`` (re-evaluating the loss) runs once, before the updates."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, list]:
        """``{"kinds": [class names], "optimizers": [each optimizer's state_dict()]}``."""
        return {"kinds": [type(opt).__name__ for opt in self.optimizers],
                "optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, list]) -> None:
        """Load a :meth:`state_dict`; ValueError when its optimizer kinds differ from this object's."""
        kinds = [type(opt).__name__ for opt in self.optimizers]
        if state_dict.get("kinds") != kinds:
            raise ValueError(f"HybridOptimizer.load_state_dict: saved optimizers {state_dict.get('kinds')}, "
                             f"this object has {kinds}")
        for opt, sd in zip(self.optimizers, state_dict["optimizers"]):
            opt.load_state_dict(sd)


class _MergedState(MutableMapping):
    """``HybridOptimizer.state``: param -> state dict, stored in the owning optimizer's ``state``.

    Reading a parameter without state behaves as torch's defaultdict (an empty dict is created);
    ``get`` and ``in`` never create one. A parameter no optimizer owns raises KeyError on access.
    """

    def __init__(self, hybrid: HybridOptimizer):
        self._hybrid = hybrid

    def __getitem__(self, param: torch.Tensor) -> dict:
        return self._hybrid.owner(param).state[param]

    def __setitem__(self, param: torch.Tensor, value: dict) -> None:
        self._hybrid.owner(param).state[param] = value

    def __delitem__(self, param: torch.Tensor) -> None:
        del self._hybrid.owner(param).state[param]

    def __iter__(self) -> Iterator[torch.Tensor]:
        for opt in self._hybrid.optimizers:
            yield from opt.state

    def __len__(self) -> int:
        return sum(len(opt.state) for opt in self._hybrid.optimizers)

    def __contains__(self, param: object) -> bool:
        return isinstance(param, torch.Tensor) and self._hybrid.owns(param) and param in self._hybrid.owner(param).state

    def get(self, param: torch.Tensor, default: Any = None) -> Any:
        return self._hybrid.owner(param).state.get(param, default) if self._hybrid.owns(param) else default

    def clear(self) -> None:
        for opt in self._hybrid.optimizers:
            opt.state.clear()


def distributed_adamw_of(optimizer: torch.optim.Optimizer | HybridOptimizer) -> DistributedAdamW | None:
    """The :class:`parallel.distributed_adamw.DistributedAdamW` of ``optimizer`` (itself or a part of a
    :class:`HybridOptimizer`); None without one."""
    optimizers = optimizer.optimizers if isinstance(optimizer, HybridOptimizer) else (optimizer,)
    return next((opt for opt in optimizers if isinstance(opt, DistributedAdamW)), None)


def adamw_flat_shards(
    optimizer: torch.optim.Optimizer | HybridOptimizer,
    shard_groups: Sequence[tuple[dist.ProcessGroup | None, Sequence[torch.Tensor]]],
) -> list[FlatShard]:
    """The flat gradient buffers of ``optimizer``'s AdamW parameters: one :class:`parallel.ownership.FlatShard`
    per ``(data-parallel group, parameters)`` pair (the pairs ``adamw_shard_groups`` of :func:`build_optimizer`
    takes; non-AdamW parameters ignored), in the AdamW optimizer's parameter order. A
    :class:`parallel.distributed_adamw.DistributedAdamW` gives its own; a replicated AdamW the layout it would
    have, so the replicated run all-reduces the buffers the distributed one reduce-scatters
    (:func:`parallel.data_parallel.reduce_flat_gradients`). Empty without an AdamW part."""
    optimizers = optimizer.optimizers if isinstance(optimizer, HybridOptimizer) else (optimizer,)
    adamw = next((opt for opt in optimizers if isinstance(opt, torch.optim.AdamW)), None)
    if adamw is None:
        return []
    if isinstance(adamw, DistributedAdamW):
        return adamw.shards
    held = [p for group in adamw.param_groups for p in group["params"]]
    in_adamw = {id(p) for p in held}
    pairs = [(group, [p for p in params if id(p) in in_adamw]) for group, params in shard_groups]
    return [FlatShard(ps, group) for group, ps in resolve_shard_groups("adamw_flat_shards", held, pairs)]


@contextlib.contextmanager
def global_state(optimizer: torch.optim.Optimizer | HybridOptimizer) -> Iterator[None]:
    """Inside the block, ``optimizer.state`` holds every parameter's whole state on every rank, as a
    non-distributed optimizer would (what a checkpoint saves and loads by global name); on exit each
    rank keeps only the state it owns again (a loaded value included).

    Collective over the data-parallel groups of a :class:`parallel.distributed_muon.DistributedMuon` or
    :class:`parallel.distributed_adamw.DistributedAdamW` (enter on every rank); nothing happens for others.
    """
    optimizers = optimizer.optimizers if isinstance(optimizer, HybridOptimizer) else (optimizer,)
    distributed = [opt for opt in optimizers if isinstance(opt, (DistributedMuon, DistributedAdamW))]
    for opt in distributed:
        opt.gather_state()
    try:
        yield
    finally:
        for opt in distributed:
            opt.scatter_state()


def initial_state(optimizer: torch.optim.Optimizer | HybridOptimizer, param: torch.Tensor) -> dict[str, torch.Tensor]:
    """The state ``optimizer`` would create for ``param`` at its first step (nothing is stored).

    Muon: ``step`` 0 (0-d float32) and a zero ``momentum_buffer``. torch AdamW (as its ``_init_group``
    in torch 2.13): ``step`` 0 (0-d; float32, float64 under a float64 default dtype unless fused; on the
    parameter's device when capturable or fused, else the CPU), zero ``exp_avg`` and ``exp_avg_sq``
    (the parameter's shape, dtype, device), and ``max_exp_avg_sq`` with amsgrad. Saving it changes
    nothing, so a checkpoint can hold state for never-stepped parameters.

    Raises:
        KeyError: ``param`` is not in ``optimizer``.
        TypeError: ``optimizer`` (or the owner of ``param``) is neither Muon nor AdamW.
    """
    opt = optimizer.owner(param) if isinstance(optimizer, HybridOptimizer) else optimizer
    group = next((g for g in opt.param_groups if any(p is param for p in g["params"])), None)
    if group is None:
        raise KeyError(f"initial_state: the parameter of shape {tuple(param.shape)} is not in {type(opt).__name__}")
    if isinstance(opt, Muon):
        return opt.initial_state(param)
    if not isinstance(opt, torch.optim.AdamW):
        raise TypeError(f"initial_state: no rule for {type(opt).__name__} (Muon and AdamW only)")
    on_device = group["capturable"] or group["fused"]
    wide = torch.get_default_dtype() == torch.float64 and not group["fused"]
    state = {
        "step": torch.zeros((), dtype=torch.float64 if wide else torch.float32,
                            device=param.device if on_device else "cpu"),
        "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
        "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
    }
    if group["amsgrad"]:
        state["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    return state


def describe_assignment(
    optimizer: torch.optim.Optimizer | HybridOptimizer,
    named_params: Iterable[tuple[str, torch.nn.Parameter]],
) -> str:
    """A deterministic text table of every parameter's optimizer group, for the trainer's start-up log.

    One summary line per group (parameters, elements, optimizer), then one row per parameter in
    ``named_params`` order: name, shape (this rank's; ``tp d<k>`` marks a tensor-parallel shard along
    dim k), group (``(frozen)`` when it does not require grad, ``(none)`` when trainable but in no
    group), and its Muon blocks (``rows 2x96``, ``rows 4+4+16``; ``-`` when whole).

    Args:
        optimizer: what :func:`build_optimizer` returned (groups must carry ``"name"``).
        named_params: the same ``named_parameters()`` the optimizer was built from.
    Returns:
        The table, lines joined by newlines, no trailing newline.
    """
    group_of: dict[int, tuple[str, str]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            kind = type(optimizer.owner(p) if isinstance(optimizer, HybridOptimizer) else optimizer).__name__
            group_of[id(p)] = (group["name"], kind)
    rows, totals = [], {}
    for name, p in named_params:
        group, kind = group_of.get(id(p), ("(none)" if p.requires_grad else "(frozen)", "-"))
        count, numel, _ = totals.get(group, (0, 0, kind))
        totals[group] = (count + 1, numel + p.numel(), kind)
        shape = "x".join(str(s) for s in p.shape) or "scalar"
        if is_sharded(p):
            shape += f" tp d{p.partition_dim}"
        rows.append((name, shape, group, _split_text(getattr(p, "muon_split", None))))
    header = ("name", "shape", "group", "muon blocks")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    lines = [f"optimizer assignment: {len(rows)} parameters, {sum(t[1] for t in totals.values()):,} elements"]
    lines += [f"  {g:<16} {c:>5} params {n:>14,} elements  {k}" for g, (c, n, k) in totals.items()]
    lines += ["  ".join(f"{cell:<{w}}" for cell, w in zip(row[:3], widths)) + "  " + row[3] for row in [header, *rows]]
    return "\n".join(line.rstrip() for line in lines)


def _split_text(split: MuonSplit | None) -> str:
    if split is None:
        return "-"
    axis = "rows" if split.dim == 0 else "cols"
    if len(set(split.sizes)) == 1:
        return f"{axis} {len(split.sizes)}x{split.sizes[0]}"
    return f"{axis} " + "+".join(str(s) for s in split.sizes)


def clip_grad_norm_(
    params: Iterable[torch.nn.Parameter],
    max_norm: float,
    group: dist.ProcessGroup | None,
    *,
    exclude_from_norm: Iterable[torch.nn.Parameter] = (),
    shard_grads: Iterable[torch.Tensor] = (),
) -> float:
    """Global L2 norm of the gradients of the whole model; clip them to ``max_norm`` with one scale.

    norm = sqrt(sum over the group's ranks of sum_p ||grad_p||^2): the square sum is all-reduced over
    ``group``. Every distinct tensor must be counted by exactly one rank of the group: with the pipeline
    group, stages own disjoint parameters; over the whole world, the caller excludes replicas (data-
    parallel copies, TP-replicated tensors, expert-data-parallel copies) through ``exclude_from_norm``.
    Call after the gradient reductions, so replicas agree. When ``0 < max_norm < norm`` every gradient is
    multiplied by ``max_norm / (norm + 1e-6)`` (torch.nn.utils.clip_grad_norm_ and Megatron's
    clip_grads use the same coefficient). A non-finite norm is returned without clipping, so the
    caller can skip the step. Gradients that are None count as zero.

    Args:
        params: the parameters of this rank's stage.
        max_norm: clip threshold; <= 0 only measures.
        group: the ranks whose square sums add up (pipeline group or world); None for one process.
        exclude_from_norm: parameters scaled with the rest but not counted in the norm here: a copy
            another rank counts.
        shard_grads: views of gradients of ``params`` counted in the norm but not scaled on their own (the
            scaling of their gradient reaches them): a distributed optimizer's owned, reduce-scattered ranges,
            whose parameters are in ``exclude_from_norm``.
    Returns:
        The norm before clipping (float).
    """
    params = list(params)
    excluded = {id(p) for p in exclude_from_norm}
    grads = [p.grad for p in params if p.grad is not None]
    # Per-tensor norms and their square sum in fp64: the total then does not depend, to fp32's precision of the
    # clip coefficient, on how the gradients are cut into tensors (the distributed optimizer counts element
    # ranges, the plain run whole tensors; Muon's orthogonalisation magnifies a last-bit difference in a
    # near-singular gradient), and the cross-stage sum loses nothing. On the parameters' device, which is the
    # one the group's backend communicates from.
    norms = [torch.linalg.vector_norm(p.grad, dtype=torch.float64)
             for p in params if p.grad is not None and id(p) not in excluded]
    norms += [torch.linalg.vector_norm(g, dtype=torch.float64) for g in shard_grads]
    device = params[0].device if params else torch.device("cpu")
    square_sum = torch.zeros((), dtype=torch.float64, device=device)
    if norms:
        square_sum = torch.stack(norms).square().sum()
    if group is not None:
        dist.all_reduce(square_sum, op=dist.ReduceOp.SUM, group=group)
    total_norm = math.sqrt(square_sum.item())
    if max_norm > 0 and math.isfinite(total_norm):
        coef = max_norm / (total_norm + 1e-6)
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
    return total_norm
