"""Pipeline schedules: the project's one entry point into Megatron-core's schedules.

pp == 1 runs Megatron's no-pipelining schedule (gradient accumulation over microbatches); pp > 1
runs its non-interleaved 1F1B schedule (PipeDream-Flush; Narayanan et al. 2021, "Efficient
Large-Scale Language Model Training on GPU Clusters using Megatron-LM", §2.2.1), or, when each
rank holds a list of vp >= 2 model chunks, its interleaved 1F1B schedule (same paper, §2.2.2: the
pipeline bubble shrinks by the factor vp at the price of vp times more p2p messages). All three
come from ``megatron.core.pipeline_parallel.get_forward_backward_func``.

Shape letters: S sequence length, B micro-batch size, H stage-boundary width (``hidden_size``).
Stage boundaries travel as ``x_SBH`` fp32 tensors (Megatron's p2p layout).

The schedule is driven by the explicit :class:`~parallel.groups.ParallelContext`: its pipeline group
carries the p2p traffic, so Megatron's ``parallel_state`` globals are not consulted here.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.distributed as dist

from v4train.parallel import megatron_compat

# This module is the first to import Megatron-core in a rank: without compiling its fused helpers at import
# (megatron_compat.import_megatron_core), hence before the imports below.
megatron_compat.import_megatron_core()

from megatron.core.enums import ModelType  # noqa: E402
from megatron.core.model_parallel_config import ModelParallelConfig  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator  # noqa: E402
from megatron.core.process_groups_config import ProcessGroupCollection  # noqa: E402

from v4train.parallel.groups import ParallelContext  # noqa: E402

__all__ = ["forward_backward"]

LossFunc = Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, Any]]]
ForwardStepFunc = Callable[[Iterator, torch.nn.Module], tuple[torch.Tensor, LossFunc]]
# A rank's model chunks (virtual stages) may come as any of these; Megatron itself takes a list.
_CHUNK_CONTAINERS = (list, tuple, torch.nn.ModuleList)


def forward_backward(
    forward_step_func: ForwardStepFunc,
    data_iterator: Iterator | Sequence[Iterator],
    stage_module: torch.nn.Module | Sequence[torch.nn.Module],
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

    Virtual stages (interleaved 1F1B): ``stage_module`` may be a list (tuple, ``nn.ModuleList``) of
    ``vp`` model chunks. Chunk ``i`` on pipeline rank ``r`` is virtual stage ``i * pp + r`` of
    ``pp * vp`` (Megatron's placement: the last rank's chunk ``i`` feeds the first rank's chunk
    ``i + 1``), so the first virtual stage is chunk 0 on pipeline rank 0 and the last is chunk
    ``vp - 1`` on pipeline rank ``pp - 1``; a chunk knows its place from how the caller built it
    (Megatron 0.16.1 sets no virtual-rank global on this path, it only hands over the chunk).
    ``data_iterator`` must then be a list of ``vp`` iterators: chunk ``i``'s steps call
    ``forward_step_func(data_iterator[i], stage_module[i])``, once per microbatch, in microbatch
    order per chunk. Every chunk follows the single-stage contract above, with "first/last stage"
    read as "first/last virtual stage". Requires pp > 1 and ``num_microbatches`` a multiple of pp
    (Megatron's ``forward_backward_pipelining_with_interleaving`` groups microbatches by
    ``microbatch_group_size_per_vp_stage`` = pp and refuses a partial final group). A one-chunk
    list (with a one-iterator list) is the same as passing the module (non-interleaved 1F1B).

    Before any communication the stages agree on the arguments (one small all-reduce over the
    pipeline group); any invalid or mismatched argument, including the number of chunks ``vp``,
    makes every stage raise instead of hang. Without chunks, ``num_microbatches < pp`` is legal:
    1F1B then only warms up and cools down (Megatron's warm-up count is
    ``min(pp - pp_rank - 1, num_microbatches)``).

    Args:
        forward_step_func: as above.
        data_iterator: passed unchanged to ``forward_step_func``; a list of ``vp`` iterators, one
            per chunk, when ``stage_module`` is a list.
        stage_module: this rank's stage, or its ``vp`` chunks; each must have
            ``set_input_tensor(tensor | None)``.
        num_microbatches, seq_length, micro_batch_size: ints >= 1, equal on every stage.
        hidden_size: H, the width of the boundary tensor, equal on every stage.
        pctx: this rank's layout (``ParallelContext.single()`` works for one process).
        forward_only: skip the backward (evaluation).
    Returns:
        The ``{name: tensor}`` dicts of every microbatch on the last (virtual) stage, in microbatch
        order (detached copies, so the schedule's in-place ``loss /= num_microbatches`` does not
        reach them); [] on other pipeline ranks.
    Raises:
        ValueError: an argument is invalid or differs between stages (raised on every stage, before
            any p2p traffic; with chunks also: vp > 1 with pp == 1, ``num_microbatches`` not a
            multiple of pp, ``data_iterator`` not a list of vp iterators), or a non-last stage's
            output is not ``[seq_length, micro_batch_size, hidden_size]`` fp32 (raised on that
            stage only, mid-schedule: its peers then fail on the pipeline group's timeout, so the
            caller must tear the group down).
        TypeError: ``loss_func`` does not return ``(loss, dict)``.
        megatron_compat.MegatronAssumptionError: the installed Megatron-core moved (CPU hosts).
    """
    megatron_compat.install()
    chunked = isinstance(stage_module, _CHUNK_CONTAINERS)
    chunks = list(stage_module) if chunked else [stage_module]
    settings = {
        "num_microbatches": num_microbatches,
        "seq_length": seq_length,
        "micro_batch_size": micro_batch_size,
        "hidden_size": hidden_size,
        "vp": len(chunks),
        "forward_only": bool(forward_only),
    }
    problem = _local_problem(chunks, data_iterator if chunked else None, settings, pctx)
    _refuse_before_communication(pctx, settings, problem, _device_of(chunks))

    vp = len(chunks)
    interleaved = vp > 1
    config = _StageConfig(
        tensor_model_parallel_size=pctx.tp,
        pipeline_model_parallel_size=pctx.pp,
        virtual_pipeline_model_parallel_size=vp if interleaved else None,
        # Interleaved steady state sends activations and gradients both ways at once. Batched
        # (one tagless batch_isend_irecv) they pair FIFO per peer, and with pp == 2 the previous
        # and next rank are the same peer, so activation and gradient arrive swapped (silently:
        # same shape; Megatron-LM issue #750). Split, overlapped p2p keeps the two directions
        # apart; it is also Megatron-LM's own default for the interleaved schedule.
        overlap_p2p_comm=interleaved,
        batch_p2p_comm=not interleaved,
        pipeline_dtype=torch.float32,
        hidden_size=hidden_size,
    )
    p2p = P2PCommunicator(pp_group=pctx.pp_group, config=config) if pctx.pp > 1 else None
    schedule = get_forward_backward_func(
        pp_size=pctx.pp, vp_size=config.virtual_pipeline_model_parallel_size
    )
    views = [_StageView(chunk, config, index, pctx, vp) for index, chunk in enumerate(chunks)]
    if chunked:
        # The interleaved schedule asserts a list; a single chunk runs the plain schedule.
        data_iterator = list(data_iterator) if interleaved else data_iterator[0]
    boundary_shape = (seq_length, micro_batch_size, hidden_size)
    losses = schedule(
        forward_step_func=_checked_step(forward_step_func, boundary_shape),
        data_iterator=data_iterator,
        model=views if interleaved else views[0],
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
        p2p_communicator=p2p,
        pg_collection=_process_groups(pctx),
    )
    # Drop the last received activations so their graphs are not kept alive until the next step.
    for chunk in chunks:
        chunk.set_input_tensor(None)
    return list(losses)


