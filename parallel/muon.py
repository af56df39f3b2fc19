"""Muon as DeepSeek-V4 uses it: Nesterov momentum, hybrid Newton-Schulz, update RMS 0.18 (spec section 6).

For each *logically independent* matrix W [n, m] (R §2.4, Algorithm 1):

  M_t = mu M_{t-1} + G_t                                      mu = 0.95, per element (momentum_buffer)
  X_0 = (mu M_t + G_t) / ||mu M_t + G_t||_F                   Nesterov input, fp32
  X_k = a X + b (X X^T) X + c (X X^T)^2 X                     8 x (3.4445, -4.7750, 2.0315), 2 x (2, -1.5, 0.5)
  O_t = X_10 * sqrt(max(n, m)) * 0.18                         update RMS 0.18 (Moonlight's rescale)
  W_t = W_{t-1} (1 - lr wd) - lr O_t                          decoupled weight decay

Our own implementation: torch.optim.Muon runs 5 single-coefficient steps through a private helper and
Megatron-core's Muon needs ``emerging_optimizers``, which does not install beside megatron-core 0.16.1.
The iteration runs on the short side (X X^T is the small Gram matrix, transposing
when n > m), and same-shape blocks of a param group are stacked into one batched matmul (R §3.5.1).

**Logically independent blocks.** A parameter may carry the attribute ``muon_split``, a
:class:`MuonSplit` (dim, block sizes): the matrix is cut along ``dim`` into blocks of those sizes and
each block is orthogonalised on its own, with its own sqrt(max(n, m)) scale. The model modules
(``model/attention.py``, ``model/compressor.py``, ``model/mhc.py``) set it on V4's concatenated weights
(grouped ``wo_a``, the CSA compressor halves, the mHC ``fn``).

**Tensor parallelism.** A parameter that Megatron-core marks as one rank's shard (attributes
``tensor_model_parallel=True``, ``partition_dim`` 0 or 1, ``partition_stride`` 1; set by
``ColumnParallelLinear``/``RowParallelLinear`` and by ``parallel.tensor_parallel.mark_sharded``) is
orthogonalised as the whole matrix: the Nesterov input is all-gathered over ``tp_group`` along
``partition_dim``, Newton-Schulz runs on the whole matrix (so a ``muon_split`` always describes the
*whole, unsharded* matrix, whatever the sharding), and the rank keeps its slice of the update. Momentum
and weight decay are elementwise and stay per shard. Every rank of the group computes the same whole
update (redundant, like V4's dense parameters above the ZeRO limit), so the result equals the
single-process optimizer on the whole matrix up to fp32 noise. TP ranks must agree on which sharded
parameters have a gradient (they do: a shard's module runs on every rank), else the all-gather hangs.

Shape letters: K stacked blocks, N rows, M columns (N <= M inside the iteration).
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.distributed as dist

from v4train.parallel.tensor_parallel import TensorParallel, full_shape, gather_full, is_sharded, shard_of

__all__ = ["Muon", "MuonSplit", "hybrid_newton_schulz", "V4_NS_STEPS", "UPDATE_RMS"]

# (a, b, c) of each Newton-Schulz iteration: 8 fast steps that push every singular value into
# ~[0.68, 1.13], then 2 steps of f(x) = 2x - 1.5x^3 + 0.5x^5 (f(1) = 1, f'(1) = 0) that settle them at 1.
V4_NS_STEPS: tuple[tuple[float, float, float], ...] = ((3.4445, -4.7750, 2.0315),) * 8 + ((2.0, -1.5, 0.5),) * 2
UPDATE_RMS = 0.18
_CPU_CHUNK_BYTES = 512 * 1024  # the iterate of one Newton-Schulz chunk on a CPU (about an L2 cache)


@dataclasses.dataclass(frozen=True)
class MuonSplit:
    """A 2-D parameter seen as independent blocks: cut along ``dim`` (0 rows, 1 columns) into ``sizes``.

    Set as the parameter attribute ``muon_split``; for a tensor-parallel shard the sizes describe the
    whole (gathered) matrix. Example: ``wo_a.weight`` [G*R, I] is ``MuonSplit(0, (R,) * G)``.
    Raises ValueError for a dim other than 0/1 or an empty / non-positive size list.
    """

    dim: int
    sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.dim not in (0, 1):
            raise ValueError(f"MuonSplit: dim={self.dim} must be 0 (row blocks) or 1 (column blocks)")
        if not self.sizes or any(int(s) != s or s < 1 for s in self.sizes):
            raise ValueError(f"MuonSplit: sizes={self.sizes} must be a non-empty tuple of positive ints")

    def check(self, shape: Sequence[int], what: str) -> None:
        """Raise ValueError (naming ``what``) unless the sizes add up to ``shape[dim]`` of a 2-D shape."""
        if len(shape) != 2 or sum(self.sizes) != shape[self.dim]:
            raise ValueError(f"{what}: muon_split {self} does not tile a matrix of shape {tuple(shape)} "
                             f"(the sizes must add up to dim {self.dim} of the whole, unsharded matrix)")

    def blocks(self, matrix_NM: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Views of the blocks of ``matrix_NM`` in order (ValueError when the sizes do not tile it)."""
        self.check(matrix_NM.shape, "MuonSplit.blocks")
        return torch.split(matrix_NM, list(self.sizes), dim=self.dim)


