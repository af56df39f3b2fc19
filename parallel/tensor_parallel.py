"""Tensor-parallel layers and region mappings for the V4 modules, on Megatron-core's ``tensor_parallel``.

``model/`` builds its TP-split pieces only through this module, so with a tensor-parallel size of 1 the
model is plain PyTorch (``nn.Linear``, ``nn.Embedding``, ``F.cross_entropy``: the single-process
reference) and with size > 1 it uses Megatron-core's layers (Shoeybi et al. 2019, "Megatron-LM", §3):

- :func:`column_linear`: ``ColumnParallelLinear`` (output features split; the input is replicated and
  its gradient all-reduced in the backward, Megatron's *f* operator).
- :func:`row_linear`: ``RowParallelLinear`` (input features split; the output is all-reduced in the
  forward, Megatron's *g* operator).
- :func:`vocab_embedding` / :func:`vocab_cross_entropy`: ``VocabParallelEmbedding`` and
  ``vocab_parallel_cross_entropy`` (vocabulary rows split).
- :func:`copy_to_region` (*f*: identity forward, all-reduce backward) for a replicated tensor that feeds
  head-split computation, :func:`reduce_from_region` (*g*) for partial sums over local heads,
  :func:`gather_heads` for a no-grad all-gather along a feature dim.
- :func:`scatter_tokens` / :func:`gather_tokens`: the MoE's token split across TP ranks (Megatron's
  sequence-parallel region, applied around the routed experts only).

Sharded parameters carry Megatron's attributes ``tensor_model_parallel=True``, ``partition_dim`` and
``partition_stride`` (set by :func:`mark_sharded`), which the initialiser, the optimizer (Muon gathers
whole matrices) and the checkpoint (saved whole, re-sliced at load) read through :func:`full_shape`,
:func:`shard_of` and :func:`gather_full`.

Every layer here requires ``size`` to divide the split dimension and raises ValueError naming it.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = [
    "TensorParallel", "column_linear", "row_linear", "vocab_embedding", "vocab_cross_entropy",
    "copy_to_region", "reduce_from_region", "gather_heads", "scatter_tokens", "gather_tokens",
    "mark_sharded", "is_sharded", "full_shape", "shard_of", "gather_full",
]


@dataclasses.dataclass(frozen=True)
class TensorParallel:
    """This rank's tensor-parallel group: ``size`` ranks, this one ``rank``; ``group`` None when size 1."""

    group: dist.ProcessGroup | None = None
    rank: int = 0
    size: int = 1

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"TensorParallel: rank {self.rank} / size {self.size} is not a valid rank")
        if self.size > 1 and self.group is None:
            raise ValueError(f"TensorParallel: size {self.size} needs a process group")

    @property
    def active(self) -> bool:
        return self.size > 1

    def split(self, n: int, what: str) -> int:
        """``n / size``; raises ValueError naming ``what`` when size does not divide n."""
        if n % self.size:
            raise ValueError(f"{what} ({n}) is not divisible by the tensor-parallel size tp={self.size}")
        return n // self.size


def _config(tp: TensorParallel):
    from megatron.core.model_parallel_config import ModelParallelConfig

    # Weights are created empty and filled by the model's name-seeded initialiser (any layout starts
    # from the same values), so Megatron's own initialisation is off.
    return ModelParallelConfig(tensor_model_parallel_size=tp.size, use_cpu_initialization=True,
                               perform_initialization=False, params_dtype=torch.float32)


def _no_init(_weight: torch.Tensor) -> None:
    return None


def mark_sharded(param: torch.Tensor, dim: int) -> torch.Tensor:
    """Set Megatron's tensor-parallel attributes on ``param`` (a shard along ``dim``, stride 1)."""
    from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

    set_tensor_model_parallel_attributes(param, is_parallel=True, dim=dim, stride=1)
    return param


def is_sharded(param: torch.Tensor) -> bool:
    """Whether ``param`` is one rank's shard of a tensor-parallel tensor."""
    return bool(getattr(param, "tensor_model_parallel", False))


def full_shape(param: torch.Tensor, tp: TensorParallel) -> tuple[int, ...]:
    """The whole tensor's shape: ``param``'s shape with ``partition_dim`` times ``tp.size`` when sharded."""
    shape = list(param.shape)
    if is_sharded(param):
        shape[param.partition_dim] *= tp.size
    return tuple(shape)