@dataclasses.dataclass
class _StageConfig(ModelParallelConfig):
    """ModelParallelConfig plus the three TransformerConfig fields Megatron's schedules read.

    ``hidden_size`` sizes the p2p receive buffers; the other two keep TransformerConfig's defaults.
    """

    hidden_size: int = 0
    calculate_per_token_loss: bool = False
    fine_grained_activation_offloading: bool = False


class _StageView(torch.nn.Module):
    """All Megatron's schedules need of a model chunk: config, model_type and set_input_tensor.

    An ``nn.Module`` because the interleaved schedule asserts that every chunk is one; ``vp_stage``
    is the chunk's index on this rank, which Megatron's ``forward_step_calc_loss`` checks against
    the chunk it is scheduling.
    """

    def __init__(
        self,
        stage_module: torch.nn.Module,
        config: _StageConfig,
        vp_stage: int,
        pctx: ParallelContext,
        vp: int,
    ) -> None:
        super().__init__()
        self.stage_module = stage_module
        self.config = config
        self.model_type = ModelType.encoder_or_decoder
        self.vp_stage = vp_stage
        self.virtual_stage = vp_stage * pctx.pp + pctx.pp_rank
        self.is_last_virtual_stage = self.virtual_stage == vp * pctx.pp - 1
        self.where = (
            f"pipeline stage {pctx.pp_rank} (rank {pctx.rank})"
            if vp == 1
            else f"virtual stage {self.virtual_stage} (chunk {vp_stage} of pipeline stage "
            f"{pctx.pp_rank}, rank {pctx.rank})"
        )

    def set_input_tensor(self, input_tensors: list[torch.Tensor | None]) -> None:
        # Megatron passes a one-element list; the stage contract takes the tensor itself.
        (x_SBH,) = input_tensors
        self.stage_module.set_input_tensor(x_SBH)


