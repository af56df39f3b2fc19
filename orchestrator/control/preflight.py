"""Preflight: the checks a job passes before any rank starts (``v4train submit`` and ``v4train resume``).

Each check refuses a job whose failure no rank could fix, with one line naming the file or field, as a
:class:`SpecError` (exit 2), and writes nothing under the checkpoint root:

- the dataset: ``dataset.json`` and every shard of the splits the job reads, hashed against the manifest,
  with their schema, counts and token ids (:meth:`v4train.data.loader.TokenDataset.open`);
- the vocabulary: the tokenizer's (``tokenizer.json`` and ``dataset.json``) against ``model.vocab_size``;
- the checkpoint root: reachable and writable with the credentials the ranks will have (they inherit this
  process's environment): a small probe object, removed after; never a bucket created;
- the resume target: committed, its manifest matching ``COMMIT``, every file of the manifest and every
  shard DCP's metadata references present at its size, saved for this job's model.

:func:`preflight` returns the seconds each check took (recorded in the ``preflight`` event).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from pathlib import Path

from v4train.data.errors import DataError
from v4train.orchestrator.checkpoint.commit import CheckpointError
from v4train.orchestrator.checkpoint.completeness import check_referenced_shards
from v4train.orchestrator.checkpoint.storage import Storage
from v4train.orchestrator.control.run_state import read_train_state
from v4train.orchestrator.spec import JobSpec, SpecError

__all__ = ["preflight", "check_dataset", "check_vocabulary", "check_checkpoint_root", "check_resume_target",
           "PROBE_PREFIX"]

PROBE_PREFIX = ".v4train-probe-"


def preflight(job: JobSpec, root: str, resume_from: str | None = None) -> dict[str, float]:
    """Run every check for ``job`` with checkpoint root ``root`` (and committed step directory ``resume_from``).

    Returns {check: seconds}. Raises SpecError (one line) at the first failing check.
    """
    timings = {}
    started = time.perf_counter()
    check_dataset(job)
    timings["dataset_s"] = time.perf_counter() - started
    started = time.perf_counter()
    check_checkpoint_root(job, root)
    timings["checkpoint_root_s"] = time.perf_counter() - started
    if resume_from is not None:
        started = time.perf_counter()
        check_resume_target(job, root, resume_from)
        timings["resume_target_s"] = time.perf_counter() - started
    return {k: round(v, 3) for k, v in timings.items()}


def check_vocabulary(token_vocab: int, model_vocab: int, source: str) -> None:
    """Refuse a model whose embedding has fewer rows than the tokenizer has ids.

    Args:
        token_vocab: ids the tokenizer can emit (every token id is below it).
        model_vocab: ``model.vocab_size`` (rows of the embedding ``[vocab_size, dim]``).
        source: the file ``token_vocab`` comes from, for the message.
    Raises DataError naming ``model.vocab_size`` and ``source``.
    """
    if model_vocab < token_vocab:
        raise DataError(f"model.vocab_size: {model_vocab} is smaller than the tokenizer's vocabulary of "
                        f"{token_vocab} ({source}); token ids up to {token_vocab - 1} would fall outside the "
                        "embedding")


def check_dataset(job: JobSpec) -> None:
    """Verify the manifest and every shard the job reads, and the vocabulary against ``model.vocab_size``."""
    from v4train.data.loader import TokenDataset
    from v4train.data.prepare import TOKENIZER_FILE
    from v4train.data.tokenizer import load_tokenizer, tokenizer_vocab_size

    splits = ["train"] + (["val"] if job.train.eval_batches else [])
    try:
        data = {split: TokenDataset.open(job.data.path, split) for split in splits}
        vocab, source = data["train"].vocab_size, str(Path(job.data.path) / "dataset.json")
        manifest = json.loads((Path(job.data.path) / "dataset.json").read_text())
        tokenizer = Path(job.data.path) / manifest.get("tokenizer", TOKENIZER_FILE)
        if tokenizer.is_file():
            tok_vocab = tokenizer_vocab_size(load_tokenizer(tokenizer))
            if tok_vocab != vocab:
                raise DataError(f"{tokenizer}: {tok_vocab} ids, dataset.json says vocab_size {vocab}")
            vocab, source = tok_vocab, str(tokenizer)
        check_vocabulary(vocab, job.model.build(vocab_size=vocab).vocab_size, source)
    except DataError as exc:
        raise SpecError(f"data.path: {exc}") from None


def _storage(job: JobSpec, root: str) -> Storage:
    c = job.checkpoint
    return Storage(root, endpoint_url=c.endpoint_url, region=c.region)


def check_checkpoint_root(job: JobSpec, root: str) -> None:
    """The root is reachable and writable: on S3 a probe object is written and deleted (the bucket must
    exist: it is never created); a local root that does not exist yet needs a writable nearest ancestor
    (nothing is created)."""
    field = "checkpoint.root" if job.checkpoint.root else "--run-dir (the checkpoint root)"
    if "://" not in root:
        path = Path(root).absolute()
        existing = next(p for p in (path, *path.parents) if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
            raise SpecError(f"{field}: {existing} is not a writable directory")
        if existing != path:
            return
        probe = path / f"{PROBE_PREFIX}{uuid.uuid4().hex[:8]}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise SpecError(f"{field}: cannot write in {path} ({exc.strerror})") from None
        return
    storage = _storage(job, root)
    probe = f"{PROBE_PREFIX}{uuid.uuid4().hex[:8]}"
    try:
        storage.fs.pipe_file(storage.url_of(probe), b"v4train preflight probe")
        storage.fs.rm_file(storage.url_of(probe))
    except PermissionError as exc:
        raise SpecError(f"{field}: {storage.url} refused a probe write with the credentials in the environment "
                        f"(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY): {_first_line(exc)}") from None
    except FileNotFoundError:
        raise SpecError(f"{field}: the bucket of {storage.url} does not exist (v4train never creates buckets)") \
            from None
    except Exception as exc:  # endpoint unreachable, DNS, TLS: botocore's and aiohttp's many types
        raise SpecError(f"{field}: {storage.url} is not reachable ({type(exc).__name__}: {_first_line(exc)})") \
            from None


def check_resume_target(job: JobSpec, root: str, name: str) -> None:
    """Committed step directory ``name`` is complete and was saved for this job's model (no re-hash: the
    ranks' restore verifies every byte against the manifest)."""
    storage = _storage(job, root)
    where = storage.url_of(name)
    try:
        if not storage.exists(f"{name}/COMMIT"):
            raise SpecError(f"{where}: not a committed checkpoint (no COMMIT)")
        manifest_text = storage.read_text(f"{name}/manifest.json")
        if hashlib.sha256(manifest_text.encode()).hexdigest() != json.loads(
                storage.read_text(f"{name}/COMMIT"))["manifest_sha256"]:
            raise SpecError(f"{where}/manifest.json: does not match the hash recorded in COMMIT")
        sizes = storage.files(name)
        for rel, entry in json.loads(manifest_text)["files"].items():
            if sizes.get(rel) != entry["bytes"]:
                state = "missing" if rel not in sizes else f"{sizes[rel]} bytes, the manifest says {entry['bytes']}"
                raise SpecError(f"{where}/{rel}: {state}")
        try:
            check_referenced_shards(storage, name, sizes)
        except CheckpointError as exc:
            raise SpecError(str(exc)) from None
        read_train_state(json.loads(storage.read_text(f"{name}/train_state.json")), where, job)
    except SpecError:
        raise
    except Exception as exc:  # CheckpointError, PermissionError, a malformed JSON file
        raise SpecError(f"{where}: cannot resume from it ({type(exc).__name__}: {_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
