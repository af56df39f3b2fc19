"""FP8 linears: DeepSeek-style blockwise e4m3, emulated on CPU, Transformer Engine on GPU.

Recipe (DeepSeek-V3 tech report §3.3 "fine-grained quantization"; TE ``Float8BlockScaling``):

- format: e4m3 (``torch.float8_e4m3fn``, largest finite value 448) for every quantised operand;
- activations: one fp32 scale per 1 x 128 tile along the reduction (input-feature) dim, i.e. per
  token and 128 input features;
- weights: one fp32 scale per 128 x 128 block;
- scale = amax / 448 over the tile or block (1.0 for an all-zero one), so the largest magnitude of
  each tile maps to 448; q = cast_e4m3(clamp(x / scale, -448, 448)), dequantised as q * scale.

Edge tiles: when a dim is not a multiple of the tile (nano widths 96 and 192), the last tile is
*ragged*: it holds only the remaining elements and gets its own scale from their amax. It is computed
by zero-padding to the next multiple, taking the amax and cropping; zeros never raise an amax, so this
equals true ragged tiles and no padded value ever reaches a matmul.

CPU emulation (:func:`fp8_linear`, :class:`Fp8Linear`): the forward quantises input and weight,
dequantises both to fp32 and multiplies in fp32 (CPU ``scaled_mm`` has no blockwise
scaling, and its tensorwise result is bit-identical to dequantise-then-matmul anyway). The backward
is the straight-through estimator: dgrad and wgrad are fp32 matmuls of the fp32 ``grad_output`` with
the *dequantised* weight and input, and the quantisers pass the gradient unchanged. ``grad_output``
is not quantised: V3 quantises it to e4m3 in 1 x 128 tiles and re-tiles the input 128 x 1 for wgrad;
this emulation keeps the backward exact so that the measured FP8 effect is the forward quantisation
only. The autograd node saves the e4m3 tensors and their scales (1 byte per element plus one fp32 per
tile), not fp32 copies, as a real FP8 implementation does.

GPU: :func:`fp8_autocast_context` returns TE's ``fp8_autocast`` with ``Float8BlockScaling`` when CUDA
and ``transformer_engine.pytorch`` are present (``pip install v4train[gpu]``; TE 2.9-2.11, the range
megatron-core 0.16.1 is tested with). TE is imported only there, never at module import. The context
quantises TE modules only (Megatron's TE layer specs); ``nn.Linear`` and the emulated layers ignore it.

Under tensor parallelism the tiles are those of the local shard; they coincide with the unsharded
model's tiles when every shard size is a multiple of the tile size.

Shape letters: M rows (tokens), K input features (the reduction dim), N output features,
t activation tile, b weight block, nK = ceil(K / t) or ceil(K / b), nN = ceil(N / b).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import sys

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "E4M3_MAX", "FP32_MODULE_NAMES", "Fp8Linear", "Fp8Recipe", "dequantize_activation", "dequantize_weight",
    "enable_fp8", "fp8_autocast_context", "fp8_eligible_linears", "fp8_linear", "quantize_activation",
    "quantize_weight",
]

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max

# Path components whose linears stay in higher precision (spec 0.1 items 8-9, released dtypes): the output head
# (``head``; Megatron ``output_layer``), embeddings, the router (``gate``; Megatron ``router``), mHC
# (``hc_*``), and the compressor and indexer (fp32 here, FP4 in V4's QAT). ``wo_a`` is read as a weight
# by ``Attention.forward``'s grouped einsum and never called, so swapping it would change nothing (V4
# also computes it in bf16).
FP32_MODULE_NAMES = frozenset({
    "head", "output_layer", "embed", "embedding", "gate", "router", "hc_attn", "hc_ffn", "hc_head",
    "compressor", "indexer", "wo_a",
})

_MEGATRON_LAYERS = "megatron.core.tensor_parallel.layers"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Fp8Recipe:
    """Blockwise e4m3 settings (module docstring).

    Attributes:
        activation_tile: t, activation elements per scale along the input-feature dim (DeepSeek: 128).
        weight_block: b, side of the square weight block per scale (DeepSeek: 128).
    Raises:
        ValueError: naming the field, when a size is not a positive int.
    """

    activation_tile: int = 128
    weight_block: int = 128

    def __post_init__(self) -> None:
        for field in ("activation_tile", "weight_block"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Fp8Recipe.{field}={value!r}: use a positive int (DeepSeek uses 128)")


def _check_floating(x: torch.Tensor, what: str) -> None:
    if not x.is_floating_point():
        raise ValueError(f"{what}: expected a floating-point tensor, got {x.dtype}")


def _scales(amax: torch.Tensor) -> torch.Tensor:
    # an all-zero tile has no range to fit; any positive scale quantises it to exact zeros
    return torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))


def _cast(x_scaled: torch.Tensor) -> torch.Tensor:
    # the clamp keeps the cast saturating on every torch release: older ones turn |v| >= 464 into NaN
    # (e4m3fn has no inf), and x / (amax / 448) can round just above 448
    return x_scaled.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def _pad_to(x: torch.Tensor, *multiples: int) -> torch.Tensor:
    """Zero-pad the trailing dims of x up to multiples (last dim first): the ragged edge tiles."""
    pads = []
    for dim, m in zip(range(x.dim() - 1, -1, -1), multiples):
        pads += [0, -x.shape[dim] % m]
    return F.pad(x, pads) if any(pads) else x


def quantize_activation(x_MK: torch.Tensor, tile: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise activations to e4m3 with one scale per 1 x ``tile`` tile of the last dim.

    Args:
        x_MK: ``[..., K]`` floating point (any leading dims; K is the reduction dim of the next matmul).
        tile: t, elements per scale; the last tile of a row is ragged when t does not divide K.
    Returns:
        ``(q [..., K] float8_e4m3fn, scale [..., ceil(K/t)] fp32)`` with x ~= q * scale (per tile).
    Raises:
        ValueError: ``x_MK`` is not floating point or has no dims, or ``tile`` < 1.
    """
    _check_floating(x_MK, "quantize_activation")
    if x_MK.dim() < 1 or tile < 1:
        raise ValueError(f"quantize_activation: need a [..., K] tensor and tile >= 1, got shape "
                         f"{tuple(x_MK.shape)}, tile={tile}")
    K = x_MK.shape[-1]
    x_MTt = _pad_to(x_MK.float(), tile).unflatten(-1, (-1, tile))  # zeros never raise a tile's amax
    scale_MT = _scales(x_MTt.abs().amax(dim=-1))
    return _cast(x_MTt / scale_MT.unsqueeze(-1)).flatten(-2)[..., :K], scale_MT


