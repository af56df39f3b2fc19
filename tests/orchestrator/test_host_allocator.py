"""The rank's glibc malloc settings (``orchestrator/rank/host_allocator.py``): a step's freed buffers are reused
without page faults. Each case runs in a fresh interpreter (the settings are process-wide)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

_STEPS = """
import json, resource, sys, torch
from v4train.orchestrator.rank.host_allocator import keep_freed_memory
ok = keep_freed_memory() if sys.argv[1] == "kept" else None

def step():  # a step's pattern: several activation-sized buffers written, then all freed
    buffers = [torch.empty(1 << 20).fill_(1.0) for _ in range(8)]  # 8 x 4 MiB
    del buffers

step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(json.dumps({"ok": ok, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _faults(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _STEPS, mode], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_step_buffers_are_reused_without_page_faults():
    default, kept = _faults("default"), _faults("kept")
    pages_per_step = 8 * (4 << 20) // 4096
    # glibc's defaults give the 32 MiB back at every step and fault it in again; if this stops failing, glibc
    # or torch's CPU allocator changed and host_allocator.py may have become unnecessary
    assert default["faults"] > 10 * pages_per_step
    assert kept["ok"] is True and kept["faults"] < pages_per_step
