"""The ``v4train`` command line, and ``torchrun`` of the rank launcher, run as subprocesses, as a user runs them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from support.paths import REPO_ROOT

V4TRAIN = [sys.executable, "-m", "v4train.orchestrator.tools.cli"]


def cli_env() -> dict:
    """This process's environment for a CLI subprocess: Ray's token auth off, unbuffered output, and no
    ``RAY_ADDRESS`` (so the CLI starts its own embedded cluster rather than joining another)."""
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    return env


TORCHRUN_TIMEOUT_S = 300


def torchrun(nproc: int, *args, timeout_s: float = TORCHRUN_TIMEOUT_S,
             torchrun_args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``torchrun TORCHRUN_ARGS -m v4train.orchestrator.launch ARGS`` on ``nproc`` local ranks, in its own
    session, killed as a group if it outlives ``timeout_s`` (no orphaned ranks; the test fails)."""
    from v4train.orchestrator.control.rendezvous import free_port

    launcher = Path(sys.executable).parent / "torchrun"
    cmd = [str(launcher), "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1", "--master-port",
           str(free_port()), *torchrun_args, "-m", "v4train.orchestrator.launch", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun timed out: {err[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
