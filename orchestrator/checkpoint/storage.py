"""Checkpoint storage on a local path or ``s3://bucket/prefix``, through fsspec (s3fs for S3).

The one module that knows how files reach a checkpoint root: the commit protocol in
``orchestrator/checkpoint/commit.py`` calls only these operations, and the DCP shard writers/readers come from
here too (``dcp_storage.py``: one file of raw records per rank, hashed while written; read by offset).

S3 endpoint and region come from the job spec (``checkpoint.endpoint_url``, ``checkpoint.region``);
credentials only from the environment (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, read by botocore),
so they never appear in ``job.yaml``, events or logs.

Object storage under real conditions: every S3 call is retried by botocore's ``standard`` retry mode
(:data:`S3_RETRIES`: exponential backoff with jitter on 5xx answers such as 503 SlowDown, throttling and
connection errors), inside which s3fs retries SlowDown again; no bucket is ever created (DCP's writer asks
fsspec to create the checkpoint "directory", which s3fs turns into ``CreateBucket`` whenever the bucket is not
visible: :func:`_object_store_writer` skips it, object stores have no directories).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import posixpath
import uuid
from collections.abc import Iterable

from botocore.exceptions import BotoCoreError
from fsspec.core import url_to_fs
from v4train.orchestrator.checkpoint.dcp_storage import HashingWriter, RawRecordReader

__all__ = ["Storage", "CREDENTIAL_ENV_VARS", "S3_RETRIES", "STORAGE_ERRORS"]

# Variables a rank needs to reach S3; forwarded to rank processes, never logged.
CREDENTIAL_ENV_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION")
# botocore's retry policy for every S3 call (attempts include the first).
S3_RETRIES = {"mode": "standard", "max_attempts": 8}
# What a storage call raises when its root refuses or cannot be reached, once retries are spent: s3fs turns S3's
# answers into OSError (PermissionError, FileNotFoundError), an endpoint that does not answer is botocore's own
# (EndpointConnectionError, ConnectTimeoutError...).
STORAGE_ERRORS = (OSError, BotoCoreError)


def _object_store_writer(writer: HashingWriter) -> HashingWriter:
    """``writer`` without torch DCP's ``mkdir`` of the checkpoint directory: on S3 that call is s3fs's
    ``makedirs``, which sends ``CreateBucket`` when the bucket is missing or not listable with the
    credentials at hand. Object stores have no directories; a missing bucket fails the first upload."""
    writer.fs.mkdir = _no_directories
    return writer


def _no_directories(path: str) -> None:
    """An object store's ``mkdir``: there is nothing to create."""


