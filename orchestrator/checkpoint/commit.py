"""The commit protocol of step checkpoints: attempts, manifest, ``COMMIT``, ``latest``, retention.

Layout under a checkpoint root (a local directory or ``s3://bucket/prefix``; ``docs/checkpoint-format.md``)::

    step_00000050/            a committed checkpoint
        __<rank>_0.distcp     DCP shards, one per writing rank: the raw bytes of model parameters and buffers
        .metadata             ("model.<fqn>") and optimizer state ("optim.<fqn>.<exp_avg|exp_avg_sq|step>") at
                              the offsets .metadata records, keyed by global names so any pipeline or
                              data-parallel layout can read them
        train_state.json      counters, loader cursor, per-rank RNG, layout, curriculum and routing slots
        shard_hashes.<r>.json each writing rank's shard's (and rank 0's .metadata's) sha256, computed while
                              writing
        manifest.json         every other file with its size (bytes) and sha256
        COMMIT                written last; names the step and the manifest's sha256
    step_00000100.attempt-<id>/   a save in progress, or an abandoned one (never read, whatever it holds)
    latest                    the newest committed step directory name

Commit, then believe (docs/architecture.md principle 4): ranks write into a fresh attempt directory, hashing
what they write as they write it (``dcp_storage.py``); the coordinator checks that every shard DCP's metadata
references is present and long enough, builds the manifest from those hashes (no shard is read back),
makes every file durable, and publishes the attempt as ``step_<N>`` with its ``COMMIT`` (locally COMMIT is
written into the attempt and one atomic rename publishes it; on S3 the publish is a copy and COMMIT follows it),
and only then moves ``latest``. Readers ignore anything without a ``COMMIT`` that matches its manifest, so an
aborted attempt is never merged with a later save of the same step.
"""

from __future__ import annotations

import hashlib
import json
import uuid

from v4train.orchestrator.checkpoint.dcp_storage import is_hashes_file, shard_ends
from v4train.orchestrator.checkpoint.storage import Storage

__all__ = ["FORMAT_VERSION", "READABLE_FORMAT_VERSIONS", "CheckpointError", "step_name", "begin_attempt", "commit",
           "latest_committed", "list_checkpoints", "verify", "inspect", "read_train_state", "expired",
           "apply_retention", "supersede_after"]

# 2: every rank's shards as one file of raw records (dcp_storage.RAW_RECORD), which a reader of version 1 cannot
# read; 1: one torch.save record per tensor, still read (dcp_storage.RawRecordReader hands those to torch).
FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
_STEP_PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, uncommitted, corrupt or lacks state; the message names the file or tensor."""


def step_name(step: int) -> str:
    """Directory name of the committed checkpoint of optimizer step ``step``."""
    return f"{_STEP_PREFIX}{step:08d}"


def begin_attempt(storage: Storage, step: int) -> str:
    """Create and return (relative to the root) a fresh attempt directory for ``step``."""
    attempt = f"{step_name(step)}.attempt-{uuid.uuid4().hex[:8]}"
    storage.makedirs(attempt)
    return attempt


def _check_shards(storage: Storage, attempt: str, sizes: dict[str, int], recorded: dict[str, dict]) -> None:
    """Every file DCP's metadata references exists and holds the bytes it points at: the lengths its writer
    recorded beside ``.metadata``'s hash (``references``), else those read from ``.metadata`` itself."""
    if ".metadata" not in sizes:
        raise CheckpointError(f"{storage.url_of(attempt)}: no DCP .metadata (a rank did not finish)")
    references = recorded.get(".metadata", {}).get("references")
    if references is None:
        references = shard_ends(storage.dcp_reader(attempt).read_metadata())
    for rel, needed in references.items():
        have = sizes.get(rel)
        if have is None or have < needed:
            raise CheckpointError(f"{storage.url_of(attempt)}/{rel}: shard missing or truncated")


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _recorded_hashes(storage: Storage, attempt: str, sizes: dict[str, int], written: dict[str, str]) -> dict:
    """``{file: {"bytes", "sha256", ...}}`` from every writing rank's ``shard_hashes.<rank>.json``
    (``dcp_storage.hashes_file``): its shard's, and DCP's coordinator's ``.metadata``'s with the bytes each shard
    must hold (``references``). Each hashes file's text is added to ``written``."""
    recorded = {}
    for rel in sorted(sizes):
        if is_hashes_file(rel):
            written[rel] = storage.read_text(f"{attempt}/{rel}")
            recorded.update(json.loads(written[rel]))
    return recorded


