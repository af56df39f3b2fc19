"""CPU compatibility layer for Megatron-core: the project's one module of Megatron workarounds.

Megatron-core 0.16.1's pipeline schedules allocate a few tensors with hard-coded CUDA devices; on a
CPU-only torch build they raise ``AssertionError: Torch not compiled with CUDA enabled``.
``parallel_state`` itself needs no patch (its only CUDA call,
``torch.cuda.synchronize`` in ``update_pg_timeout``, is not on our path).

``install()`` gives exactly two Megatron modules a module-global ``torch`` proxy; the real ``torch``
and ``torch.cuda`` stay untouched for the rest of the process. Patched sites (megatron-core 0.16.1,
files under megatron/core/pipeline_parallel/):

1. schedules.py:596 (forward_backward_no_pipelining), :983 (..._with_interleaving) and :2138
   (..._without_interleaving): ``total_num_tokens = torch.zeros([], dtype=torch.int,
   device="cuda")`` on every call. The proxy's ``zeros`` maps a CUDA device to the CPU.
2. p2p_communication.py:313 and :321 (P2PCommunicator._communicate): the receive buffers,
   ``torch.empty(..., device=torch.cuda.current_device())``; :190-202 (._communicate_shapes, only
   with variable_seq_lengths): the shape tensors, same call. The proxy's
   ``torch.cuda.current_device()`` returns the CPU device.
3. p2p_communication.py:242 and :398: ``torch.cuda.synchronize()`` after batch_isend_irecv
   (batch_p2p_sync, on by default). The proxy's ``synchronize`` is a no-op: CPU kernels and waited
   gloo requests have already completed.

Left alone on purpose: ``schedules.py:418`` ``torch.autocast("cuda", ...)`` runs only when
``config.enable_autocast`` is set, which ``parallel.schedules`` never does.

``check_assumptions()`` re-reads both source files, inventories every CUDA touch in them (AST walk)
and compares it with the list above, so a Megatron upgrade that moves, removes or adds a site fails
loudly instead of silently running on the wrong device. Megatron's MoE layers, tensor-parallel RNG
tracker and dist-checkpointing would need more patches; v4train does not use them.

``import_megatron_core()`` (called by ``parallel/schedules.py``, a rank's first module to import Megatron-core)
imports ``megatron.core`` with ``torch.compile`` replaced by a no-op decorator: ``megatron/core/jit.py`` sets
``jit_fuser = torch.compile`` and about 40 fused helpers (``megatron/core/fusions/``, MoE utilities) are
decorated with it at import time, which imports TorchDynamo and TorchInductor: about a third of every rank
process's imports, for functions v4train never calls (its model is its own). They stay plain Python
functions; ``torch.compile`` itself is restored at once.
"""

from __future__ import annotations

import ast
import collections
import sys
from types import ModuleType

import torch

__all__ = ["EXPECTED_MEGATRON_VERSION", "MegatronAssumptionError", "check_assumptions", "import_megatron_core",
           "install"]

EXPECTED_MEGATRON_VERSION = "0.16.1"

_SCHEDULES = "megatron.core.pipeline_parallel.schedules"
_P2P = "megatron.core.pipeline_parallel.p2p_communication"

# Every CUDA touch in the proxied modules, as (enclosing function, kind) -> count. A site of a kind
# the proxy handles ('torch.zeros(device="cuda")', 'torch.cuda.current_device',
# 'torch.cuda.synchronize') is redirected; 'torch.autocast("cuda")' is avoided through the config.
_EXPECTED_SITES: dict[str, collections.Counter] = {
    _SCHEDULES: collections.Counter({
        ("forward_backward_no_pipelining", 'torch.zeros(device="cuda")'): 1,
        ("forward_backward_pipelining_with_interleaving", 'torch.zeros(device="cuda")'): 1,
        ("forward_backward_pipelining_without_interleaving", 'torch.zeros(device="cuda")'): 1,
        ("forward_step", 'torch.autocast("cuda")'): 1,
    }),
    _P2P: collections.Counter({
        ("P2PCommunicator._communicate_shapes", "torch.cuda.current_device"): 4,
        ("P2PCommunicator._communicate_shapes", "torch.cuda.synchronize"): 1,
        ("P2PCommunicator._communicate.create_tensor_recv_prev", "torch.cuda.current_device"): 1,
        ("P2PCommunicator._communicate.create_tensor_recv_next", "torch.cuda.current_device"): 1,
        ("P2PCommunicator._communicate", "torch.cuda.synchronize"): 1,
    }),
}

# Symbols parallel.schedules reaches (get_forward_backward_func returns one of the three schedules).
_EXPECTED_SYMBOLS: dict[str, tuple[str, ...]] = {
    _SCHEDULES: (
        "get_forward_backward_func",
        "forward_backward_no_pipelining",
        "forward_backward_pipelining_without_interleaving",
        "forward_backward_pipelining_with_interleaving",
    ),
    _P2P: ("P2PCommunicator",),
}


def _no_compile(model=None, **_):
    """``torch.compile``'s two call forms, ``torch.compile(fn)`` and ``torch.compile(**options)(fn)``, compiling
    nothing."""
    return model if model is not None else (lambda fn: fn)


def import_megatron_core() -> None:
    """Import ``megatron.core`` without compiling its fused helpers (see the module docstring); a no-op when
    it is already imported."""
    if "megatron.core" in sys.modules:
        return
    real = torch.compile
    torch.compile = _no_compile
    try:
        import megatron.core  # noqa: F401 - the import is the point
    finally:
        torch.compile = real


class MegatronAssumptionError(RuntimeError):
    """The installed megatron-core is not the one this compatibility layer was written against."""


