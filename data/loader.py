"""Verified token datasets and the deterministic global-cursor batch loader.

The global stream
-----------------
Epoch `e` of a split is its documents in the order `keyed_permutation(n_documents, seed, e)`,
each followed by `<|endoftext|>`, concatenated: `tokens_per_epoch = num_tokens + num_documents`
tokens. A global batch of G samples at sequence length S reads G consecutive windows of S + 1
tokens with stride S from the cursor `epoch_offset_tokens` (window i starts at cursor + i*S;
`input_ids = window[:-1]`, `labels = window[1:]`), then the cursor advances by G*S. When fewer
than G*S + 1 tokens remain in the epoch, the rest is skipped and the batch starts at token 0 of
the next epoch. So (seed, epoch, epoch_offset_tokens) alone fix every later batch, whatever the
data-parallel layout: DP rank r of D takes samples r*G/D .. (r+1)*G/D - 1 of the same global
batch, and a run resumed from `state_dict()` on another layout continues the same stream.

`position_ids` count from 0 at the start of each window and restart at 0 on the token after
every `<|endoftext|>` (a document start), so a model that masks attention by position (key j is
visible to query t iff pos[t] - pos[j] == t - j) never attends across documents. The separator
belongs to the document it ends; its label is the next document's first token.

Shape letters: b = samples on this DP rank (global_batch // dp_size), S = sequence length.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from v4train.data.errors import DataError
from v4train.data.permute import keyed_permutation
from v4train.data.shards import FORMAT_VERSION, MANIFEST

__all__ = ["Batch", "GlobalBatchLoader", "TokenDataset", "eval_batches"]

_STATE_KEYS = ("seed", "epoch", "epoch_offset_tokens", "consumed_samples", "consumed_tokens")


@dataclass(frozen=True)
class Batch:
    """One DP rank's slice of a global batch; every array is int64.

    Attributes:
        input_ids: `[b, S]` token ids.
        labels: `[b, S]` next-token ids (`input_ids` shifted left by one within the window).
        position_ids: `[b, S]` positions, 0 at window start and at each document start.
        sample_ids: `[b]` global sample indices (consumed_samples before the batch + slot).
    """

    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray
    sample_ids: np.ndarray


class TokenDataset:
    """One split of a prepared dataset, verified and held in memory as a flat token array.

    Attributes:
        tokens: `[num_tokens]` uint16/uint32, every document's tokens back to back (no separators).
        doc_offsets: `[num_documents + 1]` int64; document i is
            `tokens[doc_offsets[i]:doc_offsets[i + 1]]`.
        vocab_size, eos_id: from `dataset.json`.
        name: `"<data_dir>:<split>"`, used in error messages.
    """

    def __init__(self, *, name: str, tokens: np.ndarray, doc_offsets: np.ndarray,
                 vocab_size: int, eos_id: int) -> None:
        self.name = name
        self.tokens = tokens
        self.doc_offsets = doc_offsets
        self.vocab_size = vocab_size
        self.eos_id = eos_id

    @property
    def num_tokens(self) -> int:
        """Document tokens in the split, separators excluded (as `dataset.json` counts them)."""
        return len(self.tokens)

    @property
    def num_documents(self) -> int:
        return len(self.doc_offsets) - 1

    @property
    def tokens_per_epoch(self) -> int:
        """Length of one epoch of the stream: every document plus its `<|endoftext|>`."""
        return self.num_tokens + self.num_documents

    @classmethod
    def open(cls, data_dir: str | Path, split: str) -> TokenDataset:
        """Load `split` ("train" or "val") of the dataset in `data_dir` after verifying every shard.

        Each shard's byte size and sha256 must match `dataset.json` and its rows and tokens the
        recorded counts, before any of it is used: a bad shard fails the whole open.

        Raises:
            DataError: naming the directory, `dataset.json` or the shard file when the directory
                or manifest is missing or malformed, the split is unknown, or a shard is missing,
                has the wrong size, checksum, schema or counts, or holds ids >= vocab_size (the first
                one named by row and position).
        """
        data_dir = Path(data_dir)
        if not data_dir.is_dir():
            raise DataError(f"{data_dir}: dataset directory not found; run `v4train prepare-data`")
        manifest = _read_manifest(data_dir / MANIFEST)
        splits = _field(manifest, "splits", data_dir / MANIFEST)
        if split not in splits:
            raise DataError(f"{data_dir / MANIFEST}: no split {split!r} (has {', '.join(splits)})")
        vocab_size = int(_field(manifest, "vocab_size", data_dir / MANIFEST))
        dtype = np.dtype(_field(manifest, "dtype", data_dir / MANIFEST))
        tokens, lengths = [], []
        for entry in _field(splits[split], "shards", data_dir / MANIFEST):
            values, doc_lengths = _read_shard(data_dir, entry, dtype, vocab_size)
            tokens.append(values)
            lengths.append(doc_lengths)
        if not tokens:
            raise DataError(f"{data_dir / MANIFEST}: split {split!r} has no shards")
        doc_offsets = np.zeros(sum(len(x) for x in lengths) + 1, dtype=np.int64)
        np.cumsum(np.concatenate(lengths), out=doc_offsets[1:])
        return cls(name=f"{data_dir}:{split}", tokens=np.concatenate(tokens),
                   doc_offsets=doc_offsets, vocab_size=vocab_size,
                   eos_id=int(_field(manifest, "eos_id", data_dir / MANIFEST)))


def _read_manifest(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: not found; run `v4train prepare-data` to create the dataset")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    version = _field(manifest, "format_version", path)
    if version != FORMAT_VERSION:
        raise DataError(f"{path}: format_version {version}, this loader reads {FORMAT_VERSION}")
    return manifest


def _field(record: dict, key: str, where: Path):
    if not isinstance(record, dict) or key not in record:
        raise DataError(f"{where}: missing field {key!r}")
    return record[key]


def _read_shard(data_dir: Path, entry: dict, dtype: np.dtype,
                vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Verify one shard and return (flat tokens `[n]`, document lengths `[docs]` int64)."""
    manifest = data_dir / MANIFEST
    name = _field(entry, "file", manifest)
    if Path(name).name != name:  # a manifest must not point outside its directory
        raise DataError(f"{manifest}: shard name {name!r} is not a plain file name")
    path = data_dir / name
    if not path.is_file():
        raise DataError(f"{path}: shard listed in {MANIFEST} is missing")
    # Hash and parse the same bytes, so what is verified is exactly what is used.
    data = path.read_bytes()
    if len(data) != _field(entry, "bytes", manifest):
        raise DataError(f"{path}: {len(data)} bytes, {MANIFEST} says {entry['bytes']}; "
                        "the shard is truncated or was rewritten")
    digest = hashlib.sha256(data).hexdigest()
    if digest != _field(entry, "sha256", manifest):
        raise DataError(f"{path}: sha256 {digest} differs from {MANIFEST}; the shard is corrupt")
    try:
        table = pq.read_table(pa.BufferReader(data))
    except pa.ArrowException as exc:  # a damaged file whose manifest entry was rewritten to match it
        raise DataError(f"{path}: not a readable Parquet file ({str(exc).strip().splitlines()[0]})") from None
    if table.schema.names != ["tokens"] or table.schema.field("tokens").type != pa.list_(
            pa.from_numpy_dtype(dtype)):
        raise DataError(f"{path}: schema {table.schema} is not tokens: list<{dtype}>")
    column = table.column("tokens").combine_chunks()
    values = column.flatten().to_numpy()
    lengths = np.diff(column.offsets.to_numpy()).astype(np.int64)
    if len(lengths) != entry.get("documents") or len(values) != entry.get("tokens"):
        raise DataError(f"{path}: {len(lengths)} documents / {len(values)} tokens, "
                        f"{MANIFEST} says {entry.get('documents')} / {entry.get('tokens')}")
    if len(values) and int(values.max()) >= vocab_size:
        first = int(np.argmax(values >= vocab_size))
        ends = np.cumsum(lengths)
        row = int(np.searchsorted(ends, first, side="right"))
        raise DataError(f"{path}: token id {int(values[first])} >= vocab_size {vocab_size} (row {row}, token "
                        f"{first - int(ends[row] - lengths[row])}; the shard's first such token)")
    return values, lengths


