"""Two fixes to the Triton interpreter (triton 3.9), installed once when ``kernels`` first needs it.

1. bf16 ``tl.dot`` (triton issue #11584): the interpreter stores bf16 as uint16
   and its ``create_dot`` multiplies the raw bit patterns. ``InterpreterBuilder.create_dot`` is
   wrapped so that bf16 operands are first widened to fp32 with the interpreter's own ``_convert_float``.
2. Import order: ``@triton.jit`` picks JIT or interpreter when it runs, and that includes Triton's own
   library (``tl.sum``, ``tl.max``, ``tl.cumsum`` ... in ``triton.language.standard``), decorated once
   when ``triton.language`` is first imported. If that import happened without ``TRITON_INTERPRET``
   (torch imports triton for its own checks), an interpreted kernel calling ``tl.sum`` fails with
   "Cannot call @triton.jit'd outside of the scope of a kernel". ``_patch_lang``, which the interpreter
   runs around every launch and restores afterwards, is wrapped to also swap every such ``JITFunction``
   of ``triton.language`` for an ``InterpretedFunction`` of the same Python function.

Idempotent; without it only fp32 kernels imported in interpreter mode would run.

Shape letters: none (no tensors here).
"""

from __future__ import annotations

import numpy as np

__all__ = ["apply"]


def apply() -> None:
    """Install the bf16 ``create_dot`` fix on the interpreter's builder class (no-op when already done)."""
    import triton.language as tl
    from triton.runtime import interpreter as interp

    builder_cls = interp.InterpreterBuilder
    if getattr(builder_cls.create_dot, "_v4train_bf16_fix", False):
        return
    original = builder_cls.create_dot
    _patch_library_swap(interp)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16 or b.dtype.scalar == tl.bfloat16:
            a = _widen(interp, a, tl)
            b = _widen(interp, b, tl)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    create_dot._v4train_bf16_fix = True
    builder_cls.create_dot = create_dot


def _patch_library_swap(interp) -> None:
    """Wrap ``interpreter._patch_lang`` to swap Triton-library ``JITFunction``s for interpreted twins."""
    import triton.language as tl
    from triton.runtime.jit import JITFunction

    original = interp._patch_lang
    twins: dict[int, tuple[object, object]] = {}  # id(JITFunction) -> (it, its interpreted twin)
    modules = [tl, tl.standard, tl.math, tl.core]

    def _patch_lang(fn):
        scope = original(fn)
        for module in modules:
            for name, value in list(vars(module).items()):
                if isinstance(value, JITFunction):
                    if id(value) not in twins:
                        twins[id(value)] = (value, interp.InterpretedFunction(value.fn))
                    scope.set_attr(module, name, twins[id(value)][1])
        return scope

    interp._patch_lang = _patch_lang


def _widen(interp, handle, tl):
    """bf16 TensorHandle -> fp32 TensorHandle (other dtypes unchanged)."""
    if handle.dtype.scalar != tl.bfloat16:
        return handle
    data = interp._convert_float(handle.data, tl.bfloat16, tl.float32, None).view(np.float32)
    return interp.TensorHandle(data, tl.float32)
