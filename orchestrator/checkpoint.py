"""Step checkpoints: sharded tensors through torch DCP, and the commit protocol around them.

Layout under a checkpoint root (a local directory or ``s3://bucket/prefix``; ``docs/checkpoint-format.md``)::

    step_00000050/            a committed checkpoint
        __<rank>_0.distcp     DCP shards: model parameters and buffers ("model.<fqn>") and optimizer state
        .metadata             ("optim.<fqn>.<exp_avg|exp_avg_sq|step>"), keyed by global names so any
                              pipeline or data-parallel layout can read them
        train_state.json      counters, loader cursor, per-rank RNG, layout, curriculum and routing slots
        manifest.json         every other file with its size (bytes) and sha256
        COMMIT                written last; names the step and the manifest's sha256
    step_00000100.attempt-<id>/   a save in progress, or an abandoned one (never read)
    latest                    the newest committed step directory name

Commit, then believe (DESIGN principle 4): ranks write into a fresh attempt directory; the coordinator
checks that every shard DCP's metadata references is present and long enough, hashes every file (reading
it back) into the manifest, publishes the attempt as ``step_<N>`` (an atomic rename locally, a copy on S3),
writes ``COMMIT`` there and only then moves ``latest``. Readers ignore anything without a ``COMMIT`` that
matches its manifest, so an aborted attempt is never merged with a later save of the same step.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid

import torch
import torch.distributed.checkpoint as dcp

from v4train.orchestrator.storage import Storage
from v4train.parallel.optim import global_state, initial_state
from v4train.parallel.tensor_parallel import TensorParallel, full_shape, gather_full, is_sharded, shard_of

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "save_shards",
    "load_shards",
    "rng_state",
    "set_rng_state",
    "step_name",
    "begin_attempt",
    "commit",
    "latest_committed",
    "list_checkpoints",
    "verify",
    "inspect",
    "read_train_state",
    "apply_retention",
    "supersede_after",
    "encode_rows",
    "decode_rows",
    "merge_routing",
]

FORMAT_VERSION = 1
_STEP_PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, uncommitted, corrupt or lacks state; the message names the file or tensor."""


# ------------------------------------------------------------------ rank side: shards
def _optimizer_state(stage: torch.nn.Module, optimizer) -> dict:
    """Optimizer state keyed ``optim.<param fqn>.<name>`` (AdamW: step, exp_avg, exp_avg_sq; Muon: step,
    momentum_buffer).

    A parameter the optimizer has not stepped yet (no gradient so far, e.g. the Lightning Indexer before
    its warm-up) gets its optimizer's initial state (:func:`parallel.optim.initial_state`): exactly what
    the optimizer would create lazily at its first gradient, so saving it changes nothing and every
    checkpoint holds state for every parameter.
    """
    out = {}
    for fqn, param in stage.named_parameters():
        state = optimizer.state.get(param)
        if not state:
            state = initial_state(optimizer, param)
            optimizer.state[param] = state
        for name, value in state.items():
            out[f"optim.{fqn}.{name}"] = value
    return out


