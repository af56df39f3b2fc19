"""Step checkpoints: sharded tensors through torch DCP, and the commit protocol around them.

On-disk layout under the checkpoint root (DESIGN section 4)::

    step_00000050/            a committed checkpoint
        __0_0.distcp ...      DCP shards: model parameters and buffers ("model.<fqn>") and the optimizer
        .metadata             state ("optim.<fqn>.<exp_avg|exp_avg_sq|step>"), keyed by global names so a
                              different pipeline or data-parallel layout can read them
        train_state.json      counters, loader cursor, per-rank RNG, layout, format version
        manifest.json         every other file with its size (bytes) and sha256
        COMMIT                written last; names the step and the manifest's sha256
    step_00000100.attempt-<id>/   a save in progress or an abandoned one (never read)
    latest                    the newest committed step directory name, replaced atomically

Commit, then believe (DESIGN principle 4): ranks write into a fresh attempt directory; the coordinator
hashes every file into the manifest, writes ``COMMIT``, renames the attempt to ``step_<N>`` and only then
moves ``latest``. Readers ignore anything without a ``COMMIT`` that matches its manifest.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "save_shards",
    "load_shards",
    "rng_state",
    "set_rng_state",
    "begin_attempt",
    "commit",
    "latest_committed",
    "verify",
    "read_train_state",
    "apply_retention",
]

FORMAT_VERSION = 1
_STEP_PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, uncommitted, corrupt or lacks state; the message names the file or tensor."""


# ------------------------------------------------------------------ rank side: shards
def _optimizer_state(stage: torch.nn.Module, optimizer: torch.optim.Optimizer, *, allocate: bool) -> dict:
    """Optimizer state keyed ``optim.<param fqn>.<name>``; with ``allocate``, zero tensors to load into."""
    out = {}
    for fqn, param in stage.named_parameters():
        state = optimizer.state.get(param)
        if allocate and not state:
            state = {
                "step": torch.zeros((), dtype=torch.float32),
                "exp_avg": torch.zeros_like(param),
                "exp_avg_sq": torch.zeros_like(param),
            }
            optimizer.state[param] = state
        for name, value in (state or {}).items():
            out[f"optim.{fqn}.{name}"] = value
    return out


def save_shards(path: str, stage: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Write this rank's model and optimizer state into the DCP checkpoint at ``path`` (collective)."""
    state = {f"model.{k}": v for k, v in stage.state_dict().items()}
    state.update(_optimizer_state(stage, optimizer, allocate=False))
    dcp.save(state, storage_writer=dcp.FileSystemWriter(path))


def load_shards(path: str, stage: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load model and optimizer state for this rank's stage from ``path`` (collective).

    Raises CheckpointError naming the first tensors the checkpoint lacks or whose shape differs, before
    anything is modified.
    """
    reader = dcp.FileSystemReader(path)
    saved = reader.read_metadata().state_dict_metadata
    model_sd = {f"model.{k}": v.detach().clone() for k, v in stage.state_dict().items()}
    optim_sd = _optimizer_state(stage, optimizer, allocate=True)
    expected = {**model_sd, **optim_sd}
    missing = sorted(k for k in expected if k not in saved)
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise CheckpointError(f"{path}: checkpoint lacks {', '.join(missing[:3])}{more}")
    for key, tensor in expected.items():
        meta = saved[key]
        size = getattr(meta, "size", None)
        if size is not None and tuple(size) != tuple(tensor.shape):
            raise CheckpointError(f"{path}: {key} has shape {tuple(size)}, this model expects {tuple(tensor.shape)}")
    dcp.load(expected, storage_reader=reader)
    stage.load_state_dict({k.removeprefix("model."): v for k, v in model_sd.items()}, strict=True)


def rng_state() -> str:
    """This process's torch CPU RNG state, base64-encoded for ``train_state.json``."""
    return base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()


def set_rng_state(encoded: str) -> None:
    """Restore a state produced by :func:`rng_state`."""
    raw = base64.b64decode(encoded)
    torch.set_rng_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))


# ------------------------------------------------------------------ coordinator side: commit protocol
def _step_name(step: int) -> str:
    return f"{_STEP_PREFIX}{step:08d}"


