"""Data-parallel gradient averaging over flattened buckets.

Every data-parallel replica holds the same parameters and computed gradients on its own slice of the
global batch; averaging the gradients makes the optimizer step identical on every replica
(synchronous data parallelism, as Megatron's DDP does with its grad buffers).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from v4train.parallel.ownership import FlatShard

__all__ = ["all_reduce_gradients", "reduce_flat_gradients"]

_DEFAULT_BUCKET_NUMEL = 1 << 24  # 16 Mi elements (64 MB in fp32) per collective


def all_reduce_gradients(
    params: Iterable[torch.nn.Parameter],
    group: dist.ProcessGroup | None,
    *,
    bucket_numel: int = _DEFAULT_BUCKET_NUMEL,
    average: bool = True,
) -> None:
    """Replace each gradient by its mean (or, with ``average=False``, its sum) over ``group``, in place.

    Every rank of the group must pass the same parameters (same order, shapes and dtypes).
    Parameters that do not require grad are skipped. A ``.grad`` that is None on some ranks but not
    others counts as zero there and is materialised, so every rank ends with the same gradients and
    the collectives always match; a ``.grad`` that is None on every rank stays None (the parameter
    was unused by the whole global batch, as in a single-process run, so the optimizer skips it).
    Gradients are packed into flat buckets (one dtype per bucket, at most ``bucket_numel``
    elements, or one parameter if larger), summed with one all-reduce each, and divided by the
    group size (gloo has no AVG reduction).

    Args:
        params: the parameters of this rank's stage.
        group: the data-parallel group; None (one process) or a group of size 1 does nothing.
        bucket_numel: the largest number of elements packed into one all-reduce.
        average: divide the sum by the group size (data parallel); False sums (a parameter held by
            several pipeline stages, such as the embedding on the first and last stage).
    Raises:
        ValueError: ``bucket_numel`` < 1, or a gradient is sparse.
    """
    if bucket_numel < 1:
        raise ValueError(f"bucket_numel={bucket_numel} must be >= 1")
    if group is None or dist.get_world_size(group) == 1:
        return
    trainable = [p for p in params if p.requires_grad]
    for p in trainable:
        if p.grad is not None and p.grad.is_sparse:
            raise ValueError(f"sparse gradient of shape {tuple(p.shape)} is not supported")
    if not trainable:
        return
    has_grad = torch.tensor(
        [p.grad is not None for p in trainable], dtype=torch.int32, device=trainable[0].device
    )
    dist.all_reduce(has_grad, op=dist.ReduceOp.MAX, group=group)
    synced = [p for p, used in zip(trainable, has_grad.tolist()) if used]
    for p in synced:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    world = dist.get_world_size(group)
    for bucket in _buckets([p.grad for p in synced], bucket_numel):
        flat = _flatten_dense_tensors(bucket)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        if average:
            flat.div_(world)
        for grad, mean in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
            grad.copy_(mean)


@torch.no_grad()
def reduce_flat_gradients(shard: FlatShard, divisor: int, *, scatter: bool,
                          reduced: Sequence[torch.Tensor] = ()) -> None:
    """The gradients of ``shard.params`` summed over ``shard.group`` and divided by ``divisor``, through the
    shard's one flat buffer (:meth:`parallel.ownership.FlatShard.flat`): with ``scatter`` reduce-scattered, this
    rank's owned range of each ``.grad`` receiving the result and the rest keeping its local, unreduced value
    (the distributed optimizer); without, all-reduced whole. Both sum every element in the same order, so the
    owned ranges agree bit for bit.

    The gradients of ``reduced`` (parameters the caller has already reduced) are left as they are (their slots
    of the buffer are zeros). As :func:`all_reduce_gradients`: a gradient that is None on some ranks counts as
    zero there and is materialised, one that is None on every rank stays None. A group of one with
    ``divisor`` 1 does nothing. Collective over ``shard.group``.

    Raises:
        ValueError: a gradient is sparse.
    """
    if not shard.params or (shard.size == 1 and divisor == 1):
        return
    for p in shard.params:
        if p.grad is not None and p.grad.is_sparse:
            raise ValueError(f"sparse gradient of shape {tuple(p.shape)} is not supported")
    used = torch.tensor([p.grad is not None for p in shard.params], dtype=torch.int32, device=shard.params[0].device)
    if shard.size > 1:
        dist.all_reduce(used, op=dist.ReduceOp.MAX, group=shard.group)
    if not used.any():
        return
    for p, u in zip(shard.params, used.tolist(), strict=True):
        if u and p.grad is None:
            p.grad = torch.zeros_like(p)
    skip = {id(p) for p in reduced}
    grads = [p.grad if p.grad is not None and id(p) not in skip else torch.zeros_like(p) for p in shard.params]
    (shard.reduce_scatter if scatter else shard.all_reduce)(grads, divisor)
    for p, u in zip(shard.params, used.tolist(), strict=True):
        if not u:
            p.grad = None


def _buckets(grads: list[torch.Tensor], bucket_numel: int) -> list[list[torch.Tensor]]:
    """Consecutive same-dtype runs of ``grads``, each at most ``bucket_numel`` elements (or one
    tensor). Deterministic, so every rank builds the same buckets."""
    buckets: list[list[torch.Tensor]] = []
    numel = 0
    for grad in grads:
        if buckets and buckets[-1][0].dtype == grad.dtype and numel + grad.numel() <= bucket_numel:
            buckets[-1].append(grad)
            numel += grad.numel()
        else:
            buckets.append([grad])
            numel = grad.numel()
    return buckets
