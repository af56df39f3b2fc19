"""Kernels for V4 sparse attention and the Lightning Indexer: one dispatch over Triton and torch references.

The model calls only the functions here (spec 3.1, 3.3; "spec N.M" in this package is section N.M of
``docs/deepseek-v4.md``); every kernel has a torch twin and a parity test:

* :func:`sparse_attention` ``(q [B,T,H,D], kv [B,N,D], attn_sink [H], indices [B,T,K], scale, ranges=None)
  -> [B,T,H,D]``
* :func:`indexer_topk` ``(q [B,T,HI,DI], k [B,NC,DI], w [B,T,HI], ratio, topk, *, visible_start,
  visible_end) -> IndexerTopK(indices [B,T,KK] int32, scores [B,T,KK] fp32)``, KK = min(topk, NC)
* :func:`mhc_split_forward` ``(z [T,M], n, iters, eps) -> (pre [T,N], post [T,N], comb [T,N,N], denoms)`` and
  :func:`mhc_split_backward`: the mHC gates and Sinkhorn (spec 4; torch twin :mod:`kernels.torch_mhc`)

Dispatch: the Triton kernels run for CUDA tensors, and for any tensors while ``TRITON_INTERPRET`` is
set true (the interpreter then runs the real kernels on CPU). Elsewhere ``sparse_attention`` takes the
chunked, memory-efficient torch path ``kernels.torch_cores`` (the model's CPU path), ``indexer_topk``
takes ``kernels.reference`` and the mHC split ``kernels.torch_mhc``. Semantics, shapes and errors are
documented in :mod:`kernels.reference`.

Under ``torch.autocast`` (not how the trainer computes in bf16: ``parallel.mixed_precision`` gives the
model bf16 weights, so q and kv arrive in one dtype) autocast's per-op rules can hand the attention
core an fp32 q (its per-head norm runs ``rsqrt`` in fp32 on CUDA) next to bf16 kv. The two operands of
:func:`sparse_attention` and :func:`indexer_topk` are then cast to the autocast dtype, as autocast casts
the operands of any matmul, and the kernel runs with autocast off: its own precision (fp32 softmax and
accumulation, P in the input dtype before P.V, spec 0.1 item 8) is not rewritten by autocast's op lists.

Importing this package imports only torch and the reference: Triton modules load on the first call
that needs them. The mode they were built in (``@triton.jit`` picks JIT or interpreter when it runs)
is checked on every call, and a module built in the other mode is reloaded, so flipping
``TRITON_INTERPRET`` inside one process (tests) is honoured.

Shape letters: B batch, T tokens, H heads, D head dim, N KV entries, K entries per token, HI indexer
heads, DI indexer head dim, NC compressed entries, KK picks per token.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from types import ModuleType

import torch

from v4train.kernels import reference, torch_cores, torch_mhc
from v4train.kernels.reference import IndexerTopK, causal_bounds, document_bounds

__all__ = ["sparse_attention", "indexer_topk", "mhc_split_forward", "mhc_split_backward", "reference", "IndexerTopK",
           "causal_bounds", "document_bounds",
           "interpret_requested", "triton_module"]

_TRUE = ("1", "true", "on", "yes")


def sparse_attention(q: torch.Tensor, kv: torch.Tensor, attn_sink: torch.Tensor, indices: torch.Tensor,
                     scale: float, ranges: tuple[torch.Tensor, torch.Tensor, int] | None = None) -> torch.Tensor:
    """Sparse shared-KV attention with a sink; see :func:`kernels.reference.sparse_attention`.

    ``ranges`` ``(lo [B, T], hi [B, T], offset)``: each query also attends rows ``offset + lo .. offset +
    hi - 1`` (:func:`kernels.torch_cores.sparse_attention`); the Triton kernel takes them as indices.
    """
    cast = _autocast_dtype(q)
    if cast is not None:
        with torch.autocast(q.device.type, enabled=False):
            return sparse_attention(q.to(cast), kv.to(cast), attn_sink, indices, scale, ranges)
    if q.is_cuda or interpret_requested():
        if ranges is not None:
            indices = torch.cat((indices.to(torch.int32), torch_cores.range_indices(*ranges)), dim=-1)
        return triton_module("triton_attention").sparse_attention(q, kv, attn_sink, indices, scale)
    return torch_cores.sparse_attention(q, kv, attn_sink, indices, scale, ranges)


def mhc_split_forward(z: torch.Tensor, n: int, iters: int, eps: float):
    """mHC gates and Sinkhorn of the scaled mixes ``z [T, (2+N)N]``; see :mod:`kernels.torch_mhc`."""
    impl = triton_module("triton_mhc") if (z.is_cuda or interpret_requested()) else torch_mhc
    return impl.mhc_split_forward(z, n, iters, eps)


def mhc_split_backward(dpre: torch.Tensor, dpost: torch.Tensor, dcomb: torch.Tensor, pre: torch.Tensor,
                       post: torch.Tensor, comb: torch.Tensor, denoms: torch.Tensor, eps: float) -> torch.Tensor:
    """Backward of :func:`mhc_split_forward`: ``dz [T, (2+N)N]``; see :mod:`kernels.torch_mhc`."""
    impl = triton_module("triton_mhc") if (pre.is_cuda or interpret_requested()) else torch_mhc
    return impl.mhc_split_backward(dpre, dpost, dcomb, pre, post, comb, denoms, eps)


def indexer_topk(q: torch.Tensor, k: torch.Tensor, w: torch.Tensor, ratio: int, topk: int, *,
                 visible_start: torch.Tensor | None = None, visible_end: torch.Tensor | None = None,
                 ) -> IndexerTopK:
    """Lightning Indexer scores + top-k; see :func:`kernels.reference.indexer_topk`."""
    cast = _autocast_dtype(q)
    if cast is not None:
        with torch.autocast(q.device.type, enabled=False):
            return indexer_topk(q.to(cast), k.to(cast), w, ratio, topk, visible_start=visible_start,
                                visible_end=visible_end)
    impl = triton_module("triton_indexer") if (q.is_cuda or interpret_requested()) else reference
    return impl.indexer_topk(q, k, w, ratio, topk, visible_start=visible_start, visible_end=visible_end)


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype ``torch.autocast`` computes matmuls in on ``x``'s device type, None when it is off there."""
    device = x.device.type
    if not (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)):
        return None
    return torch.get_autocast_dtype(device)