def dequantize_activation(q_MK: torch.Tensor, scale_MT: torch.Tensor, tile: int = 128) -> torch.Tensor:
    """``q * scale`` per 1 x ``tile`` tile: ``[..., K]`` e4m3 and ``[..., ceil(K/t)]`` fp32 -> ``[..., K]`` fp32.

    The inverse of :func:`quantize_activation` up to e4m3 rounding. Raises ValueError when the scale's
    last dim is not ceil(K / tile).
    """
    K = q_MK.shape[-1]
    if scale_MT.shape[-1] != -(-K // tile):
        raise ValueError(f"dequantize_activation: scale has {scale_MT.shape[-1]} tiles, K={K} with tile={tile} "
                         f"needs {-(-K // tile)}")
    x_MTt = _pad_to(q_MK.float(), tile).unflatten(-1, (-1, tile))
    return (x_MTt * scale_MT.unsqueeze(-1)).flatten(-2)[..., :K]


def quantize_weight(w_NK: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a weight to e4m3 with one scale per ``block`` x ``block`` block.

    Args:
        w_NK: ``[N, K]`` floating point (``nn.Linear.weight`` layout: output x input features).
        block: b, block side; edge blocks are ragged when b does not divide N or K.
    Returns:
        ``(q [N, K] float8_e4m3fn, scale [ceil(N/b), ceil(K/b)] fp32)``.
    Raises:
        ValueError: ``w_NK`` is not a 2-D floating-point tensor, or ``block`` < 1.
    """
    _check_floating(w_NK, "quantize_weight")
    if w_NK.dim() != 2 or block < 1:
        raise ValueError(f"quantize_weight: need an [N, K] tensor and block >= 1, got shape "
                         f"{tuple(w_NK.shape)}, block={block}")
    N, K = w_NK.shape
    padded = _pad_to(w_NK.float(), block, block)
    w_nbnb = padded.view(padded.shape[0] // block, block, padded.shape[1] // block, block)
    scale_nNnK = _scales(w_nbnb.abs().amax(dim=(1, 3)))
    q = _cast(w_nbnb / scale_nNnK[:, None, :, None]).view(padded.shape)
    return q[:N, :K], scale_nNnK


def dequantize_weight(q_NK: torch.Tensor, scale_nNnK: torch.Tensor, block: int = 128) -> torch.Tensor:
    """``q * scale`` per ``block`` x ``block`` block: ``[N, K]`` e4m3 -> ``[N, K]`` fp32.

    Raises ValueError when the scale is not ``[ceil(N/b), ceil(K/b)]``.
    """
    N, K = q_NK.shape
    expected = (-(-N // block), -(-K // block))
    if tuple(scale_nNnK.shape) != expected:
        raise ValueError(f"dequantize_weight: scale shape {tuple(scale_nNnK.shape)}, expected {expected} "
                         f"for [{N}, {K}] with block={block}")
    padded = _pad_to(q_NK.float(), block, block)
    w_nbnb = padded.view(expected[0], block, expected[1], block) * scale_nNnK[:, None, :, None]
    return w_nbnb.view(padded.shape)[:N, :K]


class _Fp8LinearFunction(torch.autograd.Function):
    """y = deq(q(x)) deq(q(W))^T + b in fp32; straight-through backward with the dequantised operands."""

    @staticmethod
    def forward(ctx, x, weight, bias, recipe: Fp8Recipe):
        K = x.shape[-1]
        xq_MK, xs_MT = quantize_activation(x.reshape(-1, K), recipe.activation_tile)
        wq_NK, ws = quantize_weight(weight, recipe.weight_block)
        y_MN = F.linear(dequantize_activation(xq_MK, xs_MT, recipe.activation_tile),
                        dequantize_weight(wq_NK, ws, recipe.weight_block),
                        None if bias is None else bias.float())
        # e4m3 bytes + scales, not fp32 copies: what FP8 training keeps for the backward
        ctx.save_for_backward(xq_MK, xs_MT, wq_NK, ws)
        ctx.recipe, ctx.x_shape = recipe, x.shape
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return y_MN.view(*x.shape[:-1], weight.shape[0]).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        xq_MK, xs_MT, wq_NK, ws = ctx.saved_tensors
        recipe, (x_dtype, w_dtype, b_dtype) = ctx.recipe, ctx.dtypes
        g_MN = grad_y.reshape(-1, grad_y.shape[-1]).float()
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            w_NK = dequantize_weight(wq_NK, ws, recipe.weight_block)
            grad_x = (g_MN @ w_NK).view(ctx.x_shape).to(x_dtype)
        if ctx.needs_input_grad[1]:
            x_MK = dequantize_activation(xq_MK, xs_MT, recipe.activation_tile)
            grad_w = (g_MN.t() @ x_MK).to(w_dtype)
        if ctx.needs_input_grad[2]:
            grad_b = g_MN.sum(dim=0).to(b_dtype)
        return grad_x, grad_w, grad_b, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               recipe: Fp8Recipe = Fp8Recipe()) -> torch.Tensor:
    """Emulated blockwise-FP8 ``F.linear``: ``[..., K]`` x ``[N, K]`` (+ ``[N]``) -> ``[..., N]`` in x's dtype.

    Forward: ``F.linear(dequantize_activation(q(x)), dequantize_weight(q(W)), b)`` in fp32, x flattened to
    ``[M, K]``; bit-identical to calling those public functions and ``F.linear`` on the 2-D view.
    Backward (straight-through): dx = dy deq(q(W)), dW = dy^T deq(q(x)), db = sum dy, all fp32.

    Raises:
        ValueError: x or weight is not floating point, weight is not 2-D, or x's last dim is not K.
    """
    _check_floating(x, "fp8_linear input")
    _check_floating(weight, "fp8_linear weight")
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"fp8_linear: input {tuple(x.shape)} does not match weight {tuple(weight.shape)} "
                         "(need input [..., K] and weight [N, K])")
    return _Fp8LinearFunction.apply(x, weight, bias, recipe)


class Fp8Linear(nn.Linear):
    """``nn.Linear`` whose forward is :func:`fp8_linear`: same parameters, names and shapes.

    ``weight [N, K]`` and the optional ``bias [N]`` are ordinary parameters (the fp32 master copy), so
    state dicts load into and from the plain model. ``recipe`` is not part of the state dict.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None, *,
                 recipe: Fp8Recipe = Fp8Recipe()) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.recipe = recipe

    @classmethod
    def from_linear(cls, linear: nn.Linear, recipe: Fp8Recipe = Fp8Recipe()) -> Fp8Linear:
        """An ``Fp8Linear`` holding ``linear``'s own Parameter objects (no copy) and training flag.

        Raises:
            ValueError: ``linear`` has module hooks (they would not follow the swap).
        """
        if linear._forward_hooks or linear._forward_pre_hooks or linear._backward_hooks or linear._backward_pre_hooks:
            raise ValueError("Fp8Linear.from_linear: the linear has module hooks; enable FP8 before adding them")
        # built on the meta device so nothing is allocated before the parameters are replaced
        new = cls(linear.in_features, linear.out_features, bias=False, device="meta", recipe=recipe)
        new.weight = linear.weight
        new.bias = linear.bias
        new.train(linear.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., in_features] -> [..., out_features]`` through :func:`fp8_linear`."""
        return fp8_linear(x, self.weight, self.bias, self.recipe)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, recipe={self.recipe}"


class _FakeQuantize(torch.autograd.Function):
    """deq(q(x)) with a straight-through backward; for layers whose matmul is someone else's (Megatron)."""

    @staticmethod
    def forward(ctx, x, is_weight: bool, size: int):
        if is_weight:
            return dequantize_weight(*quantize_weight(x, size), size).to(x.dtype)
        return dequantize_activation(*quantize_activation(x, size), size).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def _megatron_forward_impl(original, recipe: Fp8Recipe, input, weight, *args, **kwargs):
    """Megatron ``_forward_impl`` with fake-quantised operands; its matmul and TP communication unchanged."""
    return original(_FakeQuantize.apply(input, False, recipe.activation_tile),
                    _FakeQuantize.apply(weight, True, recipe.weight_block), *args, **kwargs)


def _megatron_classes() -> tuple[type, ...]:
    # No import: if Megatron's layers module was never imported, no module can be one of its layers.
    layers = sys.modules.get(_MEGATRON_LAYERS)
    return () if layers is None else (layers.ColumnParallelLinear, layers.RowParallelLinear)


def _features(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.input_size, module.output_size  # Megatron: full (unsharded) sizes


def enable_fp8(module: nn.Module, *, min_features: int = 16, recipe: Fp8Recipe = Fp8Recipe()) -> list[str]:
    """Switch the eligible linears below ``module`` to emulated blockwise FP8, in place.

    Eligible: every ``nn.Linear`` submodule (attention, routed and shared experts, MTP projections, ...)
    whose in and out features are both >= ``min_features`` and whose dotted name has no component in
    :data:`FP32_MODULE_NAMES` (head, embedding, router gate, mHC, compressor, indexer, ``wo_a``). Each is
    replaced in its parent by :meth:`Fp8Linear.from_linear`, which keeps the *same* Parameter objects:
    an optimizer built before or after, gradient hooks on parameters, and state-dict keys are unchanged;
    module hooks are not carried (swap first, then wrap). ``module`` itself is never replaced; linears
    already in FP8 are skipped, so a second call returns ``[]``.

    Megatron-core ``ColumnParallelLinear`` / ``RowParallelLinear`` (when their module has been imported)
    follow the same rule on their full sizes and are patched instead of replaced: their ``_forward_impl``
    fake-quantises input and weight with a straight-through backward before Megatron's own matmul and
    tensor-parallel communication.

    Call before torch.compile, activation checkpointing and DDP wrappers. On GPU pair it with
    :func:`fp8_autocast_context` only for TE modules; these layers run the emulation on any device.

    Args:
        module: the model or pipeline stage.
        min_features: narrowest in/out width that is quantised (16 = TE's FP8 GEMM alignment; narrower
            linears gain nothing from FP8).
        recipe: tile and block sizes.
    Returns:
        The dotted names of the switched modules, in ``named_modules`` order.
    Raises:
        ValueError: ``min_features`` < 1; a Megatron layer uses ``gradient_accumulation_fusion`` (its
            fused wgrad writes ``weight.main_grad`` from the unquantised weight; turn it off); a linear
            carries module hooks.
    """
    chosen = fp8_eligible_linears(module, min_features=min_features)
    for name, child in chosen:
        if not isinstance(child, nn.Linear) and child.gradient_accumulation_fusion:
            raise ValueError(f"enable_fp8: {name} uses gradient_accumulation_fusion; set it False in the "
                             "Megatron config to run FP8 emulation")
    for name, child in chosen:
        if isinstance(child, nn.Linear):
            parent_name, _, leaf = name.rpartition(".")
            setattr(module.get_submodule(parent_name), leaf, Fp8Linear.from_linear(child, recipe))
        else:
            child.fp8_recipe = recipe
            child._forward_impl = functools.partial(_megatron_forward_impl, child._forward_impl, recipe)
    return [name for name, _ in chosen]


def fp8_eligible_linears(module: nn.Module, *, min_features: int = 16) -> list[tuple[str, nn.Module]]:
    """``(dotted name, module)`` of the linears below ``module`` that FP8 runs (rule: :func:`enable_fp8`).

    ``nn.Linear`` and Megatron-core's parallel linears whose in and out features (Megatron: full sizes) are
    both >= ``min_features``, with no name component in :data:`FP32_MODULE_NAMES`, not in FP8 already.
    Raises ValueError for ``min_features`` < 1.
    """
    if min_features < 1:
        raise ValueError(f"enable_fp8: min_features={min_features} must be >= 1")
    megatron = _megatron_classes()
    chosen = []
    for name, child in module.named_modules():
        if not name or isinstance(child, Fp8Linear) or getattr(child, "fp8_recipe", None) is not None:
            continue
        if not isinstance(child, (nn.Linear, *megatron)) or getattr(child, "te_fp8", False):
            continue
        if FP32_MODULE_NAMES.intersection(name.split(".")) or min(_features(child)) < min_features:
            continue
        chosen.append((name, child))
    return chosen


def fp8_autocast_context(enabled: bool) -> contextlib.AbstractContextManager:
    """The context to run a forward pass in: TE's blockwise-FP8 autocast on GPU, else a no-op.

    With ``enabled`` and ``torch.cuda.is_available()`` and an importable ``transformer_engine.pytorch``:
    ``te.fp8_autocast(enabled=True, fp8_recipe=Float8BlockScaling())`` (TE 2.9-2.11 API, renamed
    ``te.autocast`` in later releases; e4m3 in forward and backward, 1 x 128 activation and 128 x 128
    weight scales). It affects TE modules only; wrap the forward, not the backward (TE docs). Without
    ``enabled`` or CUDA: ``contextlib.nullcontext()``, and FP8 is whatever :func:`enable_fp8` installed
    (the CPU emulation). TE is imported here, never at module import.

    Raises:
        RuntimeError: FP8 asked for on CUDA and Transformer Engine not importable (the rank's device check
            refuses this at start; FP8 asked for must never silently turn off).
        Whatever TE raises for a broken installation or, on entering the context, for a GPU without
        blockwise-FP8 support.
    """
    if not enabled or not torch.cuda.is_available():
        return contextlib.nullcontext()
    try:
        import transformer_engine.pytorch as te
        from transformer_engine.common.recipe import Float8BlockScaling
    except ImportError as exc:
        raise RuntimeError(f"train.fp8: FP8 on CUDA needs Transformer Engine, which is not importable ({exc})") \
            from exc
    return te.fp8_autocast(enabled=True, fp8_recipe=Float8BlockScaling())
