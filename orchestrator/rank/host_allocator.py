"""glibc malloc settings for a rank process: the host memory a training step frees is kept for the next step.

A CPU training step allocates and frees the same activation and gradient buffers (a few MiB each at the
simulated cluster's sizes) thousands of times a step. glibc's defaults hand that memory back to the kernel:
the top of the heap is trimmed once more than ``M_TRIM_THRESHOLD`` of it is free, and a block above the
(self-adjusting) ``M_MMAP_THRESHOLD`` gets its own mapping, unmapped when freed. The next step's allocation of
the same size then faults in fresh zeroed pages: 17,000-20,000 minor page faults in every step of the nano
model at the demo's shape, against 800-1,100 with these settings: 4-5% of one rank's step CPU time, 8% of
the demo's (4 ranks sharing 2 cores; ``BENCHMARKS.md``, "the host allocator").

:func:`keep_freed_memory` sets, for this process: blocks up to 32 MiB (glibc's largest ``M_MMAP_THRESHOLD``)
from the heap, the heap trimmed only past 1 GiB free, and 64 MiB of headroom added to each heap growth. A rank
keeps at most its step's peak host memory it would have reached anyway; a block above 32 MiB (a host copy of
a checkpoint, a large model's weights) is mapped and returned as before. ``mallopt`` through ctypes: Python
has no binding. ``tests/orchestrator/test_host_allocator.py`` fails if the settings stop taking effect.
"""

from __future__ import annotations

import ctypes
import ctypes.util

__all__ = ["keep_freed_memory"]

# glibc's <malloc.h> parameter numbers
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_BYTES = 32 << 20  # glibc refuses more (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD_BYTES = 1 << 30
TOP_PAD_BYTES = 64 << 20


def keep_freed_memory() -> bool:
    """Set this process's glibc malloc to keep freed memory for reuse (module docstring). Returns whether every
    setting took effect; False on a C library without ``mallopt`` (musl, macOS), where nothing changes."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or None).mallopt
    except (AttributeError, OSError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    settings = ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
                (_M_TOP_PAD, TOP_PAD_BYTES))
    return all([mallopt(param, value) == 1 for param, value in settings])  # a list: every setting is tried