def _entries(stage: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[tuple[str, torch.Tensor | None, torch.Tensor]]:
    """``(global key, the parameter whose TP sharding the tensor shares or None, the live tensor)`` for
    every model and optimizer tensor of this rank, in the same order on every rank of a stage."""
    params = dict(stage.named_parameters())
    # tensors only: Megatron's TP layers add an ``_extra_state`` entry that is None (a TE hook)
    out = [(f"model.{k}", params.get(k), v) for k, v in stage.state_dict().items() if isinstance(v, torch.Tensor)]
    for key, value in _optimizer_state(stage, optimizer).items():
        param = params[key.removeprefix("optim.").rsplit(".", 1)[0]]  # optim.<fqn>.<state name>
        out.append((key, param if value.shape == param.shape else None, value))
    return out


def shard_state(stage: torch.nn.Module, optimizer: torch.optim.Optimizer,
                tp: TensorParallel = TensorParallel()) -> dict[str, torch.Tensor]:
    """This rank's tensors for a checkpoint: model state and optimizer state by global name.

    Tensor-parallel shards are gathered into whole tensors (a collective over the TP group, same order
    on every rank), so the checkpoint holds one layout-free copy (DCP writes a key held by several ranks
    once) and any TP size can load it.
    """
    # a distributed optimizer's state is gathered whole for the save and left with its owners after
    with global_state(optimizer):
        return {key: gather_full(value, param, tp) if param is not None else value
                for key, param, value in _entries(stage, optimizer)}


def save_shards(storage: Storage, rel: str, stage: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Write this rank's model and optimizer state into the DCP checkpoint at ``rel`` (collective)."""
    dcp.save(shard_state(stage, optimizer), storage_writer=storage.dcp_writer(rel))


def load_shards(storage: Storage, rel: str, stage: torch.nn.Module, optimizer: torch.optim.Optimizer,
                tp: TensorParallel = TensorParallel()) -> None:
    """Load model and optimizer state for this rank's stage from ``rel`` (collective).

    Whole tensors are read and this rank's tensor-parallel slice kept, so a checkpoint of any (TP, PP, EP,
    DP) layout loads into any other. Raises CheckpointError naming the first tensors the checkpoint
    lacks or whose shape differs, before anything is modified.
    """
    reader = storage.dcp_reader(rel)
    saved = reader.read_metadata().state_dict_metadata
    # a distributed optimizer loads every parameter's whole state, then keeps the part this rank owns
    with global_state(optimizer):
        _load_entries(storage, rel, reader, saved, _entries(stage, optimizer), tp)


def _load_entries(storage: Storage, rel: str, reader, saved: dict, entries: list, tp: TensorParallel) -> None:
    # replicated tensors load in place; a TP shard loads its whole tensor, then keeps its slice
    sharded = [(key, param, value) for key, param, value in entries if param is not None and is_sharded(param)]
    expected = {key: value for key, _, value in entries}
    expected.update({key: torch.empty(full_shape(param, tp), dtype=value.dtype) for key, param, value in sharded})
    missing = sorted(k for k in expected if k not in saved)
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise CheckpointError(f"{storage.url_of(rel)}: checkpoint lacks {', '.join(missing[:3])}{more}")
    for key, tensor in expected.items():
        size = getattr(saved[key], "size", None)
        if size is not None and tuple(size) != tuple(tensor.shape):
            raise CheckpointError(
                f"{storage.url_of(rel)}: {key} has shape {tuple(size)}, this model expects {tuple(tensor.shape)}"
            )
    dcp.load(expected, storage_reader=reader)
    with torch.no_grad():
        for key, param, value in sharded:
            value.copy_(shard_of(expected[key], param, tp))


def rng_state() -> str:
    """This process's torch CPU RNG state, base64-encoded for ``train_state.json``."""
    return base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()


def set_rng_state(encoded: str) -> None:
    """Restore a state produced by :func:`rng_state`."""
    torch.set_rng_state(torch.frombuffer(bytearray(base64.b64decode(encoded)), dtype=torch.uint8))


def encode_rows(t: torch.Tensor) -> dict:
    """Routed expert indices ``[rows, S, K]`` as JSON for train_state.json: int16 (ids < 32768), base64."""
    return {"shape": list(t.shape), "data": base64.b64encode(t.to(torch.int16).numpy().tobytes()).decode()}


def decode_rows(blob: dict) -> torch.Tensor:
    """Inverse of :func:`encode_rows` (int64)."""
    raw = torch.frombuffer(bytearray(base64.b64decode(blob["data"])), dtype=torch.int16)
    return raw.reshape(blob["shape"]).to(torch.int64)


def merge_routing(rank_saves: list) -> dict:
    """The global anticipatory-routing tape {step: {layer: rows of the whole global batch}} from each rank's
    slice (``RankSave.routing``: the rows of its data-parallel rank), so that any layout can take its own
    rows back."""
    parts: dict[str, dict[str, dict[int, dict]]] = {}
    for save in rank_saves:
        for step, layers in save.routing.items():
            for layer, blob in layers.items():
                parts.setdefault(step, {}).setdefault(layer, {})[save.dp_rank] = blob
    return {step: {layer: encode_rows(torch.cat([decode_rows(by_dp[d]) for d in sorted(by_dp)]))
                   for layer, by_dp in layers.items()}
            for step, layers in parts.items()}


# ------------------------------------------------------------------ coordinator side: commit protocol
def step_name(step: int) -> str:
    """Directory name of the committed checkpoint of optimizer step ``step``."""
    return f"{_STEP_PREFIX}{step:08d}"


def begin_attempt(storage: Storage, step: int) -> str:
    """Create and return (relative to the root) a fresh attempt directory for ``step``."""
    attempt = f"{step_name(step)}.attempt-{uuid.uuid4().hex[:8]}"
    storage.makedirs(attempt)
    return attempt


def _check_shards(storage: Storage, attempt: str, sizes: dict[str, int]) -> None:
    """Every file DCP's metadata references exists and holds the bytes it points at."""
    if ".metadata" not in sizes:
        raise CheckpointError(f"{storage.url_of(attempt)}: no DCP .metadata (a rank did not finish)")
    metadata = storage.dcp_reader(attempt).read_metadata()
    for info in (metadata.storage_data or {}).values():
        have = sizes.get(info.relative_path)
        if have is None or have < info.offset + info.length:
            raise CheckpointError(f"{storage.url_of(attempt)}/{info.relative_path}: shard missing or truncated")


def commit(storage: Storage, attempt: str, step: int, train_state: dict) -> str:
    """Finish a save: verify shards, write train_state.json and manifest.json, publish, COMMIT, ``latest``.

    Returns the committed directory name. Raises CheckpointError if a shard is missing or a committed
    checkpoint of ``step`` already exists.
    """
    final = step_name(step)
    if storage.exists(f"{final}/COMMIT"):
        raise CheckpointError(f"{storage.url_of(final)}: a committed checkpoint for step {step} already exists")
    storage.write_text(f"{attempt}/train_state.json", json.dumps({"format_version": FORMAT_VERSION, **train_state}))
    sizes = storage.files(attempt)
    _check_shards(storage, attempt, sizes)
    manifest = {
        "format_version": FORMAT_VERSION,
        "step": step,
        "files": {rel: {"bytes": size, "sha256": storage.sha256(f"{attempt}/{rel}")} for rel, size in sorted(sizes.items())},
    }
    manifest_text = json.dumps(manifest, indent=1, sort_keys=True)
    storage.write_text(f"{attempt}/manifest.json", manifest_text)
    storage.remove(final)  # only an interrupted publish can leave one here (it has no COMMIT)
    storage.publish(attempt, final)
    record = {"step": step, "manifest_sha256": hashlib.sha256(manifest_text.encode()).hexdigest()}
    storage.write_text(f"{final}/COMMIT", json.dumps(record))
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
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{where}: format version {manifest.get('format_version')}, expected {FORMAT_VERSION}")
    sizes = storage.files(name)
    for rel, entry in manifest["files"].items():
        if rel not in sizes:
            raise CheckpointError(f"{where}/{rel}: listed in the manifest but missing")
        if sizes[rel] != entry["bytes"] or storage.sha256(f"{name}/{rel}") != entry["sha256"]:
            raise CheckpointError(f"{where}/{rel}: size or sha256 differs from the manifest")
    state = read_train_state(storage, name)
    if state.get("format_version") != FORMAT_VERSION:
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


def apply_retention(storage: Storage, keep: int) -> list[str]:
    """After a commit: delete every abandoned attempt, and all but the newest ``keep`` committed (keep > 0).

    Saves are serialised by the one coordinator, so any attempt still present when a successor has
    committed is abandoned. Returns the deleted directory names.
    """
    names = storage.listdir()
    deleted = [n for n in names if (_parse_step(n) or (0, False))[1]]
    if keep > 0:
        deleted += [name for _, name in _committed(storage)[:-keep]]
    for name in deleted:
        storage.remove(name)
    return deleted