def _file_hashes(storage: Storage, attempt: str, sizes: dict[str, int], written: dict[str, str],
                 recorded: dict[str, dict]) -> dict:
    """``{file: {"bytes", "sha256"}}`` for every file of ``attempt``, without reading shards back.

    Shards and ``.metadata`` come with the hashes their writers computed while writing them (``recorded``);
    small files the coordinator wrote or read (``written``: their text) are hashed from memory; only files no
    writer hashed (a converted checkpoint's shards) are read. A file whose size differs from what its writer
    hashed is refused.
    """
    out = {}
    for rel, size in sorted(sizes.items()):
        if rel in written:
            out[rel] = {"bytes": size, "sha256": _sha256_text(written[rel])}
        elif rel in recorded:
            if recorded[rel]["bytes"] != size:
                raise CheckpointError(f"{storage.url_of(attempt)}/{rel}: {size} bytes on storage, "
                                      f"{recorded[rel]['bytes']} written")
            out[rel] = {"bytes": size, "sha256": recorded[rel]["sha256"]}
        else:
            out[rel] = {"bytes": size, "sha256": storage.sha256(f"{attempt}/{rel}")}
    return out


def commit(storage: Storage, attempt: str, step: int, train_state: dict) -> str:
    """Finish a save: verify shards, write train_state.json, manifest.json and COMMIT, publish, move ``latest``.

    Every file of the checkpoint is durable before it is published, and COMMIT before ``latest`` moves.
    Locally the attempt gets its train_state.json, manifest.json and COMMIT straight away (nothing reads an
    attempt), each of its files and the directory are fsynced together (the shards' second fsync finds them
    clean), and one rename publishes a complete committed directory; ``latest``'s write then fsyncs the root,
    which makes that rename durable too. On S3 the publish is a copy, not atomic: COMMIT is written into
    ``step_<N>/`` after it.

    Returns the committed directory name. Raises CheckpointError if a shard is missing or a committed
    checkpoint of ``step`` already exists.
    """
    final = step_name(step)
    if storage.exists(f"{final}/COMMIT"):
        raise CheckpointError(f"{storage.url_of(final)}: a committed checkpoint for step {step} already exists")
    state_text = json.dumps({"format_version": FORMAT_VERSION, **train_state})
    sizes = {**storage.files(attempt), "train_state.json": len(state_text.encode())}
    written = {"train_state.json": state_text}
    recorded = _recorded_hashes(storage, attempt, sizes, written)
    _check_shards(storage, attempt, sizes, recorded)
    manifest = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "files": _file_hashes(storage, attempt, sizes, written, recorded),
    }
    manifest_text = json.dumps(manifest, indent=1, sort_keys=True)
    record = json.dumps({"step": step, "manifest_sha256": _sha256_text(manifest_text)})
    storage.remove(final)  # only an interrupted publish on S3 can leave one here (it has no COMMIT)
    texts = {"train_state.json": state_text, "manifest.json": manifest_text}
    others = [rel for rel in sizes if rel not in texts]
    if storage.is_local:
        storage.write_files(attempt, {**texts, "COMMIT": record}, sync=others)
        storage.publish(attempt, final)
    else:
        storage.write_files(attempt, texts, sync=others)
        storage.publish(attempt, final)
        storage.write_files(final, {"COMMIT": record})
    storage.write_text("latest", final + "\n")
    return final


def _parse_step(name: str) -> tuple[int, bool] | None:
    """(step, is_attempt) for a checkpoint directory name, else None."""
    if not name.startswith(_STEP_PREFIX):
        return None
    digits, _, rest = name[len(_STEP_PREFIX):].partition(".")
    if not digits.isdigit() or (rest and not rest.startswith("attempt-")):
        return None
    return int(digits), bool(rest)


def _committed(storage: Storage) -> list[tuple[int, str]]:
    out = []
    for name in storage.listdir():
        parsed = _parse_step(name)
        if parsed and not parsed[1] and storage.exists(f"{name}/COMMIT"):
            out.append((parsed[0], name))
    return sorted(out)


def latest_committed(storage: Storage) -> str | None:
    """The newest committed step directory (``latest`` if it names a committed one), or None."""
    if storage.exists("latest"):
        name = storage.read_text("latest").strip()
        if storage.exists(f"{name}/COMMIT"):
            return name
    steps = _committed(storage)
    return steps[-1][1] if steps else None


