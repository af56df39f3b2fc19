"""Where a rank computes and how: its device, the data-plane backend, the attention kernels and the FP8 path.

Chosen once, before the rank joins the process group, from the cluster file (``device``, ``backend``) and
the job (``train.fp8``); anything that cannot run as configured is a :class:`PlacementError` naming what
is missing (never a silent fallback: a data plane that falls back to TCP, or FP8 that quietly becomes an
emulation, costs a run its speed without a word).

* ``device: gpu``: CUDA must be visible; the rank pins ``cuda:LOCAL_RANK`` (torchrun / srun set
  ``LOCAL_RANK``; a Ray actor started with ``num_gpus=1`` sees only its own GPU through
  ``CUDA_VISIBLE_DEVICES``, so it pins ``cuda:0``). The data plane must be NCCL; gloo stays only for the
  CPU-side groups (asynchronous checkpoint saves, the torchrun control group). The sparse attention and
  the indexer top-k run the Triton kernels (``kernels``), so Triton must be importable. ``train.fp8``
  needs Transformer Engine (``pip install 'v4train[gpu]'``): its layers and ``fp8_autocast``
  (``parallel/te_layers.py``).
* ``device: cpu``: gloo; the torch kernels (Triton's interpreter when ``TRITON_INTERPRET`` is set), and
  ``train.fp8`` runs the CPU emulation of ``parallel/fp8.py``.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["PlacementError", "RankPlacement", "resolve_placement"]


class PlacementError(RuntimeError):
    """A device, backend, kernel or precision of the job that this process cannot provide."""


@dataclass(frozen=True)
class RankPlacement:
    """The rank's choices: ``device`` (``cpu`` or ``cuda:N``), ``backend`` (data plane), ``kernels``
    (``triton``, ``triton-interpreter`` or ``torch``), ``fp8`` (``off``, ``emulation``, ``transformer_engine``)."""

    device: torch.device
    backend: str
    kernels: str
    fp8: str

    def describe(self) -> str:
        """One line for the rank's log."""
        return (f"device {self.device}, data plane {self.backend}, attention kernels {self.kernels}, "
                f"fp8 {self.fp8}")


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def resolve_placement(device: str, backend: str, fp8: bool, *, environ=os.environ, cuda_available=None,
                      device_count=None, nccl_available=None, module_available=_installed) -> RankPlacement:
    """The rank's :class:`RankPlacement` for ``cluster.device`` / ``cluster.backend`` / ``train.fp8``.

    The keyword arguments default to this process's facts (``torch.cuda``, ``torch.distributed``, the
    importable modules); tests pass others. Raises :class:`PlacementError` naming the field and what is
    missing.
    """
    cuda_available = torch.cuda.is_available() if cuda_available is None else cuda_available
    if device == "cpu":
        if backend != "gloo":
            raise PlacementError(f"cluster.backend: {backend} needs cluster.device: gpu (CPU ranks use gloo)")
        from v4train import kernels

        return RankPlacement(torch.device("cpu"), "gloo",
                             "triton-interpreter" if kernels.interpret_requested() else "torch",
                             "emulation" if fp8 else "off")
    if device != "gpu":
        raise PlacementError(f"cluster.device: {device!r} is not cpu or gpu")
    if not cuda_available:
        raise PlacementError(f"cluster.device: gpu but this process sees no CUDA device (torch {torch.__version__}, "
                             f"built for CUDA {torch.version.cuda}; CUDA_VISIBLE_DEVICES="
                             f"{environ.get('CUDA_VISIBLE_DEVICES', '<unset>')})")
    if backend != "nccl":
        raise PlacementError(f"cluster.backend: {backend} on cluster.device: gpu would move every activation and "
                             "gradient through host memory; set backend: nccl")
    nccl_available = dist.is_nccl_available() if nccl_available is None else nccl_available
    if not nccl_available:
        raise PlacementError("cluster.backend: nccl but this torch build has no NCCL (torch.distributed."
                             "is_nccl_available() is False)")
    local = environ.get("LOCAL_RANK", "0")
    count = torch.cuda.device_count() if device_count is None else device_count
    if not local.isdigit() or int(local) >= count:
        raise PlacementError(f"LOCAL_RANK={local}: this process sees {count} CUDA device(s)")
    if not module_available("triton"):
        raise PlacementError("cluster.device: gpu runs the Triton sparse-attention and indexer kernels, but "
                             "triton is not importable")
    if fp8 and not module_available("transformer_engine"):
        raise PlacementError("train.fp8: true on GPU needs Transformer Engine (pip install 'v4train[gpu]'); "
                             "transformer_engine is not importable")
    return RankPlacement(torch.device("cuda", int(local)), "nccl", "triton",
                         "transformer_engine" if fp8 else "off")