class _CpuCuda:
    """``torch.cuda`` as seen by the patched modules: the current device is the CPU."""

    def __getattr__(self, name: str):
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> torch.device:
        return torch.device("cpu")

    @staticmethod
    def synchronize(device=None) -> None:
        # CPU ops and gloo requests complete synchronously once waited on; nothing to flush.
        return None


class _CpuTorch:
    """``torch`` as seen by the patched modules: CUDA allocations land on the CPU."""

    def __init__(self) -> None:
        self.cuda = _CpuCuda()

    def __getattr__(self, name: str):
        return getattr(torch, name)

    @staticmethod
    def zeros(*size, device=None, **kwargs) -> torch.Tensor:
        return torch.zeros(*size, device=_cpu_if_cuda(device), **kwargs)


def _cpu_if_cuda(device):
    """Map a CUDA device spec ("cuda", "cuda:0", torch.device("cuda"), an index) to the CPU."""
    if isinstance(device, int) or (device is not None and torch.device(device).type == "cuda"):
        return torch.device("cpu")
    return device


def _patched_modules() -> tuple[ModuleType, ModuleType]:
    from megatron.core.pipeline_parallel import p2p_communication, schedules

    return schedules, p2p_communication


def install() -> bool:
    """Install the CPU shim into Megatron's pipeline schedules; idempotent.

    A no-op on a CUDA host: the shim refuses to patch when ``torch.cuda.is_available()``, so GPU
    runs execute Megatron unchanged. On a CPU host it first runs :func:`check_assumptions`.

    Returns:
        True when the shim is active after the call (CPU host), False on a CUDA host.
    Raises:
        MegatronAssumptionError: the installed megatron-core does not match the patched sites.
    """
    if torch.cuda.is_available():
        return False
    modules = _patched_modules()
    if all(isinstance(module.torch, _CpuTorch) for module in modules):
        return True
    check_assumptions()
    proxy = _CpuTorch()
    for module in modules:
        if not isinstance(module.torch, _CpuTorch):
            module.torch = proxy
    return True


def check_assumptions() -> None:
    """Verify that the installed megatron-core still has exactly the sites this module patches.

    Checks the pinned version (``EXPECTED_MEGATRON_VERSION``), the symbols ``parallel.schedules``
    uses, that each patched module has a module-global ``torch`` to replace, and the full inventory
    of CUDA touches (listed in the module docstring) in each patched module's source file.

    Raises:
        MegatronAssumptionError: naming the version, file, function and line of every mismatch.
    """
    from megatron.core import package_info

    problems = []
    if package_info.__version__ != EXPECTED_MEGATRON_VERSION:
        problems.append(
            f"megatron-core {package_info.__version__} is installed but "
            f"parallel/megatron_compat.py was written against {EXPECTED_MEGATRON_VERSION} "
            f"(pin megatron-core=={EXPECTED_MEGATRON_VERSION} or re-audit the patched sites)"
        )
    for module in _patched_modules():
        problems += _module_problems(module)
    if problems:
        raise MegatronAssumptionError(
            "Megatron-core changed under parallel/megatron_compat.py:\n  - "
            + "\n  - ".join(problems)
        )


def _module_problems(module: ModuleType) -> list[str]:
    name = module.__name__
    problems = [
        f"{name}.{symbol} is missing"
        for symbol in _EXPECTED_SYMBOLS[name]
        if not hasattr(module, symbol)
    ]
    if not isinstance(getattr(module, "torch", None), (ModuleType, _CpuTorch)):
        problems.append(f"{name} has no module-global 'torch' to proxy")
    with open(module.__file__, encoding="utf-8") as source:
        found = _cuda_sites(ast.parse(source.read()))
    expected = _EXPECTED_SITES[name]
    counts = collections.Counter(site for site, _ in found)
    for site in sorted(set(counts) | set(expected)):
        if counts[site] != expected[site]:
            lines = [line for found_site, line in found if found_site == site]
            problems.append(
                f"{module.__file__}: {site[0]}: expected {expected[site]} x {site[1]}, "
                f"found {counts[site]} (lines {lines})"
            )
    return problems


def _cuda_sites(tree: ast.Module) -> list[tuple[tuple[str, str], int]]:
    """Every CUDA touch in a module: ((enclosing qualname, kind), line)."""
    sites = []

    def visit(node: ast.AST, scope: tuple[str, ...], parent: ast.AST | None) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            scope = scope + (node.name,)
        kind = _cuda_kind(node, parent)
        if kind is not None:
            sites.append(((".".join(scope) or "<module>", kind), node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child, scope, node)

    visit(tree, (), None)
    return sites


def _cuda_kind(node: ast.AST, parent: ast.AST | None) -> str | None:
    if isinstance(node, ast.Attribute) and _dotted(node.value) == "torch.cuda":
        return f"torch.cuda.{node.attr}"
    if isinstance(node, ast.Call):
        if isinstance(node.func, ast.Attribute) and node.func.attr == "cuda":
            return ".cuda() call"
        if any(kw.arg == "device" and _is_cuda_literal(kw.value) for kw in node.keywords):
            return f'{_dotted(node.func)}(device="cuda")'
        return None
    if not _is_cuda_literal(node) or (isinstance(parent, ast.keyword) and parent.arg == "device"):
        return None  # a device="cuda" keyword is reported through its call, which names the factory
    if isinstance(parent, ast.Call):
        return f'{_dotted(parent.func)}("cuda")'
    return '"cuda" literal'


def _is_cuda_literal(node: ast.AST) -> bool:
    return (
        isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and (node.value == "cuda" or node.value.startswith("cuda:"))
    )


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "<expr>"