def _fsync_path(path: str) -> None:
    """Make a local file's content, or a directory's entries (a file created or renamed in it: POSIX asks for
    this after a rename, which an fsync of the file does not cover), durable: fsync of a descriptor opened for
    reading, which flushes what any process wrote."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_all(paths: list[str]) -> None:
    """fsync ``paths`` concurrently: a journaling file system (ext4's jbd2, XFS) folds fsyncs that wait at the
    same time into one journal commit, where one after the other each waits for its own."""
    if len(paths) == 1:
        _fsync_path(paths[0])
        return
    with concurrent.futures.ThreadPoolExecutor(len(paths)) as pool:
        list(pool.map(_fsync_path, paths))


class Storage:
    """A checkpoint root. Paths passed to methods are relative to the root, ``/``-separated.

    Args:
        root: a local directory or ``s3://bucket/prefix``.
        endpoint_url: S3 endpoint (e.g. a MinIO or moto server); None for AWS or local paths.
        region: S3 region name, or None.
    """

    def __init__(self, root: str, *, endpoint_url: str | None = None, region: str | None = None) -> None:
        self.url = root.rstrip("/") if "://" in root else os.path.abspath(root)
        self.options: dict = {}
        if self.url.startswith("s3://"):
            client = {k: v for k, v in (("endpoint_url", endpoint_url), ("region_name", region)) if v}
            self.options = {"config_kwargs": {"retries": dict(S3_RETRIES)}}
            if client:
                self.options["client_kwargs"] = client
        self.fs, self._root = url_to_fs(self.url, **self.options)
        self.is_local = self.fs.protocol in ("file", ("file", "local"))
        if self.is_local:
            os.makedirs(self._root, exist_ok=True)

    def __repr__(self) -> str:
        return f"Storage({self.url})"

    # ---------------------------------------------------------------- paths
    def _path(self, rel: str = "") -> str:
        return posixpath.join(self._root, rel) if rel else self._root

    def url_of(self, rel: str) -> str:
        """The full URL (or absolute local path) of ``rel``, for messages and DCP."""
        return posixpath.join(self.url, rel)

    # ---------------------------------------------------------------- queries
    def refresh(self) -> None:
        """Forget cached listings: other processes (the ranks) write here too."""
        self.fs.invalidate_cache()

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self._path(rel))

    def listdir(self, rel: str = "") -> list[str]:
        """Names directly under ``rel`` (files and directories); empty if it does not exist."""
        self.refresh()
        path = self._path(rel)
        if not self.fs.exists(path):
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(path, detail=False))

    def files(self, rel: str) -> dict[str, int]:
        """Every file under ``rel`` (recursively) as {path relative to ``rel``: size in bytes}."""
        self.refresh()
        base = self._path(rel).rstrip("/") + "/"
        found = self.fs.find(self._path(rel), detail=True)
        return {p[len(base):] if p.startswith(base) else p: int(info["size"]) for p, info in found.items()}

    def read_text(self, rel: str) -> str:
        with self.fs.open(self._path(rel), "r") as f:
            return f.read()

    def sha256(self, rel: str) -> str:
        digest = hashlib.sha256()
        with self.fs.open(self._path(rel), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
        return digest.hexdigest()

    # ---------------------------------------------------------------- writes
    def write_text(self, rel: str, text: str) -> None:
        """Write a small file so that readers see the old content or the new, never a torn one, durably
        (with every rename made in its directory before).

        Locally: a temporary file, fsync, an atomic rename, then fsync of the directory (which also makes an
        earlier :meth:`publish` into it durable). On S3 one PUT is already atomic and durable.
        """
        path = self._path(rel)
        if self.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_path(os.path.dirname(path))
        else:
            self.fs.pipe_file(path, text.encode())

    def write_files(self, rel: str, texts: dict[str, str], sync: Iterable[str] = ()) -> None:
        """Write small new files into directory ``rel`` (``{name: text}``) and make them durable, with the files
        of ``rel`` named in ``sync`` (written by other processes) and the directory's entries.

        Not atomic file by file (no temporary file and rename): only for a directory no reader trusts yet, an
        attempt before its publish. Locally each file and the directory are fsynced concurrently
        (:func:`_fsync_all`); on S3 each file is one PUT, durable when it returns.
        """
        base = self._path(rel)
        for name, text in texts.items():
            if self.is_local:
                with open(posixpath.join(base, name), "w") as f:
                    f.write(text)
            else:
                self.fs.pipe_file(posixpath.join(base, name), text.encode())
        if self.is_local:
            _fsync_all([posixpath.join(base, name) for name in {*texts, *sync}] + [base])

    def makedirs(self, rel: str) -> None:
        if self.is_local:
            os.makedirs(self._path(rel), exist_ok=True)

    def remove(self, rel: str) -> None:
        """Delete ``rel`` and everything under it (no error if absent)."""
        path = self._path(rel)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)
        self.refresh()

    def publish(self, src: str, dst: str) -> None:
        """Move directory ``src`` to ``dst`` (which must not exist).

        Locally an atomic rename, durable once the parent directory is fsynced (:meth:`write_text` into it
        does). On S3 a server-side copy of every object, then deletion of ``src``; not atomic, which is why
        COMMIT is written into ``dst`` only after this returns.
        """
        if self.is_local:
            os.replace(self._path(src), self._path(dst))
            return
        for rel in self.files(src):
            self.fs.copy(self._path(f"{src}/{rel}"), self._path(f"{dst}/{rel}"))
        self.remove(src)

    # ---------------------------------------------------------------- DCP
    def dcp_writer(self, rel: str) -> HashingWriter:
        """A DCP storage writer into directory ``rel``: one file of raw records per rank, each file's sha256
        recorded as it is written; never creates a bucket (see :func:`_object_store_writer`)."""
        writer = HashingWriter(self.url_of(rel), **self.options)
        return writer if self.is_local else _object_store_writer(writer)

    def dcp_reader(self, rel: str) -> RawRecordReader:
        """A DCP storage reader of directory ``rel`` (raw records by offset; ``torch.save`` records too)."""
        return RawRecordReader(self.url_of(rel), **self.options)
