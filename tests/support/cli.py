"""The ``v4train`` command line run as a subprocess, as a user runs it."""

from __future__ import annotations

import os
import sys

V4TRAIN = [sys.executable, "-m", "v4train.orchestrator.tools.cli"]


def cli_env() -> dict:
    """This process's environment for a CLI subprocess: Ray's token auth off, unbuffered output, and no
    ``RAY_ADDRESS`` (so the CLI starts its own embedded cluster rather than joining another)."""
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    return env
