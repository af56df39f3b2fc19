"""Recovery tooling as a Python API: the operations behind ``v4train ckpt`` and ``v4train resume``.

Example::

    from v4train.orchestrator.tools import api
    api.list_checkpoints("s3://ckpts/run7", endpoint_url="http://minio:9000")
    step = api.latest_committed("runs/demo")            # 300
    api.verify("runs/demo", step)                         # raises CheckpointError on any mismatch
    api.inspect("runs/demo", step)["tensors"][:3]
    api.resume("runs/demo", step=250)                     # exit code, as the CLI

Roots are local directories or ``s3://bucket/prefix`` (credentials from the environment).
"""

from __future__ import annotations

from v4train.orchestrator import checkpoint
from v4train.orchestrator.checkpoint import CheckpointError
from v4train.orchestrator.checkpoint.storage import Storage

__all__ = ["CheckpointError", "list_checkpoints", "latest_committed", "verify", "inspect", "resume"]


def _storage(root: str, endpoint_url: str | None) -> Storage:
    return Storage(str(root), endpoint_url=endpoint_url)


def list_checkpoints(root: str, *, endpoint_url: str | None = None) -> list[dict]:
    """Every checkpoint under ``root``: {name, step, committed, layout, bytes}, oldest first."""
    return checkpoint.list_checkpoints(_storage(root, endpoint_url))


def latest_committed(root: str, *, endpoint_url: str | None = None) -> int | None:
    """The step of the newest committed checkpoint under ``root``, or None."""
    storage = _storage(root, endpoint_url)
    name = checkpoint.latest_committed(storage)
    return None if name is None else int(checkpoint.read_train_state(storage, name)["step"])


def verify(root: str, step: int | None = None, *, endpoint_url: str | None = None) -> dict:
    """Re-hash checkpoint ``step`` (default: newest committed) against its manifest; returns train_state.

    Raises CheckpointError naming the first missing or mismatching file, or a missing COMMIT.
    """
    storage = _storage(root, endpoint_url)
    name = checkpoint.step_name(step) if step is not None else checkpoint.latest_committed(storage)
    if name is None:
        raise CheckpointError(f"{storage.url}: no committed checkpoint")
    return checkpoint.verify(storage, name)


def inspect(root: str, step: int, *, endpoint_url: str | None = None) -> dict:
    """train_state.json and the tensor list ({name, shape, dtype}) of checkpoint ``step``."""
    return checkpoint.inspect(_storage(root, endpoint_url), checkpoint.step_name(step))


def resume(run_dir: str, *, step: int | None = None, overrides: list[str] = ()) -> int:
    """Continue the run in ``run_dir`` from committed ``step`` (default: newest); returns the exit code."""
    from v4train.orchestrator.tools.cli import main

    argv = ["resume", str(run_dir)] + (["--step", str(step)] if step is not None else [])
    for item in overrides:
        argv += ["--set", item]
    return main(argv)