def begin_attempt(root: str | Path, step: int) -> Path:
    """Create and return a fresh attempt directory for ``step`` under ``root``."""
    attempt = Path(root) / f"{_step_name(step)}.attempt-{uuid.uuid4().hex[:8]}"
    attempt.mkdir(parents=True)
    return attempt


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_write(path: Path, text: str) -> None:
    with path.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def commit(attempt: Path, step: int, train_state: dict) -> Path:
    """Finish a save: write train_state.json, manifest.json and COMMIT, rename, then move ``latest``.

    Returns the committed ``step_<N>`` directory. Raises CheckpointError if it already exists.
    """
    root = attempt.parent
    final = root / _step_name(step)
    if final.exists():
        raise CheckpointError(f"{final}: a committed checkpoint for step {step} already exists")
    _fsync_write(attempt / "train_state.json", json.dumps({"format_version": FORMAT_VERSION, **train_state}))
    files = sorted(p for p in attempt.rglob("*") if p.is_file())
    manifest = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "files": {str(p.relative_to(attempt)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files},
    }
    manifest_text = json.dumps(manifest, indent=1, sort_keys=True)
    _fsync_write(attempt / "manifest.json", manifest_text)
    commit_record = {"step": step, "manifest_sha256": hashlib.sha256(manifest_text.encode()).hexdigest()}
    _fsync_write(attempt / "COMMIT", json.dumps(commit_record))
    os.replace(attempt, final)
    tmp = root / f"latest.tmp-{uuid.uuid4().hex[:8]}"
    _fsync_write(tmp, final.name + "\n")
    os.replace(tmp, root / "latest")
    return final


def _committed_steps(root: Path) -> list[tuple[int, Path]]:
    out = []
    for p in root.glob(f"{_STEP_PREFIX}*"):
        name = p.name[len(_STEP_PREFIX):]
        if p.is_dir() and name.isdigit() and (p / "COMMIT").is_file():
            out.append((int(name), p))
    return sorted(out)


def latest_committed(root: str | Path) -> Path | None:
    """The newest committed step directory under ``root`` (``latest`` if it is valid), or None."""
    root = Path(root)
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / "COMMIT").is_file():
            return candidate
    steps = _committed_steps(root)
    return steps[-1][1] if steps else None


def verify(step_dir: str | Path) -> dict:
    """Check COMMIT, the manifest's own hash, and every file's size and sha256; return train_state.json.

    Raises CheckpointError naming the first missing or mismatching file.
    """
    step_dir = Path(step_dir)
    commit_path = step_dir / "COMMIT"
    if not commit_path.is_file():
        raise CheckpointError(f"{step_dir}: no COMMIT marker (an unfinished save)")
    manifest_text = (step_dir / "manifest.json").read_text()
    record = json.loads(commit_path.read_text())
    if hashlib.sha256(manifest_text.encode()).hexdigest() != record["manifest_sha256"]:
        raise CheckpointError(f"{step_dir}/manifest.json: does not match the hash recorded in COMMIT")
    manifest = json.loads(manifest_text)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{step_dir}: format version {manifest.get('format_version')}, expected {FORMAT_VERSION}")
    for rel, entry in manifest["files"].items():
        f = step_dir / rel
        if not f.is_file():
            raise CheckpointError(f"{f}: listed in the manifest but missing")
        if f.stat().st_size != entry["bytes"] or _sha256(f) != entry["sha256"]:
            raise CheckpointError(f"{f}: size or sha256 differs from the manifest")
    return read_train_state(step_dir)


def read_train_state(step_dir: str | Path) -> dict:
    """The parsed ``train_state.json`` of a step directory."""
    return json.loads((Path(step_dir) / "train_state.json").read_text())


def apply_retention(root: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` committed checkpoints and every abandoned attempt (keep > 0).

    Runs only after a successor has committed; returns the deleted directories.
    """
    if keep <= 0:
        return []
    root = Path(root)
    deleted = [p for _, p in _committed_steps(root)[:-keep]]
    deleted += [p for p in root.glob(f"{_STEP_PREFIX}*.attempt-*") if p.is_dir()]
    for p in deleted:
        shutil.rmtree(p, ignore_errors=True)
    return deleted


def describe_bytes(step_dir: str | Path) -> int:
    """Total bytes of a checkpoint directory (for listings)."""
    return sum(p.stat().st_size for p in Path(step_dir).rglob("*") if p.is_file())