def shard_of(full: torch.Tensor, param: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """This rank's slice of ``full`` (shaped :func:`full_shape`) for ``param``; ``full`` itself when replicated."""
    if not is_sharded(param):
        return full
    dim = param.partition_dim
    n = full.shape[dim] // tp.size
    return full.narrow(dim, tp.rank * n, n)


def gather_full(tensor: torch.Tensor, param: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """The whole tensor from every rank's shard of ``tensor`` (``param``'s sharding; a collective over
    the TP group when sharded, else ``tensor`` unchanged). ``tensor`` is ``param`` or a same-shape state."""
    if not is_sharded(param) or not tp.active:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(tp.size)]
    dist.all_gather(parts, tensor.contiguous(), group=tp.group)
    return torch.cat(parts, dim=param.partition_dim)


def column_linear(in_features: int, out_features: int, tp: TensorParallel, *, what: str,
                  bias: bool = False) -> nn.Module:
    """``[B, T, in] -> [B, T, out / tp]`` (this rank's output features); ``nn.Linear`` when tp = 1.

    Raises ValueError naming ``what`` when tp does not divide ``out_features``.
    """
    if not tp.active:
        return nn.Linear(in_features, out_features, bias=bias)
    tp.split(out_features, what)
    from megatron.core.tensor_parallel import ColumnParallelLinear

    class _Column(ColumnParallelLinear):
        def forward(self, x):  # Megatron returns (output, bias)
            return super().forward(x)[0]

    layer = _Column(in_features, out_features, config=_config(tp), init_method=_no_init, bias=bias,
                    gather_output=False, tp_group=tp.group)
    mark_sharded(layer.weight, 0)
    if bias:
        mark_sharded(layer.bias, 0)
    return layer


def row_linear(in_features: int, out_features: int, tp: TensorParallel, *, what: str) -> nn.Module:
    """``[B, T, in / tp]`` (this rank's input features) ``-> [B, T, out]`` summed over TP ranks;
    ``nn.Linear`` when tp = 1. No bias. Raises ValueError naming ``what`` when tp does not divide ``in_features``."""
    if not tp.active:
        return nn.Linear(in_features, out_features, bias=False)
    tp.split(in_features, what)
    from megatron.core.tensor_parallel import RowParallelLinear

    class _Row(RowParallelLinear):
        def forward(self, x):
            return super().forward(x)[0]

    layer = _Row(in_features, out_features, config=_config(tp), init_method=_no_init, bias=False,
                 input_is_parallel=True, skip_bias_add=False, tp_group=tp.group)
    mark_sharded(layer.weight, 1)
    return layer


def vocab_embedding(vocab_size: int, dim: int, tp: TensorParallel) -> nn.Module:
    """``[B, S] int64 -> [B, S, dim]``, rows split over TP ranks (``nn.Embedding`` when tp = 1)."""
    if not tp.active:
        return nn.Embedding(vocab_size, dim)
    tp.split(vocab_size, "vocab_size")
    from megatron.core.tensor_parallel import VocabParallelEmbedding

    layer = VocabParallelEmbedding(vocab_size, dim, init_method=_no_init, config=_config(tp), tp_group=tp.group)
    mark_sharded(layer.weight, 0)
    return layer


def vocab_cross_entropy(logits_BSV: torch.Tensor, labels_BS: torch.Tensor, tp: TensorParallel,
                        ignore_index: int = -100) -> torch.Tensor:
    """Per-token cross-entropy ``[B, S]`` fp32 from logits ``[B, S, V / tp]`` (this rank's vocabulary
    rows); 0 where ``labels == ignore_index``. ``F.cross_entropy`` when tp = 1."""
    B, S, V = logits_BSV.shape
    if not tp.active:
        return F.cross_entropy(logits_BSV.reshape(B * S, V), labels_BS.reshape(B * S), reduction="none",
                               ignore_index=ignore_index).view(B, S)
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    ignored = labels_BS == ignore_index
    loss_BS = vocab_parallel_cross_entropy(logits_BSV.float(), labels_BS.masked_fill(ignored, 0))
    return loss_BS.masked_fill(ignored, 0.0)


def copy_to_region(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """Identity forward; the backward all-reduces the gradient over TP (a replicated tensor read by
    head-split computation, e.g. the shared KV entries)."""
    if not tp.active:
        return x
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region

    return copy_to_tensor_model_parallel_region(x, group=tp.group)


def reduce_from_region(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """All-reduce (sum) over TP in the forward, identity backward (partial sums over local heads)."""
    if not tp.active:
        return x
    from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

    # contiguous first: Megatron all-reduces input.contiguous() and returns the input, so a
    # non-contiguous input would come back unreduced
    return reduce_from_tensor_model_parallel_region(x.contiguous(), group=tp.group)


@torch.no_grad()
def gather_heads(x: torch.Tensor, tp: TensorParallel, dim: int) -> torch.Tensor:
    """All-gather (no gradient) of every rank's ``x`` concatenated along ``dim`` in rank order."""
    if not tp.active:
        return x
    parts = [torch.empty_like(x) for _ in range(tp.size)]
    dist.all_gather(parts, x.contiguous(), group=tp.group)
    return torch.cat(parts, dim=dim)


class _ScatterTokens(torch.autograd.Function):
    """Forward: this rank's contiguous 1/tp of the rows; backward: all-gather of the row gradients."""

    @staticmethod
    def forward(ctx, x, tp: TensorParallel):
        ctx.tp = tp
        n = x.shape[0] // tp.size
        return x[tp.rank * n:(tp.rank + 1) * n].contiguous()

    @staticmethod
    def backward(ctx, grad):
        parts = [torch.empty_like(grad) for _ in range(ctx.tp.size)]
        dist.all_gather(parts, grad.contiguous(), group=ctx.tp.group)
        return torch.cat(parts), None


class _GatherTokens(torch.autograd.Function):
    """Forward: all-gather of every rank's rows; backward: this rank's rows of the (replicated) gradient."""

    @staticmethod
    def forward(ctx, x, tp: TensorParallel):
        ctx.tp, ctx.n = tp, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(tp.size)]
        dist.all_gather(parts, x.contiguous(), group=tp.group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        # Every TP rank holds the same gradient of the gathered (replicated) tensor: keep our rows.
        return grad[ctx.tp.rank * ctx.n:(ctx.tp.rank + 1) * ctx.n].contiguous(), None


def scatter_tokens(x_TF: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """``[T, F]`` replicated -> this rank's ``[T / tp, F]`` rows (contiguous block ``rank``).

    Raises ValueError when tp does not divide T (tokens per micro-batch; the job spec checks it first).
    """
    if not tp.active:
        return x_TF
    tp.split(x_TF.shape[0], "tokens per micro-batch (micro_batch_size x seq_len)")
    return _ScatterTokens.apply(x_TF, tp)


def gather_tokens(x_TF: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """Inverse of :func:`scatter_tokens`: every rank's ``[T / tp, F]`` rows -> ``[T, F]`` replicated."""
    if not tp.active:
        return x_TF
    return _GatherTokens.apply(x_TF, tp)
