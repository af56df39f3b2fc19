"""Train/validation split, zstd Parquet token shards and the `dataset.json` manifest.

Validation split (`split_train_val`)
------------------------------------
The held-out split must be a fair sample of the training distribution and share no text with
it. Units of text are chosen for validation by a seeded, numpy-version-independent permutation
(`data.permute.keyed_permutation(n_units, seed, 1)`), walking it and taking units until their
characters reach `val_fraction` of the corpus; the last unit taken may overshoot by its size.

* Many documents (`n_documents * val_fraction >= 64`): a unit is a whole document.
* Few documents (Shakespeare's 42 works would give 2 validation plays, a poor sample): each
  document is first cut at paragraph breaks (a blank line) into pieces of about
  `total_chars * val_fraction / 64` characters, so about 64 pieces from all over the corpus go
  to validation. Consecutive pieces of one document that land in the same split are joined
  again, so a training document is a maximal run of a work between held-out pieces; every
  character of the corpus is in exactly one split.

The fraction is counted in characters because the split is made before tokenization: the
tokenizer is then trained on the training text only, so validation text never shapes the
vocabulary. Token counts per split are recorded in `dataset.json` (for Shakespeare at 0.05 the
validation token share lands within a few tenths of a percent of 5%). Validation documents are
stored in a seeded shuffled order (`keyed_permutation(n, seed, 2)`) so that any prefix of the
validation stream, which is what a short evaluation reads, samples the whole corpus.

Shards and manifest
-------------------
A split's documents are written in order to `{split}-{index:05d}.parquet` files, one row per
document, one column `tokens` of `list<uint16>` (vocab <= 65535) or `list<uint32>`, zstd
compressed; a shard is closed once it holds at least `shard_tokens` tokens, and a document is
never split across shards. `dataset.json` (written last, atomically: its presence means the
shards are complete) records:

    format_version, tokenizer, tokenizer_sha256, vocab_size, eos_id, dtype, seed, val_fraction,
    source, splits: {train|val: {documents, tokens, shards: [{file, bytes, tokens, documents,
    sha256}]}}

`tokens` counts document tokens only; the loader appends one `<|endoftext|>` after each document.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from v4train.data.errors import DataError
from v4train.data.permute import keyed_permutation

__all__ = [
    "FORMAT_VERSION", "MANIFEST", "split_train_val", "token_dtype", "write_manifest", "write_split",
]

FORMAT_VERSION = 1
MANIFEST = "dataset.json"
_MIN_VAL_UNITS = 64
_SPLIT_SALT = 1
_VAL_ORDER_SALT = 2
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n\s*")


def split_train_val(documents: list[str], val_fraction: float,
                    seed: int) -> tuple[list[str], list[str]]:
    """Split documents into (train, val) texts as described in the module docstring.

    Raises:
        ValueError: `val_fraction` outside (0, 1).
        DataError: the corpus cannot be cut into at least one unit per split.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction}: must be in (0, 1)")
    total_chars = sum(len(d) for d in documents)
    if len(documents) * val_fraction >= _MIN_VAL_UNITS:
        pieces = [[d] for d in documents]
    else:
        piece_chars = total_chars * val_fraction / _MIN_VAL_UNITS
        pieces = [_paragraph_pieces(d, piece_chars) for d in documents]
    lengths = np.array([len(p) for doc in pieces for p in doc], dtype=np.int64)
    is_val = _choose_val(lengths, val_fraction * total_chars, seed)
    if is_val.all() or not is_val.any():
        raise DataError(f"inputs: {len(lengths)} document/paragraph unit(s) cannot be split into "
                        f"train and val at val_fraction={val_fraction}; add more text")
    train, val = _join_runs(pieces, is_val)
    val = [val[i] for i in keyed_permutation(len(val), seed, _VAL_ORDER_SALT)]
    return train, val


def _choose_val(lengths: np.ndarray, target_chars: float, seed: int) -> np.ndarray:
    """Mark units `[n]` for validation in seeded order until they hold `target_chars`."""
    is_val = np.zeros(len(lengths), dtype=bool)
    taken = 0
    for unit in keyed_permutation(len(lengths), seed, _SPLIT_SALT):
        if taken >= target_chars:
            break
        is_val[unit] = True
        taken += lengths[unit]
    return is_val


def _join_runs(pieces: list[list[str]], is_val: np.ndarray) -> tuple[list[str], list[str]]:
    """Join each document's consecutive same-split pieces; returns (train, val) in corpus order."""
    train, val = [], []
    unit = 0
    for doc in pieces:
        flags = is_val[unit:unit + len(doc)]
        unit += len(doc)
        start = 0
        for end in range(1, len(doc) + 1):
            if end == len(doc) or flags[end] != flags[start]:
                (val if flags[start] else train).append("".join(doc[start:end]))
                start = end
    return train, val


def _paragraph_pieces(text: str, piece_chars: float) -> list[str]:
    """Cut `text` after paragraph breaks into pieces of at least `piece_chars` characters (the
    last may be shorter); `"".join(pieces) == text`. Text without breaks stays one piece."""
    pieces, start = [], 0
    for brk in _PARAGRAPH_BREAK.finditer(text):
        if brk.end() - start >= piece_chars and brk.end() < len(text):
            pieces.append(text[start:brk.end()])
            start = brk.end()
    pieces.append(text[start:])
    return pieces


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65535), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


def write_split(out_dir: Path, split: str, documents: list[np.ndarray],
                shard_tokens: int) -> dict:
    """Write `documents` (1-D token arrays `[n_tokens]`, one dtype) as `{split}-NNNNN.parquet`.

    Returns:
        the split's manifest entry: {documents, tokens, shards: [{file, bytes, tokens,
        documents, sha256}]}.
    """
    shards, group, group_tokens = [], [], 0
    for doc in documents:
        group.append(doc)
        group_tokens += len(doc)
        if group_tokens >= shard_tokens:
            shards.append(_write_shard(out_dir / f"{split}-{len(shards):05d}.parquet", group))
            group, group_tokens = [], 0
    if group:
        shards.append(_write_shard(out_dir / f"{split}-{len(shards):05d}.parquet", group))
    return {
        "documents": len(documents),
        "tokens": sum(s["tokens"] for s in shards),
        "shards": shards,
    }


def _write_shard(path: Path, documents: list[np.ndarray]) -> dict:
    offsets = np.zeros(len(documents) + 1, dtype=np.int64)
    np.cumsum([len(d) for d in documents], out=offsets[1:])
    if offsets[-1] >= 2**31:  # list<> offsets are int32
        raise DataError(f"{path}: {offsets[-1]} tokens in one shard; lower shard_tokens")
    tokens = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)),
                                      pa.array(np.concatenate(documents)))
    pq.write_table(pa.table({"tokens": tokens}), path, compression="zstd")
    data = path.read_bytes()
    return {
        "file": path.name,
        "bytes": len(data),
        "tokens": int(offsets[-1]),
        "documents": len(documents),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def write_manifest(out_dir: Path, manifest: dict) -> None:
    """Write `dataset.json` atomically (temporary file, then rename), after every shard."""
    tmp = out_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir / MANIFEST)