def _build_stream(dataset: TokenDataset, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Documents in `order`, each followed by EOS.

    Returns:
        (stream `[tokens_per_epoch]` in the dataset's dtype, document starts `[n_documents]`
        int64 offsets into the stream, increasing).
    """
    lengths = np.diff(dataset.doc_offsets)[order]
    starts = np.zeros(len(order) + 1, dtype=np.int64)
    np.cumsum(lengths + 1, out=starts[1:])
    stream = np.empty(starts[-1], dtype=dataset.tokens.dtype)
    stream[starts[1:] - 1] = dataset.eos_id
    for dst, src, n in zip(starts[:-1].tolist(), dataset.doc_offsets[order].tolist(),
                           lengths.tolist()):
        stream[dst:dst + n] = dataset.tokens[src:src + n]
    return stream, starts[:-1]


def _windows(stream: np.ndarray, doc_starts: np.ndarray, start: int, count: int,
             seq_len: int, sample_ids: np.ndarray) -> Batch:
    """`count` windows of seq_len + 1 tokens with stride seq_len from stream offset `start`."""
    index = start + seq_len * np.arange(count)[:, None] + np.arange(seq_len + 1)[None, :]
    window = stream[index].astype(np.int64)
    inputs = index[:, :-1]
    # Start of the document holding each input token, but never before the window's own start.
    doc_start = doc_starts[np.searchsorted(doc_starts, inputs, side="right") - 1]
    position_ids = inputs - np.maximum(doc_start, inputs[:, :1])
    return Batch(input_ids=window[:, :-1], labels=window[:, 1:], position_ids=position_ids,
                 sample_ids=sample_ids.astype(np.int64))


def _check_layout(global_batch: int, seq_len: int, dp_rank: int, dp_size: int) -> int:
    """Validate the batch layout; returns b = global_batch // dp_size."""
    if global_batch < 1 or seq_len < 1:
        raise ValueError(f"global_batch={global_batch}, seq_len={seq_len}: both must be >= 1")
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank}, dp_size={dp_size}: need 0 <= dp_rank < dp_size")
    if global_batch % dp_size:
        raise ValueError(f"global_batch={global_batch}: not divisible by dp_size={dp_size}")
    return global_batch // dp_size


