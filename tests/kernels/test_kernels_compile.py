"""Ahead-of-time sm_90 compile of every Triton kernel, no GPU needed.

Fails when a kernel does not compile for Hopper, when a forward kernel spills registers, or when a
kernel exceeds sm_90's registers or shared memory; prints registers, spills and shared memory per
kernel (``pytest -s`` shows the table; a failure message carries it too).

It runs ``python -m kernels.compile_check`` in a fresh process without ``TRITON_INTERPRET``: Triton's
own library functions are built in whichever mode the first ``import triton.language`` of a process
saw, and the JIT compiler needs the JIT build.

Shape letters (in the table): H heads, D head dim, HI indexer heads, DI indexer head dim.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from support.paths import REPO_ROOT



def _run(*args: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")   # silences triton 3.9's default-change warning
    proc = subprocess.run([sys.executable, "-m", "v4train.kernels.compile_check", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    print("\n" + proc.stdout)
    assert proc.returncode == 0, f"sm_90 compile check failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    for kernel in ("_sparse_attn_fwd", "_sparse_attn_bwd", "_indexer_scores", "_indexer_select", "_split_fwd",
                   "_split_bwd"):
        assert kernel in proc.stdout


def test_sm90_compile_production_shapes():
    _run()


@pytest.mark.slow
def test_sm90_compile_test_shapes_too():
    _run("--full")