class _NoContextParallel:
    """Stands in for Megatron's context-parallel group in the schedules, which ask only for its ``size()``
    (to multiply the loss by it and divide the p2p sequence length by it). v4train's stages split the
    sequence themselves (``parallel/context_parallel.py``): the caller passes the local sequence length,
    and the step's loss is this rank's share of the whole sequences' loss, its gradients summed (not
    averaged) over the context-parallel ranks, so neither of Megatron's CP adjustments applies."""

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
    forward_step_func: ForwardStepFunc, boundary_shape: tuple[int, int, int]
) -> Callable[[Iterator, _StageView], tuple[torch.Tensor, LossFunc]]:
    def step(data_iterator: Iterator, view: _StageView) -> tuple[torch.Tensor, LossFunc]:
        output, loss_func = forward_step_func(data_iterator, view.stage_module)
        if view.is_last_virtual_stage:
            return output, functools.partial(_logged_loss, loss_func)
        if tuple(output.shape) != boundary_shape or output.dtype != torch.float32:
            raise ValueError(
                f"{view.where} returned {tuple(output.shape)} {output.dtype}; the next stage "
                f"expects [seq_length, micro_batch_size, hidden_size] = {list(boundary_shape)} "
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
    # sharing its storage (e.g. `loss.detach()`) would silently be divided too.
    return loss, {
        name: value.detach().clone() if isinstance(value, torch.Tensor) else value
        for name, value in logged.items()
    }


def _local_problem(
    chunks: list[Any],
    chunk_iterators: Any,
    settings: dict[str, Any],
    pctx: ParallelContext,
) -> str | None:
    """What is wrong with this stage's arguments, or None; ``chunk_iterators`` is the
    ``data_iterator`` when ``stage_module`` came as a list of chunks, else None."""
    problems = [
        f"{name}={value!r} must be an int >= 1"
        for name, value in settings.items()
        if name not in ("forward_only", "vp") and not _is_positive_int(value)
    ]
    vp = settings["vp"]
    if vp == 0:
        problems.append("stage_module is an empty list of model chunks")
    for index, chunk in enumerate(chunks):
        if not callable(getattr(chunk, "set_input_tensor", None)):
            which = "stage_module" if chunk_iterators is None else f"stage_module[{index}]"
            problems.append(
                f"{which} {type(chunk).__name__} has no set_input_tensor(tensor) method "
                "(Megatron's pipeline contract)"
            )
    if pctx.pp > 1 and (pctx.pp_group is None or not dist.is_initialized()):
        problems.append(f"pctx.pp={pctx.pp} but no pipeline process group is initialised")
    if chunk_iterators is not None and not (
        isinstance(chunk_iterators, (list, tuple)) and len(chunk_iterators) == vp
    ):
        problems.append(
            f"data_iterator must be a list of vp={vp} iterators (one per model chunk), got "
            + (
                f"a {type(chunk_iterators).__name__} of {len(chunk_iterators)}"
                if isinstance(chunk_iterators, (list, tuple))
                else f"a {type(chunk_iterators).__name__}"
            )
        )
    if vp > 1 and pctx.pp == 1:
        problems.append(
            f"vp={vp} model chunks need pipeline parallelism (pctx.pp=1): Megatron interleaves "
            "virtual stages across pipeline ranks only"
        )
    elif vp > 1 and _is_positive_int(settings["num_microbatches"]):
        # Megatron groups microbatches per virtual stage in groups of
        # microbatch_group_size_per_vp_stage (= pp): it needs pp <= num_microbatches and refuses a
        # final group smaller than pp (schedules.py:995-1015), i.e. a multiple of pp.
        if settings["num_microbatches"] % pctx.pp:
            problems.append(
                f"num_microbatches={settings['num_microbatches']} must be a multiple of "
                f"pp={pctx.pp} for the interleaved schedule (vp={vp} model chunks)"
            )
    return "; ".join(problems) or None


def _device_of(chunks: list[Any]) -> torch.device:
    """The stage's device: where its boundary tensors live and its group's backend communicates."""
    for chunk in chunks:
        if isinstance(chunk, torch.nn.Module):
            param = next(iter(chunk.parameters()), None)
            if param is not None:
                return param.device
    return torch.device("cpu")


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