class GlobalBatchLoader:
    """Deterministic global stream over a `TokenDataset` (see the module docstring).

    Every rank holds one and calls `next_batch` for every step with the same global_batch and
    seq_len, so all cursors move in lock-step; each epoch's stream is built once and cached.
    """

    def __init__(self, dataset: TokenDataset, seed: int) -> None:
        """Raises ValueError when `seed` is not an int in [0, 2**64)."""
        if not isinstance(seed, int) or not 0 <= seed < 2**64:
            raise ValueError(f"seed={seed!r}: must be an int in [0, 2**64)")
        self.dataset = dataset
        self._state = {"seed": seed, "epoch": 0, "epoch_offset_tokens": 0,
                       "consumed_samples": 0, "consumed_tokens": 0}
        # (seed, epoch, stream, document starts) of the epoch last read.
        self._cache: tuple[int, int, np.ndarray, np.ndarray] | None = None

    def next_batch(self, global_batch: int, seq_len: int, dp_rank: int, dp_size: int) -> Batch:
        """Return this DP rank's slice of the next global batch and advance the cursor.

        Returns:
            Batch with `[b, S]` input_ids/labels/position_ids and `[b]` sample_ids,
            b = global_batch // dp_size, S = seq_len.

        Raises:
            ValueError: naming the bad argument (sizes < 1, dp_rank out of range, global_batch
                not divisible by dp_size).
            DataError: one epoch holds fewer than global_batch * seq_len + 1 tokens.
        """
        b = _check_layout(global_batch, seq_len, dp_rank, dp_size)
        need = global_batch * seq_len + 1
        if need > self.dataset.tokens_per_epoch:
            raise DataError(f"{self.dataset.name}: one epoch has {self.dataset.tokens_per_epoch} "
                            f"tokens, a global batch of {global_batch} x {seq_len} needs {need}")
        state = self._state
        if state["epoch_offset_tokens"] + need > self.dataset.tokens_per_epoch:
            state["epoch"] += 1
            state["epoch_offset_tokens"] = 0
        stream, doc_starts = self._epoch_stream()
        first = dp_rank * b
        batch = _windows(stream, doc_starts, state["epoch_offset_tokens"] + first * seq_len, b,
                         seq_len, state["consumed_samples"] + first + np.arange(b))
        state["epoch_offset_tokens"] += global_batch * seq_len
        state["consumed_samples"] += global_batch
        state["consumed_tokens"] += global_batch * seq_len
        return batch

    def _epoch_stream(self) -> tuple[np.ndarray, np.ndarray]:
        seed, epoch = self._state["seed"], self._state["epoch"]
        if self._cache is None or self._cache[:2] != (seed, epoch):
            order = keyed_permutation(self.dataset.num_documents, seed, epoch)
            self._cache = (seed, epoch, *_build_stream(self.dataset, order))
        return self._cache[2], self._cache[3]

    def state_dict(self) -> dict:
        """JSON-serialisable cursor: seed, epoch, epoch_offset_tokens, consumed_samples,
        consumed_tokens (all ints)."""
        return dict(self._state)

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (its seed replaces the constructor's: the stream is the one saved).

        Raises:
            DataError: a key is missing or not a non-negative int, or the cursor lies beyond
                this dataset's epoch (the state belongs to other data).
        """
        for key in _STATE_KEYS:
            value = state.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise DataError(f"loader state: {key!r} is {value!r}, expected an int >= 0")
        if state["epoch_offset_tokens"] > self.dataset.tokens_per_epoch:
            raise DataError(f"loader state: epoch_offset_tokens {state['epoch_offset_tokens']} is "
                            f"beyond {self.dataset.name}'s {self.dataset.tokens_per_epoch}-token "
                            "epoch; the state belongs to another dataset")
        self._state = {key: state[key] for key in _STATE_KEYS}


def eval_batches(dataset: TokenDataset, num_batches: int, batch: int, seq_len: int,
                 dp_rank: int, dp_size: int) -> list[Batch]:
    """Deterministic evaluation batches from the start of `dataset` (the val split).

    The stream is the documents in stored order (already shuffled at prepare time), each followed
    by EOS; batch k holds the global samples k*batch .. (k+1)*batch - 1, windows laid out as in
    `GlobalBatchLoader`, and this DP rank gets its contiguous slice, so every layout evaluates
    the same tokens.

    Returns:
        `num_batches` Batch objects of b = batch // dp_size samples of `[b, seq_len]`.

    Raises:
        ValueError: bad layout arguments (as `GlobalBatchLoader.next_batch`).
        DataError: the split holds fewer than num_batches * batch * seq_len + 1 tokens.
    """
    b = _check_layout(batch, seq_len, dp_rank, dp_size)
    need = num_batches * batch * seq_len + 1
    if need > dataset.tokens_per_epoch:
        raise DataError(f"{dataset.name}: {dataset.tokens_per_epoch} tokens, {num_batches} eval "
                        f"batches of {batch} x {seq_len} need {need}; lower the eval batch count")
    stream, doc_starts = _build_stream(dataset, np.arange(dataset.num_documents))
    first = dp_rank * b
    return [
        _windows(stream, doc_starts, (k * batch + first) * seq_len, b, seq_len,
                 k * batch + first + np.arange(b))
        for k in range(num_batches)
    ]
