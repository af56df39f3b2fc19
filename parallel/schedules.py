"""Pipeline schedules: the project's one entry point into Megatron-core's schedules.

pp == 1 runs Megatron's no-pipelining schedule (gradient accumulation over microbatches); pp > 1
runs its non-interleaved 1F1B schedule (PipeDream-Flush; Narayanan et al. 2021, "Efficient
Large-Scale Language Model Training on GPU Clusters using Megatron-LM", §2.2). Both come from
``megatron.core.pipeline_parallel.get_forward_backward_func``.

Shape letters: S sequence length, B micro-batch size, H stage-boundary width (``hidden_size``).
Stage boundaries travel as ``x_SBH`` fp32 tensors (Megatron's p2p layout).

The schedule is driven by the explicit :class:`~parallel.groups.ParallelContext`: its pipeline group
carries the p2p traffic, so Megatron's ``parallel_state`` globals are not consulted here.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from megatron.core.enums import ModelType
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
from megatron.core.process_groups_config import ProcessGroupCollection

from parallel import megatron_compat
from parallel.groups import ParallelContext

__all__ = ["forward_backward"]

LossFunc = Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, Any]]]
ForwardStepFunc = Callable[[Iterator, torch.nn.Module], tuple[torch.Tensor, LossFunc]]


def forward_backward(
    forward_step_func: ForwardStepFunc,
    data_iterator: Iterator,
    stage_module: torch.nn.Module,
    *,
    num_microbatches: int,
    seq_length: int,
    micro_batch_size: int,
    hidden_size: int,
    pctx: ParallelContext,
    forward_only: bool = False,
) -> list[dict[str, Any]]:
    """Run forward (and backward) over ``num_microbatches`` microbatches of this pipeline stage.

    Megatron's contract: ``forward_step_func(data_iterator, stage_module) -> (output, loss_func)``
    draws one microbatch from ``data_iterator`` (every stage draws, so keep the iterators in
    lock-step) and runs the stage; a non-last stage returns ``x_SBH`` = ``[seq_length,
    micro_batch_size, hidden_size]`` fp32, which is sent to the next stage and arrives through
    ``stage_module.set_input_tensor(x_SBH)`` (None on the first stage). On the last stage
    ``loss_func(output) -> (loss, {name: tensor})`` gives a scalar loss; the schedule backpropagates
    ``loss / num_microbatches``, so gradients accumulate (into ``.grad``; zero them before) to the
    gradient of the mean microbatch loss. No data-parallel reduction happens here
    (see :func:`parallel.data_parallel.all_reduce_gradients`).

    Before any communication the stages agree on the arguments (one small all-reduce over the
    pipeline group); any invalid or mismatched argument makes every stage raise instead of hang.
    ``num_microbatches < pp`` is legal: 1F1B then only warms up and cools down (Megatron's warm-up
    count is ``min(pp - pp_rank - 1, num_microbatches)``).

    Args:
        forward_step_func: as above.
        data_iterator: passed unchanged to ``forward_step_func``.
        stage_module: this rank's stage; must have ``set_input_tensor(tensor | None)``.
        num_microbatches, seq_length, micro_batch_size: ints >= 1, equal on every stage.
        hidden_size: H, the width of the boundary tensor, equal on every stage.
        pctx: this rank's layout (``ParallelContext.single()`` works for one process).
        forward_only: skip the backward (evaluation).
    Returns:
        The ``{name: tensor}`` dicts of every microbatch on the last stage (detached copies, so the
        schedule's in-place ``loss /= num_microbatches`` does not reach them); [] on other stages.
    Raises:
        ValueError: an argument is invalid or differs between stages (raised on every stage, before
            any p2p traffic), or a non-last stage's output is not ``[seq_length, micro_batch_size,
            hidden_size]`` fp32 (raised on that stage only, mid-schedule: its peers then fail on
            the pipeline group's timeout, so the caller must tear the group down).
        TypeError: ``loss_func`` does not return ``(loss, dict)``.
        megatron_compat.MegatronAssumptionError: the installed Megatron-core moved (CPU hosts).
    """
    megatron_compat.install()
    settings = {
        "num_microbatches": num_microbatches,
        "seq_length": seq_length,
        "micro_batch_size": micro_batch_size,
        "hidden_size": hidden_size,
        "forward_only": bool(forward_only),
    }
    _refuse_before_communication(
        pctx, settings, _local_problem(stage_module, settings, pctx), _device_of(stage_module)
    )

    config = _StageConfig(
        tensor_model_parallel_size=pctx.tp,
        pipeline_model_parallel_size=pctx.pp,
        pipeline_dtype=torch.float32,
        hidden_size=hidden_size,
    )
    p2p = P2PCommunicator(pp_group=pctx.pp_group, config=config) if pctx.pp > 1 else None
    schedule = get_forward_backward_func(pp_size=pctx.pp, vp_size=None)
    boundary_shape = (seq_length, micro_batch_size, hidden_size)
    losses = schedule(
        forward_step_func=_checked_step(forward_step_func, stage_module, boundary_shape, pctx),
        data_iterator=data_iterator,
        model=_StageView(stage_module, config),
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
        p2p_communicator=p2p,
        pg_collection=_process_groups(pctx),
    )
    # Drop the last received activation so its graph is not kept alive until the next step.
    stage_module.set_input_tensor(None)
    return list(losses)


@dataclasses.dataclass
class _StageConfig(ModelParallelConfig):
    """ModelParallelConfig plus the three TransformerConfig fields Megatron's schedules read.

    ``hidden_size`` sizes the p2p receive buffers; the other two keep TransformerConfig's defaults.
    """

    hidden_size: int = 0
    calculate_per_token_loss: bool = False
    fine_grained_activation_offloading: bool = False


class _StageView:
    """All Megatron's schedules need of a model: config, model_type and set_input_tensor."""

    def __init__(self, stage_module: torch.nn.Module, config: _StageConfig) -> None:
        self.stage_module = stage_module
        self.config = config
        self.model_type = ModelType.encoder_or_decoder

    def set_input_tensor(self, input_tensors: list[torch.Tensor | None]) -> None:
        # Megatron passes a one-element list; the stage contract takes the tensor itself.
        (x_SBH,) = input_tensors
        self.stage_module.set_input_tensor(x_SBH)


class _NoContextParallel:
    """Stands in for Megatron's context-parallel group: v4train runs with CP = 1 and the schedules
    only ask for its ``size()`` (to scale the loss and the p2p sequence length)."""

    @staticmethod
    def size() -> int:
        return 1

    @staticmethod
    def rank() -> int:
        return 0


def _process_groups(pctx: ParallelContext) -> ProcessGroupCollection:
    groups = ProcessGroupCollection()
    groups.tp = pctx.tp_group
    groups.pp = pctx.pp_group
    groups.dp_cp = pctx.dp_group
    groups.cp = _NoContextParallel()
    groups.embd = None  # no tied embedding across stages: nothing to all-reduce between them
    groups.pos_embd = None
    return groups


def _checked_step(
    forward_step_func: ForwardStepFunc,
    stage_module: torch.nn.Module,
    boundary_shape: tuple[int, int, int],
    pctx: ParallelContext,
) -> Callable[[Iterator, _StageView], tuple[torch.Tensor, LossFunc]]:
    def step(data_iterator: Iterator, _view: _StageView) -> tuple[torch.Tensor, LossFunc]:
        output, loss_func = forward_step_func(data_iterator, stage_module)
        if pctx.is_last_stage:
            return output, functools.partial(_logged_loss, loss_func)
        if tuple(output.shape) != boundary_shape or output.dtype != torch.float32:
            raise ValueError(
                f"pipeline stage {pctx.pp_rank} (rank {pctx.rank}) returned "
                f"{tuple(output.shape)} {output.dtype}; the next stage expects "
                f"[seq_length, micro_batch_size, hidden_size] = {list(boundary_shape)} "
                "torch.float32"
            )
        return output.contiguous(), loss_func  # gloo sends only contiguous tensors

    return step


def _logged_loss(loss_func: LossFunc, output: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    result = loss_func(output)
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], dict)):
        raise TypeError(
            f"loss_func must return (loss, {{name: tensor}}), got {type(result).__name__}"
        )
    loss, logged = result
    if loss.numel() != 1:
        raise ValueError(f"loss_func must return a scalar loss, got shape {tuple(loss.shape)}")
    # Megatron then divides `loss` in place by num_microbatches (schedules.py:269); a logged value
    # sharing its storage (e.g. `loss.detach()`) would silently be divided too (stack-notes §2).
    return loss, {
        name: value.detach().clone() if isinstance(value, torch.Tensor) else value
        for name, value in logged.items()
    }


