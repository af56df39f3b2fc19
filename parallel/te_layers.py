"""FP8 on GPU: the V4 projections as Transformer Engine linears, run under ``fp8_autocast`` (blockwise recipe).

:func:`enable_te_fp8` swaps, in place, every linear that FP8 runs (:func:`parallel.fp8.fp8_eligible_linears`:
attention, shared and routed experts, MTP projections; never the head, embeddings, router, mHC,
compressor, indexer or ``wo_a``) for ``transformer_engine.pytorch.Linear`` of the same features:

* ``nn.Linear`` (tensor parallel size 1) -> ``te.Linear(in, out)``;
* Megatron-core ``ColumnParallelLinear`` -> ``te.Linear(..., parallel_mode="column", tp_group, tp_size)``,
  ``RowParallelLinear`` -> ``parallel_mode="row"`` (TE splits the same dimension and all-reduces the row
  output in its forward, as Megatron's *g* does), so every rank's weight shard has the same shape and the
  same slice of the full matrix.

``te.Linear`` is the layer Megatron-core's ``TEColumnParallelLinear`` / ``TERowParallelLinear`` wrap; they are
not used because they take a whole ``TransformerConfig`` and apply their own initialisation, while the swap
must keep the values the stage was built (or loaded) with. The TE layer keeps the parameter names
(``weight``, ``bias``), shapes, values, dtype and the sharding attributes of ``parallel/tensor_parallel.py``,
so a checkpoint of an FP8 run loads without FP8 and the reverse. Its forward returns the output only, as
the model's layers do. The forward runs under :func:`parallel.fp8.fp8_autocast_context` (TE's
``fp8_autocast`` with ``Float8BlockScaling``: e4m3, 1 x 128 activation and 128 x 128 weight scales).

Call on the built stage, before the optimizer is built (new Parameter objects) and before any wrapper.
TE is imported only when called; without it :func:`orchestrator.rank.devices.resolve_placement` has
already refused ``train.fp8`` on GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from v4train.parallel.fp8 import fp8_eligible_linears

__all__ = ["TeSwap", "plan_te_swaps", "enable_te_fp8"]

# Megatron's and parallel/tensor_parallel.py's attributes on sharded parameters, carried to the TE weights.
_SHARDING_ATTRS = ("tensor_model_parallel", "partition_dim", "partition_stride")


@dataclass(frozen=True)
class TeSwap:
    """One linear to rebuild: dotted ``name``, full ``in_features`` / ``out_features``, ``bias``,
    ``parallel_mode`` (None, ``column`` or ``row``), ``tp_size``, and the local ``weight_shape``
    ``[out_local, in_local]`` the TE layer must have."""

    name: str
    in_features: int
    out_features: int
    bias: bool
    parallel_mode: str | None
    tp_size: int
    weight_shape: tuple[int, int]


def plan_te_swaps(module: nn.Module, *, min_features: int = 16) -> list[TeSwap]:
    """The :class:`TeSwap` of every FP8-eligible linear below ``module``, in ``named_modules`` order.

    Raises ValueError when a Megatron layer's local weight is not its full matrix split evenly along the
    dimension its mode splits (TE would build another shape).
    """
    swaps = []
    for name, child in fp8_eligible_linears(module, min_features=min_features):
        w = child.weight
        if isinstance(child, nn.Linear):
            swaps.append(TeSwap(name, child.in_features, child.out_features, child.bias is not None, None, 1,
                                tuple(w.shape)))
            continue
        from megatron.core.tensor_parallel import ColumnParallelLinear   # imported: a Megatron layer exists

        mode = "column" if isinstance(child, ColumnParallelLinear) else "row"
        tp_size = child.output_size // w.shape[0] if mode == "column" else child.input_size // w.shape[1]
        expected = ((child.output_size // tp_size, child.input_size) if mode == "column"
                    else (child.output_size, child.input_size // tp_size))
        if tuple(w.shape) != expected:
            raise ValueError(f"enable_te_fp8: {name}: weight {tuple(w.shape)} is not an even {mode} split of "
                             f"[{child.output_size}, {child.input_size}] over {tp_size} ranks")
        swaps.append(TeSwap(name, child.input_size, child.output_size, getattr(child, "bias", None) is not None,
                            mode, tp_size, expected))
    return swaps


def enable_te_fp8(module: nn.Module, *, te=None, min_features: int = 16) -> list[str]:
    """Swap the FP8-eligible linears below ``module`` for Transformer Engine linears, in place.

    ``te``: the ``transformer_engine.pytorch`` module (imported when None). Values, names, shapes, dtypes,
    devices and sharding attributes are kept (module docstring). Returns the swapped names. Raises
    ValueError when a rebuilt layer's parameters differ in name or shape from the original's (a TE
    release that lays them out otherwise must fail here, not in a checkpoint).
    """
    if te is None:
        import transformer_engine.pytorch as te
    swaps = plan_te_swaps(module, min_features=min_features)
    for swap in swaps:
        old = module.get_submodule(swap.name)
        kwargs = {}
        if swap.parallel_mode is not None:
            kwargs = dict(parallel_mode=swap.parallel_mode, tp_group=old.tp_group, tp_size=swap.tp_size)
        new = te.Linear(swap.in_features, swap.out_features, bias=swap.bias, params_dtype=old.weight.dtype,
                        device=old.weight.device, **kwargs)
        old_params, new_params = dict(old.named_parameters()), dict(new.named_parameters())
        if {k: tuple(v.shape) for k, v in old_params.items()} != {k: tuple(v.shape) for k, v in new_params.items()}:
            raise ValueError(f"enable_te_fp8: {swap.name}: TE parameters "
                             f"{ {k: tuple(v.shape) for k, v in new_params.items()} } differ from "
                             f"{ {k: tuple(v.shape) for k, v in old_params.items()} }")
        with torch.no_grad():
            for key, param in old_params.items():
                new_params[key].copy_(param)
                for attr in _SHARDING_ATTRS:
                    if hasattr(param, attr):
                        setattr(new_params[key], attr, getattr(param, attr))
        new.te_fp8 = True
        parent, _, leaf = swap.name.rpartition(".")
        setattr(module.get_submodule(parent), leaf, new)
    return [s.name for s in swaps]