def list_checkpoints(storage: Storage) -> list[dict]:
    """Every checkpoint directory under the root: name, step, committed, layout (if known), bytes."""
    out = []
    for name in storage.listdir():
        parsed = _parse_step(name)
        if parsed is None:
            continue
        committed = not parsed[1] and storage.exists(f"{name}/COMMIT")
        layout = None
        if storage.exists(f"{name}/train_state.json"):
            layout = json.loads(storage.read_text(f"{name}/train_state.json")).get("layout")
        out.append({"name": name, "step": parsed[0], "committed": committed, "layout": layout,
                    "bytes": sum(storage.files(name).values())})
    return sorted(out, key=lambda c: (c["step"], c["name"]))


def verify(storage: Storage, name: str) -> dict:
    """Check COMMIT, the manifest's own hash, and every file's size and sha256; return train_state.json.

    Raises CheckpointError naming the first missing or mismatching file.
    """
    where = storage.url_of(name)
    if not storage.exists(f"{name}/COMMIT"):
        raise CheckpointError(f"{where}: no COMMIT marker (an unfinished save)")
    manifest_text = storage.read_text(f"{name}/manifest.json")
    record = json.loads(storage.read_text(f"{name}/COMMIT"))
    if hashlib.sha256(manifest_text.encode()).hexdigest() != record["manifest_sha256"]:
        raise CheckpointError(f"{where}/manifest.json: does not match the hash recorded in COMMIT")
    manifest = json.loads(manifest_text)
    if manifest.get("format_version") not in READABLE_FORMAT_VERSIONS:
        raise CheckpointError(f"{where}: format version {manifest.get('format_version')}; this v4train reads "
                              f"versions {', '.join(map(str, READABLE_FORMAT_VERSIONS))}")
    sizes = storage.files(name)
    for rel, entry in manifest["files"].items():
        if rel not in sizes:
            raise CheckpointError(f"{where}/{rel}: listed in the manifest but missing")
        if sizes[rel] != entry["bytes"] or storage.sha256(f"{name}/{rel}") != entry["sha256"]:
            raise CheckpointError(f"{where}/{rel}: size or sha256 differs from the manifest")
    state = read_train_state(storage, name)
    if state.get("format_version") not in READABLE_FORMAT_VERSIONS:
        raise CheckpointError(f"{where}/train_state.json: format version {state.get('format_version')}")
    return state


def read_train_state(storage: Storage, name: str) -> dict:
    """The parsed ``train_state.json`` of a step directory."""
    return json.loads(storage.read_text(f"{name}/train_state.json"))


def inspect(storage: Storage, name: str) -> dict:
    """train_state.json plus the tensor list (name, shape, dtype) from DCP's metadata."""
    metadata = storage.dcp_reader(name).read_metadata()
    tensors = []
    for key, meta in sorted(metadata.state_dict_metadata.items()):
        size = getattr(meta, "size", None)
        props = getattr(meta, "properties", None)
        tensors.append({"name": key, "shape": list(size) if size is not None else None,
                        "dtype": str(getattr(props, "dtype", "")) if props is not None else None})
    return {"train_state": read_train_state(storage, name), "tensors": tensors}


def supersede_after(storage: Storage, step: int) -> list[str]:
    """Set aside committed checkpoints newer than ``step`` (a rollback abandoned their trajectory).

    They are renamed ``<name>.superseded-<id>`` (kept for inspection, never read or retained), and
    ``latest`` is pointed at the newest remaining committed checkpoint. Returns the new names.
    """
    moved = []
    for s, name in _committed(storage):
        if s > step:
            target = f"{name}.superseded-{uuid.uuid4().hex[:8]}"
            storage.publish(name, target)
            moved.append(target)
    remaining = _committed(storage)
    if moved:
        if remaining:
            storage.write_text("latest", remaining[-1][1] + "\n")
        else:
            storage.remove("latest")
    return moved


def expired(storage: Storage, keep: int) -> list[str]:
    """What retention deletes after a commit: every abandoned attempt, and all but the newest ``keep`` committed
    checkpoints (keep > 0; 0 keeps every committed one).

    Saves are serialised by the one coordinator, so any attempt still present when a successor has
    committed is abandoned; an attempt begun after this call is not listed.
    """
    names = storage.listdir()
    out = [n for n in names if (_parse_step(n) or (0, False))[1]]
    if keep > 0:
        out += [name for _, name in _committed(storage)[:-keep]]
    return out


def apply_retention(storage: Storage, keep: int) -> list[str]:
    """After a commit: delete what :func:`expired` lists. Returns the deleted directory names."""
    deleted = expired(storage, keep)
    for name in deleted:
        storage.remove(name)
    return deleted
