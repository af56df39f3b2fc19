"""bf16 mixed precision: bf16 compute copies of the weights, fp32 masters and fp32 gradients (``train.precision``).

Outside a step's forward and backward every parameter is its fp32 master: the optimizer updates it, the
gradients are reduced over data parallelism, clipped and applied in fp32, and checkpoints hold it (a bf16
run resumes an fp32 checkpoint and the reverse, since both hold the same fp32 tensors).
:meth:`MixedPrecision.compute` swaps, for the forward and backward only, the storage of every parameter V4
computes with in bf16 (:func:`computes_in_bf16`) for a bf16 copy of its master (same ``Parameter`` object,
so modules, names and optimizer state are untouched), and accumulates each micro-batch's bf16 gradient
into an fp32 gradient as soon as autograd produces it (``register_post_accumulate_grad_hook``, as
Megatron's ``main_grad``). Leaving the context puts the masters back with their fp32 gradients.

Precision of each tensor follows the V4 reference (spec 0.1 items 8 and 9): the embedding, the attention
and indexer projections, the experts, the MTP projections and the head weight compute in bf16, so the
activations between them, the 4-stream residual included, are bf16; kept in fp32 are the mHC parameters
(mixes and Sinkhorn run in fp32), RMSNorm scales (the norm computes in fp32), the compressors (fp32 pooling),
the router (fp32 scores), the attention sinks. The model itself computes the router scores, SwiGLU
activation, MoE accumulation and the logits with the head loss in fp32 from bf16 inputs.

Memory per parameter computed in bf16, during a step: 4 (master) + 2 (bf16 copy) + 4 (fp32 gradient) bytes
plus the optimizer state, Megatron's layout without a distributed optimizer. Given the distributed optimizer
(``optimizers``), the masters of the parameters it updates are sharded with it (:mod:`parallel.sharded_masters`):
2 (bf16 copy, kept between steps) + 4 / DP (master) + 4 (gradient) bytes; :meth:`MixedPrecision.whole_masters`
gives them their whole fp32 values for checkpoints and snapshots.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from v4train.parallel.sharded_masters import ShardedMasters

__all__ = ["PRECISIONS", "computes_in_bf16", "MixedPrecision"]

PRECISIONS = ("fp32", "bf16")

# name fragments of the parameters V4 keeps in fp32 (spec 0.1 items 8-9)
_FP32_PARTS = ("hc_attn.", "hc_ffn.", "hc_head.", "norm.", "compressor.", "ffn.gate.", "attn_sink")


def computes_in_bf16(name: str) -> bool:
    """Whether parameter ``name`` (a stage's fully qualified name) computes in bf16 under ``precision: bf16``."""
    return not any(part in f".{name}" for part in _FP32_PARTS)


class MixedPrecision:
    """The bf16 compute copies of ``stage``'s parameters (module docstring); with ``precision="fp32"`` a no-op.
    ``optimizers``: the stage's optimizers; the masters of the parameters a distributed one (ZeRO-1) updates are
    sharded with it under bf16 (build this after them, before their first step).

    Raises ValueError naming ``precision`` for anything but fp32 / bf16, or when a parameter computed in
    bf16 is not fp32 to begin with.
    """

    def __init__(self, stage: nn.Module, precision: str, optimizers: Sequence[torch.optim.Optimizer] = ()):
        if precision not in PRECISIONS:
            raise ValueError(f"precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
        self.precision = precision
        self.params: list[nn.Parameter] = []
        if precision == "bf16":
            for name, param in stage.named_parameters():
                if param.requires_grad and computes_in_bf16(name):
                    if param.dtype != torch.float32:
                        raise ValueError(f"precision bf16: parameter {name} is {param.dtype}, its master must be fp32")
                    self.params.append(param)
        self._masters: dict[nn.Parameter, torch.Tensor] = {}
        self._grads: dict[nn.Parameter, torch.Tensor] = {}
        for param in self.params:
            param.register_post_accumulate_grad_hook(self._accumulate)
        self.sharded = ShardedMasters(self.params, optimizers) if self.params else None

    def _accumulate(self, param: nn.Parameter) -> None:
        if param not in self._masters:
            return  # outside compute(): an fp32 gradient, nothing to do
        grad = self._grads.get(param)
        if grad is None:
            self._grads[param] = param.grad.to(torch.float32)
        else:
            grad.add_(param.grad)
        param.grad = None

    @contextmanager
    def compute(self) -> Iterator[None]:
        """Forward and backward with bf16 weights; on exit the fp32 masters are back, each with the fp32 sum
        of the gradients of every backward inside (added to any gradient it had on entry; None if none)."""
        if not self.params:
            yield
            return
        for param in self.params:
            self._masters[param] = param.data
            if param.grad is not None:
                self._grads[param] = param.grad
                param.grad = None
            copy = self.sharded.bf16.get(id(param)) if self.sharded else None
            param.data = param.data.to(torch.bfloat16) if copy is None else copy
        try:
            yield
        finally:
            for param in self.params:
                param.data = self._masters.pop(param)
                param.grad = self._grads.pop(param, None)

    def whole_masters(self):
        """A context in which every parameter holds its whole fp32 master (:meth:`ShardedMasters.whole`;
        collective when masters are sharded, a no-op otherwise): around checkpoint saves and loads."""
        return self.sharded.whole() if self.sharded is not None and self.sharded.params else nullcontext()
