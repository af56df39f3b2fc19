"""The rank's glibc malloc settings (``orchestrator/rank/host_allocator.py``): a step's freed buffers are reused
without page faults. It runs in a fresh interpreter (the settings are process-wide)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

_STEPS = """
import json, resource, torch
from v4train.orchestrator.rank.host_allocator import keep_freed_memory
ok = keep_freed_memory()

def step():  # a step's pattern: activation-sized buffers written, then all freed
    buffers = [torch.empty(1 << 20).fill_(1.0) for _ in range(BUFFERS)]  # 4 MiB each
    del buffers

step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(STEPS):
    step()
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"ok": ok, "faults_per_step": faults / STEPS}))
"""
_BUFFERS, _STEPS_RUN = 24, 10


def _kept_faults() -> dict:
    code = f"BUFFERS, STEPS = {_BUFFERS}, {_STEPS_RUN}\n" + _STEPS
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_step_buffers_are_reused_without_page_faults():
    # with glibc's defaults this pattern faults in 10-100% of a step's 96 MiB again every step (how much depends
    # on what the interpreter allocated before, so the default is not asserted); kept, under 3% was measured
    kept = _kept_faults()
    pages_per_step = _BUFFERS * (4 << 20) // 4096
    assert kept["ok"] is True and kept["faults_per_step"] < 0.1 * pages_per_step