def hybrid_newton_schulz(
    matrix: torch.Tensor, steps: Sequence[tuple[float, float, float]] = V4_NS_STEPS,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Approximate orthogonal factor U V^T of ``matrix`` [..., N, M] (batched over leading dims), fp32.

    X_0 = M / ||M||_F per matrix, then for each (a, b, c) in ``steps``:
    X = a X + b (X X^T) X + c (X X^T)^2 X, computed on the transpose when N > M so the Gram matrix is
    min(N, M)^2. With V4's steps, singular values sigma_i with sigma_i / ||M||_F >= 1e-3 end within
    1 +/- 0.01 (spec 10.3 item 4); smaller ones are not fully lifted in 10 steps. A zero matrix maps to
    zero. Source: spec section 6 (R §2.4, Algorithm 1).

    Args:
        matrix: ``[..., N, M]``, any float dtype; not modified.
        steps: one (a, b, c) per iteration; V4's 10 by default.
        compute_dtype: the matmuls' dtype after the fp32 normalisation (float32, or bfloat16 as
            R §3.5.1 runs them); the result is float32 either way.
    Returns:
        ``[..., N, M]`` float32.
    Raises:
        ValueError: ``matrix`` has fewer than 2 dims.
    """
    if matrix.ndim < 2:
        raise ValueError(f"hybrid_newton_schulz: needs a matrix [..., N, M], got shape {tuple(matrix.shape)}")
    shape = matrix.shape
    X_KNM = matrix.float().reshape(-1, shape[-2], shape[-1])
    # Scaling by the max |entry| first keeps the Frobenius norm between 1 and sqrt(N*M), so it neither
    # underflows for tiny gradients nor overflows; a zero matrix stays zero (the norm clamp only acts there).
    X_KNM = X_KNM / X_KNM.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    X_KNM = X_KNM / torch.linalg.matrix_norm(X_KNM, keepdim=True).clamp_min(1.0)
    X_KNM = X_KNM.to(compute_dtype)
    transposed = shape[-2] > shape[-1]
    if transposed:
        X_KNM = X_KNM.mT
    # On a CPU a long batch runs each bmm over the whole stack, so every iteration streams all of it
    # through memory; chunks whose iterate fits in cache run the 10 steps there (2x faster measured on
    # 142 [192, 192] blocks, BENCHMARKS.md). A GPU takes the whole batch at once.
    chunk = X_KNM.shape[0]
    if X_KNM.device.type == "cpu":
        chunk = max(1, _CPU_CHUNK_BYTES // (X_KNM.shape[-2] * X_KNM.shape[-1] * X_KNM.element_size()))
    X_KNM = torch.cat([_iterate(X, steps) for X in X_KNM.split(chunk)]) if chunk < X_KNM.shape[0] \
        else _iterate(X_KNM, steps)
    if transposed:
        X_KNM = X_KNM.mT
    return X_KNM.float().reshape(shape)


def _iterate(X_KNM: torch.Tensor, steps: Sequence[tuple[float, float, float]]) -> torch.Tensor:
    """The Newton-Schulz iterations on a stack ``[K, N, M]`` with N <= M."""
    for a, b, c in steps:
        A_KNN = torch.bmm(X_KNM, X_KNM.mT)
        B_KNN = torch.baddbmm(A_KNN, A_KNN, A_KNN, beta=b, alpha=c)   # b A + c A^2
        X_KNM = torch.baddbmm(X_KNM, B_KNN, X_KNM, beta=a)            # a X + (b A + c A^2) X
    return X_KNM


def _orthogonalised(
    matrices: Sequence[torch.Tensor], splits: Sequence[MuonSplit | None],
    steps: Sequence[tuple[float, float, float]], update_rms: float, ns_dtype: torch.dtype = torch.float32,
) -> list[torch.Tensor]:
    """O for each whole matrix: every block through Newton-Schulz, scaled by sqrt(max(n, m)) * update_rms.

    Blocks of equal shape (across all matrices) go through one batched call.
    """
    pieces: list[list[torch.Tensor | None]] = []
    by_shape: dict[tuple[int, int], list[tuple[int, int, torch.Tensor]]] = defaultdict(list)
    for i, (matrix, split) in enumerate(zip(matrices, splits)):
        blocks = split.blocks(matrix) if split is not None else (matrix,)
        pieces.append([None] * len(blocks))
        for j, block in enumerate(blocks):
            by_shape[tuple(block.shape)].append((i, j, block))
    for (n, m), entries in by_shape.items():
        out_KNM = hybrid_newton_schulz(torch.stack([block for _, _, block in entries]), steps, ns_dtype)
        out_KNM.mul_(math.sqrt(max(n, m)) * update_rms)
        for (i, j, _), out_NM in zip(entries, out_KNM.unbind(0)):
            pieces[i][j] = out_NM
    return [torch.cat(blocks, dim=split.dim) if split is not None else blocks[0]
            for blocks, split in zip(pieces, splits)]


class Muon(torch.optim.Optimizer):
    """V4's Muon over 2-D parameters (module docstring; spec section 6, R §2.4 Algorithm 1).

    Per-group settings: ``lr``, ``weight_decay`` (decoupled, W *= 1 - lr wd), ``momentum`` (mu),
    ``nesterov`` (orthogonalise mu M_t + G_t, else M_t), ``ns_steps`` (one (a, b, c) per Newton-Schulz
    iteration), ``update_rms`` (O = NS * sqrt(max(n, m)) * update_rms), ``ns_dtype`` (the Newton-Schulz
    matmuls' dtype: float32, or bfloat16 as R §3.5.1). State per parameter:
    ``momentum_buffer`` (the parameter's shape and dtype) and ``step`` (0-d float32, steps taken), so a
    checkpoint holds it. Parameters without a gradient are skipped (no state change).

    Args:
        params: parameters or param-group dicts, as for any torch optimizer.
        lr: learning rate (same schedule as AdamW in V4).
        weight_decay: V4 uses 0.1.
        momentum: mu; V4 uses 0.95.
        nesterov: V4 uses Nesterov.
        ns_steps: defaults to :data:`V4_NS_STEPS` (8 fast + 2 stabilising).
        update_rms: gamma; V4 uses 0.18.
        ns_dtype: torch.float32 (default) or torch.bfloat16 for the Newton-Schulz matmuls.
        tp_group: the tensor-parallel group whose shards (Megatron attributes) are gathered; None
            when there is no tensor parallelism.
    Raises:
        ValueError: a parameter is not 2-D, a shard has ``partition_dim`` outside {0, 1} or a stride
            other than 1, a ``muon_split`` is not a :class:`MuonSplit` or does not tile the whole matrix,
            or a hyperparameter is out of range (lr < 0, weight_decay < 0, momentum outside [0, 1),
            update_rms <= 0, ns_steps empty or not (a, b, c) triples, ns_dtype neither float32 nor
            bfloat16).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        *,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: Sequence[tuple[float, float, float]] = V4_NS_STEPS,
        update_rms: float = UPDATE_RMS,
        ns_dtype: torch.dtype = torch.float32,
        tp_group: dist.ProcessGroup | None = None,
    ):
        # set before the base class adds (and validates) the groups
        self.tp_group = tp_group
        self._tp = (TensorParallel(tp_group, dist.get_rank(tp_group), dist.get_world_size(tp_group))
                    if tp_group is not None else TensorParallel())
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_steps=ns_steps, update_rms=update_rms, ns_dtype=ns_dtype)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        """Add a group after validating its settings and parameters (ValueError as in the class docstring)."""
        params = param_group["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        settings = {**self.defaults, **param_group, "params": params}
        settings["ns_steps"] = _checked_ns_steps(settings["ns_steps"])
        _check_settings(settings)
        for param in params:
            self._check_param(param)
        super().add_param_group(settings)

    def _check_param(self, param: torch.Tensor) -> None:
        if param.ndim != 2:
            raise ValueError(f"Muon: optimises 2-D matrices only, got a parameter of shape {tuple(param.shape)} "
                             "(give it to AdamW)")
        if is_sharded(param):
            dim, stride = getattr(param, "partition_dim", None), getattr(param, "partition_stride", 1)
            if dim not in (0, 1) or stride != 1:
                raise ValueError(f"Muon: tensor-parallel shard of shape {tuple(param.shape)} has "
                                 f"partition_dim={dim}, partition_stride={stride}; only contiguous shards "
                                 "(dim 0 or 1, stride 1) are supported")
        split = getattr(param, "muon_split", None)
        if split is not None:
            if not isinstance(split, MuonSplit):
                raise ValueError(f"Muon: muon_split must be a MuonSplit, got {type(split).__name__}")
            split.check(full_shape(param, self._tp), "Muon")

    def initial_state(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        """The state Muon creates for ``param`` at its first step: ``step`` 0 (0-d float32, CPU) and a
        zero ``momentum_buffer`` (``param``'s shape, dtype and device)."""
        return {"step": torch.zeros((), dtype=torch.float32),
                "momentum_buffer": torch.zeros_like(param, memory_format=torch.preserve_format)}

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One Muon update of every parameter that has a gradient; returns ``closure()``'s loss if given.

        Collective over ``tp_group`` when sharded parameters have gradients. Raises RuntimeError for a
        sparse gradient and ValueError for a ``muon_split`` that does not tile its matrix.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update(group, params)
        return loss

    def _update(self, group: dict, params: list[torch.Tensor]) -> None:
        mu = group["momentum"]
        inputs = []
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError("Muon does not support sparse gradients")
            state = self.state[p]
            if not state:
                state.update(self.initial_state(p))
            state["step"] += 1
            buf = state["momentum_buffer"]
            buf.mul_(mu).add_(p.grad)
            inputs.append(p.grad.add(buf, alpha=mu) if group["nesterov"] else buf)
        wholes = [gather_full(x, p, self._tp) for p, x in zip(params, inputs)]
        splits = [getattr(p, "muon_split", None) for p in params]
        updates = _orthogonalised(wholes, splits, group["ns_steps"], group["update_rms"], group["ns_dtype"])
        lr, wd = group["lr"], group["weight_decay"]
        for p, update in zip(params, updates):
            p.mul_(1.0 - lr * wd)
            p.add_(shard_of(update, p, self._tp).to(p.dtype), alpha=-lr)


def _checked_ns_steps(steps) -> tuple[tuple[float, float, float], ...]:
    try:
        out = tuple((float(a), float(b), float(c)) for a, b, c in steps)
    except (TypeError, ValueError):
        raise ValueError(f"Muon: ns_steps={steps!r} must be a sequence of (a, b, c) number triples") from None
    if not out:
        raise ValueError("Muon: ns_steps is empty; V4 uses 10 steps (V4_NS_STEPS)")
    return out


def _check_settings(group: dict) -> None:
    if group["lr"] < 0:
        raise ValueError(f"Muon: lr={group['lr']} must be >= 0")
    if group["weight_decay"] < 0:
        raise ValueError(f"Muon: weight_decay={group['weight_decay']} must be >= 0")
    if not 0 <= group["momentum"] < 1:
        raise ValueError(f"Muon: momentum={group['momentum']} must be in [0, 1); V4 uses 0.95")
    if group["update_rms"] <= 0:
        raise ValueError(f"Muon: update_rms={group['update_rms']} must be > 0; V4 uses 0.18")
    if group["ns_dtype"] not in (torch.float32, torch.bfloat16):
        raise ValueError(f"Muon: ns_dtype={group['ns_dtype']} must be torch.float32 or torch.bfloat16")