def interpret_requested() -> bool:
    """True while ``TRITON_INTERPRET`` holds a true value (1/true/on/yes, as Triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in _TRUE


def triton_module(name: str, interpret: bool | None = None) -> ModuleType:
    """``kernels.<name>`` with its kernels built for ``interpret`` (default: the current environment).

    Loads the module on first use; reloads it when it was built in the other mode. Triton's own
    library is imported in JIT mode if nobody imported it before (so a later sm_90 compile in this
    process works); building for the interpreter installs ``kernels._interp_patch`` (bf16 ``tl.dot``,
    and interpreted twins of the library's JIT functions during launches).
    """
    interpret = interpret_requested() if interpret is None else interpret
    full = f"{__name__}.{name}"
    module = sys.modules.get(full)
    if module is not None and module.INTERPRETED == interpret:
        return module
    if "triton.language" not in sys.modules:
        with _env("TRITON_INTERPRET", "0"):
            importlib.import_module("triton.language")
    with _env("TRITON_INTERPRET", "1" if interpret else "0"):
        if interpret:
            from v4train.kernels import _interp_patch
            _interp_patch.apply()
        return importlib.reload(module) if module is not None else importlib.import_module(full)


@contextlib.contextmanager
def _env(key: str, value: str):
    """Set one environment variable for the duration of the block."""
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old
