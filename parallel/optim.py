"""AdamW with decay / no-decay groups, and global gradient-norm clipping across pipeline stages.

AdamW settings follow DeepSeek-V4 (deepseek-v4.md §6, R §2.4): betas (0.9, 0.95), epsilon given
by the caller (V4 uses 1e-20), decoupled weight decay 0.1. Muon for the hidden matrices is a later
issue; for now every parameter is optimised by AdamW.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist

__all__ = ["build_optimizer", "clip_grad_norm_"]


def build_optimizer(
    named_params: Iterable[tuple[str, torch.nn.Parameter]],
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float,
) -> torch.optim.AdamW:
    """torch AdamW over the trainable parameters, in two groups.

    Group ``"decay"`` (``weight_decay``): matrices and embeddings (ndim >= 2). Group
    ``"no_decay"`` (weight decay 0): 1-D and 0-D parameters (norm scales, biases, sinks, scalars),
    any ``*.bias``, and any parameter of a module whose name contains ``norm`` (Megatron's rule plus
    the norm names). Each group carries its ``"name"``; empty groups are left out, and so are
    parameters that do not require grad.

    Args:
        named_params: ``module.named_parameters()`` of this rank's stage.
        lr: learning rate (the scheduler may change it per group later).
        weight_decay: decoupled weight decay of the ``"decay"`` group.
        betas: Adam's (beta1, beta2); V4 uses (0.9, 0.95).
        eps: Adam's epsilon; V4 uses 1e-20.
    Returns:
        The optimizer.
    Raises:
        ValueError: no trainable parameter was given (naming ``named_params``), or torch rejects a
            hyperparameter.
    """
    groups: dict[str, list[torch.nn.Parameter]] = {"decay": [], "no_decay": []}
    for name, param in named_params:
        if param.requires_grad:
            groups["decay" if _decays(name, param) else "no_decay"].append(param)
    param_groups = [
        {"name": group, "params": params, "weight_decay": weight_decay if group == "decay" else 0.0}
        for group, params in groups.items()
        if params
    ]
    if not param_groups:
        raise ValueError("build_optimizer: named_params holds no parameter that requires grad")
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


def _decays(name: str, param: torch.nn.Parameter) -> bool:
    *module_path, leaf = name.split(".")
    return param.ndim >= 2 and leaf != "bias" and not any("norm" in part for part in module_path)


def clip_grad_norm_(
    params: Iterable[torch.nn.Parameter],
    max_norm: float,
    group: dist.ProcessGroup | None,
    *,
    exclude_from_norm: Iterable[torch.nn.Parameter] = (),
) -> float:
    """Global L2 norm of the gradients of every stage; clip them to ``max_norm`` with one scale.

    norm = sqrt(sum over the group's ranks of sum_p ||grad_p||^2): the square sum is all-reduced
    over ``group``, the pipeline group, since stages own disjoint parameters (call after the
    data-parallel average, so DP replicas agree). When ``0 < max_norm < norm`` every gradient is
    multiplied by ``max_norm / (norm + 1e-6)`` (torch.nn.utils.clip_grad_norm_ and Megatron's
    clip_grads use the same coefficient). A non-finite norm is returned without clipping, so the
    caller can skip the step. Gradients that are None count as zero.

    Args:
        params: the parameters of this rank's stage.
        max_norm: clip threshold; <= 0 only measures.
        group: the pipeline group; None for one process (no all-reduce).
        exclude_from_norm: parameters scaled with the rest but not counted in the norm: a second copy
            of a parameter another stage also holds (so it is counted once).
    Returns:
        The norm before clipping (float).
    """
    params = list(params)
    excluded = {id(p) for p in exclude_from_norm}
    grads = [p.grad for p in params if p.grad is not None]
    # Per-tensor norms in fp32, their squares summed in fp64 so the cross-stage sum loses nothing;
    # on the parameters' device, which is the one the group's backend communicates from.
    norms = [torch.linalg.vector_norm(p.grad, dtype=torch.float32)
             for p in params if p.grad is not None and id(p) not in excluded]
    device = params[0].device if params else torch.device("cpu")
    square_sum = torch.zeros((), dtype=torch.float64, device=device)
    if norms:
        square_sum = torch.stack(norms).double().square().sum()
    if group is not None:
        dist.all_reduce(square_sum, op=dist.ReduceOp.SUM, group=group)
    total_norm = math.sqrt(square_sum.item())
    if max_norm > 0 and math.isfinite(total_norm):
        coef = max_norm / (total_norm + 1e-6)
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
    return total_norm