def _local_problem(
    stage_module: torch.nn.Module, settings: dict[str, Any], pctx: ParallelContext
) -> str | None:
    problems = [
        f"{name}={value!r} must be an int >= 1"
        for name, value in settings.items()
        if name != "forward_only" and not _is_positive_int(value)
    ]
    if not callable(getattr(stage_module, "set_input_tensor", None)):
        problems.append(
            f"stage_module {type(stage_module).__name__} has no set_input_tensor(tensor) method "
            "(Megatron's pipeline contract)"
        )
    if pctx.pp > 1 and (pctx.pp_group is None or not dist.is_initialized()):
        problems.append(f"pctx.pp={pctx.pp} but no pipeline process group is initialised")
    return "; ".join(problems) or None


def _device_of(stage_module: torch.nn.Module) -> torch.device:
    """The stage's device: where its boundary tensors live and its group's backend communicates."""
    parameters = stage_module.parameters() if isinstance(stage_module, torch.nn.Module) else ()
    param = next(iter(parameters), None)
    return param.device if param is not None else torch.device("cpu")


def _refuse_before_communication(
    pctx: ParallelContext, settings: dict[str, Any], problem: str | None, device: torch.device
) -> None:
    """Raise on every stage when any stage has a problem or the stages' settings differ."""
    names = list(settings)
    # forward_only is a bool; an invalid size goes in as -1 (already reported as the local problem).
    local = [
        int(v) if _is_positive_int(v) or isinstance(v, bool) else -1 for v in settings.values()
    ]
    local.append(int(problem is not None))
    high = low = local
    if pctx.pp > 1 and pctx.pp_group is not None and dist.is_initialized():
        # Every stage joins this all-reduce, also one with a problem, so none is left waiting.
        # One all-reduce(MAX) of [values, -values] gives every stage the max and the min.
        both = torch.tensor(local + [-v for v in local], dtype=torch.int64, device=device)
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=pctx.pp_group)
        high, low = both[: len(local)].tolist(), [-v for v in both[len(local):].tolist()]
    where = f"rank {pctx.rank} (pipeline stage {pctx.pp_rank})"
    if problem is not None:
        raise ValueError(f"forward_backward refused on {where}: {problem}")
    if high[-1]:
        raise ValueError(
            f"forward_backward refused on {where}: another pipeline stage reported a problem"
        )
    disagreements = [
        f"{name} (min {lo}, max {hi})" for name, hi, lo in zip(names, high, low) if hi != lo
    ]
    if disagreements:
        raise ValueError(
            f"forward_backward refused on {where}: pipeline stages disagree on "
            + ", ".join(disagreements)
        )


def _is_positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
