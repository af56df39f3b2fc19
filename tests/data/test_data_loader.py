"""TokenDataset verification and GlobalBatchLoader / eval_batches stream semantics.

Datasets here are written straight from known token arrays (no tokenizer), so document
boundaries and contents are known exactly; expected batches come from a plain-Python reference
of the stream described in data/loader.py.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

import v4train.data.loader as loader_module
from v4train.data.errors import DataError
from v4train.data.loader import GlobalBatchLoader, TokenDataset, eval_batches
from v4train.data.permute import _splitmix64, keyed_permutation
from v4train.data.shards import FORMAT_VERSION, write_manifest, write_split

EOS = 0
VOCAB = 1000


def make_dataset(root, train_docs, val_docs=None, shard_tokens=50):
    """Write a dataset whose documents are the given uint16 arrays; returns its directory."""
    root.mkdir(parents=True, exist_ok=True)
    val_docs = val_docs if val_docs is not None else [np.array([7, 8, 9], dtype=np.uint16)]
    write_manifest(root, {
        "format_version": FORMAT_VERSION, "tokenizer": "tokenizer.json", "vocab_size": VOCAB,
        "eos_id": EOS, "dtype": "uint16", "seed": 0, "val_fraction": 0.05, "source": "test",
        "splits": {"train": write_split(root, "train", train_docs, shard_tokens),
                   "val": write_split(root, "val", val_docs, shard_tokens)},
    })
    return root


def docs_of(lengths, first_token=1):
    """Document i is `lengths[i]` tokens, all distinct from EOS, its tokens start at a unique
    value so windows can be traced back to their document."""
    docs, token = [], first_token
    for n in lengths:
        docs.append((np.arange(n) + token) % (VOCAB - 1) + 1)
        token += n
    return [d.astype(np.uint16) for d in docs]


LENGTHS = [5, 17, 3, 40, 11, 1, 29, 8, 23, 2, 13, 31]  # 183 tokens + 12 separators per epoch


@pytest.fixture
def data_dir(tmp_path):
    return make_dataset(tmp_path / "ds", docs_of(LENGTHS), docs_of([9, 30, 4, 21], 500))


def reference_epoch(docs, seed, epoch):
    order = keyed_permutation(len(docs), seed, epoch)
    stream = []
    for i in order:
        stream += docs[i].tolist() + [EOS]
    return stream


def reference_batches(docs, seed, steps, global_batch, seq_len):
    """Plain-Python global stream: (input rows, label rows, position rows, sample ids) per step."""
    epoch, cursor, sample, out = 0, 0, 0, []
    stream = reference_epoch(docs, seed, epoch)
    for _ in range(steps):
        if cursor + global_batch * seq_len + 1 > len(stream):
            epoch, cursor = epoch + 1, 0
            stream = reference_epoch(docs, seed, epoch)
        inputs, labels, positions = [], [], []
        for i in range(global_batch):
            window = stream[cursor + i * seq_len: cursor + i * seq_len + seq_len + 1]
            inputs.append(window[:-1])
            labels.append(window[1:])
            pos, row = 0, []
            for token in window[:-1]:
                row.append(pos)
                pos = 0 if token == EOS else pos + 1  # the token after a separator starts a doc
            positions.append(row)
        out.append((inputs, labels, positions, list(range(sample, sample + global_batch))))
        cursor += global_batch * seq_len
        sample += global_batch
    return out


def test_keyed_permutation_matches_plain_python_splitmix64():
    mask = 2**64 - 1

    def splitmix(x):
        z = (x + 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    # Published splitmix64 test vector: first output for seed 1234567.
    assert _splitmix64(np.array([1234567], dtype=np.uint64))[0] == 6457827717110365317
    for seed, epoch in [(0, 0), (3, 1), (2**63 + 5, 17)]:
        state = splitmix(splitmix(0 ^ seed) ^ epoch)
        expected = sorted(range(50), key=lambda i: (splitmix(state ^ i), i))
        assert keyed_permutation(50, seed, epoch).tolist() == expected
    assert keyed_permutation(10, 0, 0).tolist() == [0, 9, 1, 6, 3, 5, 4, 2, 8, 7]


def test_open_exposes_counts_and_documents(data_dir):
    ds = TokenDataset.open(data_dir, "train")
    assert (ds.vocab_size, ds.eos_id) == (VOCAB, EOS)
    assert (ds.num_documents, ds.num_tokens, ds.tokens_per_epoch) == (12, 183, 195)
    for i, doc in enumerate(docs_of(LENGTHS)):
        np.testing.assert_array_equal(ds.tokens[ds.doc_offsets[i]:ds.doc_offsets[i + 1]], doc)
    assert len(json.loads((data_dir / "dataset.json").read_text())["splits"]["train"]["shards"]) > 1


# (4, 10): 195 tokens per epoch, 41 needed per batch, 4 batches per epoch, 35 tokens dropped.
# (3, 13): 4 batches use 156 tokens; the 39 left equal G*S exactly, but the last label needs one
# more token, so the fifth batch opens the next epoch.
@pytest.mark.parametrize("global_batch,seq_len,final_offset", [(4, 10, 160), (3, 13, 156)])
def test_batches_match_reference_stream_across_epochs(data_dir, global_batch, seq_len,
                                                      final_offset):
    docs = docs_of(LENGTHS)
    loader = GlobalBatchLoader(TokenDataset.open(data_dir, "train"), seed=3)
    expected = reference_batches(docs, 3, steps=12, global_batch=global_batch, seq_len=seq_len)
    for inputs, labels, positions, samples in expected:
        batch = loader.next_batch(global_batch, seq_len, dp_rank=0, dp_size=1)
        assert batch.input_ids.dtype == np.int64
        assert batch.input_ids.shape == (global_batch, seq_len)
        assert batch.input_ids.tolist() == inputs
        assert batch.labels.tolist() == labels
        assert batch.position_ids.tolist() == positions
        assert batch.sample_ids.tolist() == samples
    assert loader.state_dict() == {
        "seed": 3, "epoch": 2, "epoch_offset_tokens": final_offset,
        "consumed_samples": 12 * global_batch, "consumed_tokens": 12 * global_batch * seq_len}


def test_position_ids_restart_at_known_document_starts(tmp_path):
    docs = docs_of([6, 3, 9, 4])
    ds = TokenDataset.open(make_dataset(tmp_path / "ds", docs), "train")
    loader = GlobalBatchLoader(ds, seed=0)
    batch = loader.next_batch(1, 25, 0, 1)  # the whole 26-token epoch in one window
    order = keyed_permutation(4, 0, 0)
    expected = np.concatenate([np.arange(len(docs[i]) + 1) for i in order])[:25]
    np.testing.assert_array_equal(batch.position_ids[0], expected)
    starts = np.cumsum([0] + [len(docs[i]) + 1 for i in order])[:4]
    assert batch.position_ids[0][starts].tolist() == [0, 0, 0, 0]
    for k, i in enumerate(order):  # each document's first token sits at its start
        assert batch.input_ids[0][starts[k]] == docs[i][0]


def test_same_state_gives_identical_batches(data_dir):
    ds = TokenDataset.open(data_dir, "train")
    a, b = GlobalBatchLoader(ds, seed=1), GlobalBatchLoader(ds, seed=1)
    for _ in range(3):
        a.next_batch(2, 7, 0, 1)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for _ in range(10):
        x, y = a.next_batch(2, 7, 0, 1), b.next_batch(2, 7, 0, 1)
        for field in ("input_ids", "labels", "position_ids", "sample_ids"):
            np.testing.assert_array_equal(getattr(x, field), getattr(y, field))
    assert GlobalBatchLoader(ds, seed=2).next_batch(2, 7, 0, 1).input_ids.tolist() != \
        GlobalBatchLoader(ds, seed=1).next_batch(2, 7, 0, 1).input_ids.tolist()


@pytest.mark.parametrize("stop", [2, 4, 5, 9])  # mid-epoch, at the boundary, just after it
def test_resume_continues_exactly(data_dir, stop):
    ds = TokenDataset.open(data_dir, "train")
    full = GlobalBatchLoader(ds, seed=5)
    straight = [full.next_batch(4, 10, 0, 1) for _ in range(12)]
    first = GlobalBatchLoader(ds, seed=5)
    resumed = [first.next_batch(4, 10, 0, 1) for _ in range(stop)]
    state = json.loads(json.dumps(first.state_dict()))
    second = GlobalBatchLoader(ds, seed=99)  # the saved seed wins
    second.load_state_dict(state)
    resumed += [second.next_batch(4, 10, 0, 1) for _ in range(12 - stop)]
    ids = np.concatenate([b.sample_ids for b in resumed])
    np.testing.assert_array_equal(ids, np.arange(48))  # no repeats, no skips
    for x, y in zip(straight, resumed):
        np.testing.assert_array_equal(x.input_ids, y.input_ids)
        np.testing.assert_array_equal(x.position_ids, y.position_ids)
    assert second.state_dict() == full.state_dict()
    assert full.state_dict()["epoch"] == 2


@pytest.mark.parametrize("dp_size", [2, 4])
def test_dp_slices_concatenate_to_the_global_batch(data_dir, dp_size):
    ds = TokenDataset.open(data_dir, "train")
    single = GlobalBatchLoader(ds, seed=0)
    ranks = [GlobalBatchLoader(ds, seed=0) for _ in range(dp_size)]
    for _ in range(17):  # 8 batches per epoch: crosses two epoch boundaries
        whole = single.next_batch(8, 3, 0, 1)
        parts = [loader.next_batch(8, 3, r, dp_size) for r, loader in enumerate(ranks)]
        for field in ("input_ids", "labels", "position_ids", "sample_ids"):
            np.testing.assert_array_equal(
                np.concatenate([getattr(p, field) for p in parts]), getattr(whole, field))
    assert all(loader.state_dict() == single.state_dict() for loader in ranks)


def test_layout_and_size_errors(data_dir):
    loader = GlobalBatchLoader(TokenDataset.open(data_dir, "train"), seed=0)
    with pytest.raises(ValueError, match="global_batch=6: not divisible by dp_size=4"):
        loader.next_batch(6, 4, 0, 4)
    with pytest.raises(ValueError, match="dp_rank=2"):
        loader.next_batch(4, 4, 2, 2)
    with pytest.raises(DataError, match="needs 201"):
        loader.next_batch(20, 10, 0, 1)  # 201 tokens > 195 per epoch
    with pytest.raises(DataError, match="'epoch' is -1"):
        loader.load_state_dict({**loader.state_dict(), "epoch": -1})
    with pytest.raises(DataError, match="belongs to another dataset"):
        loader.load_state_dict({**loader.state_dict(), "epoch_offset_tokens": 10**6})
    assert loader.state_dict()["consumed_samples"] == 0  # failed calls moved nothing


def test_eval_batches_read_val_from_its_start(data_dir):
    val = TokenDataset.open(data_dir, "val")
    docs = docs_of([9, 30, 4, 21], 500)
    stream = [t for d in docs for t in d.tolist() + [EOS]]  # stored order, no shuffle
    whole = eval_batches(val, num_batches=3, batch=4, seq_len=5, dp_rank=0, dp_size=1)
    assert len(whole) == 3
    for k, batch in enumerate(whole):
        for i in range(4):
            start = (k * 4 + i) * 5
            assert batch.input_ids[i].tolist() == stream[start:start + 5]
            assert batch.labels[i].tolist() == stream[start + 1:start + 6]
        assert batch.sample_ids.tolist() == list(range(4 * k, 4 * k + 4))
    halves = [eval_batches(val, 3, 4, 5, r, 2) for r in range(2)]
    for k in range(3):
        np.testing.assert_array_equal(
            np.concatenate([halves[0][k].position_ids, halves[1][k].position_ids]),
            whole[k].position_ids)
    with pytest.raises(DataError, match="lower the eval batch count"):
        eval_batches(val, 10, 4, 5, 0, 1)  # needs 201 of 68 tokens


def test_missing_directory_manifest_and_split(tmp_path, data_dir):
    with pytest.raises(DataError, match="nowhere: dataset directory not found"):
        TokenDataset.open(tmp_path / "nowhere", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty/dataset\.json: not found"):
        TokenDataset.open(tmp_path / "empty", "train")
    with pytest.raises(DataError, match="no split 'test'"):
        TokenDataset.open(data_dir, "test")


def test_corrupt_truncated_or_missing_shard_is_refused(data_dir):
    shard = data_dir / "train-00001.parquet"
    original = shard.read_bytes()
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0x01
    shard.write_bytes(bytes(flipped))
    with pytest.raises(DataError, match=r"train-00001\.parquet: sha256 .* the shard is corrupt"):
        TokenDataset.open(data_dir, "train")
    shard.write_bytes(original[:-1])
    with pytest.raises(DataError, match=r"train-00001\.parquet: \d+ bytes, dataset\.json says"):
        TokenDataset.open(data_dir, "train")
    shard.unlink()
    with pytest.raises(DataError, match=r"train-00001\.parquet: shard listed in dataset\.json "
                                        "is missing"):
        TokenDataset.open(data_dir, "train")
    TokenDataset.open(data_dir, "val")  # the other split is intact and still opens


def test_four_ranks_300_steps_on_13m_tokens_build_each_epoch_once(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    lengths = rng.integers(50, 1250, size=2000)  # about 1.3 M tokens, 2000 documents
    docs = [rng.integers(1, VOCAB, size=n, dtype=np.uint16) for n in lengths]
    ds_dir = make_dataset(tmp_path / "big", docs, shard_tokens=400_000)
    builds = []
    build = loader_module._build_stream
    monkeypatch.setattr(loader_module, "_build_stream",
                        lambda ds, order: builds.append(len(order)) or build(ds, order))
    start = time.perf_counter()
    loaders = [GlobalBatchLoader(TokenDataset.open(ds_dir, "train"), seed=0) for _ in range(4)]
    for _ in range(300):
        parts = [loader.next_batch(16, 256, r, 4) for r, loader in enumerate(loaders)]
    elapsed = time.perf_counter() - start
    np.testing.assert_array_equal(np.concatenate([p.sample_ids for p in parts]),
                                  np.arange(299 * 16, 300 * 16))
    assert loaders[0].state_dict()["epoch"] == 0
    assert builds == [2000] * 4  # one epoch stream per loader, reused by all 300 steps
    # About 0.2 s measured on 2 CPU cores (shard verification included); a generous bound.
    assert elapsed < 4.0, f"{elapsed:.2f} s"


def test_a_token_outside_the_vocabulary_is_named_by_row_and_position(tmp_path):
    docs = docs_of(LENGTHS)
    docs[3][7] = VOCAB + 4  # the fourth document of the first shard, its eighth token
    docs[8][0] = VOCAB  # a later one: the first is named
    root = make_dataset(tmp_path / "ds", docs, shard_tokens=1000)
    with pytest.raises(DataError, match=rf"train-00000\.parquet: token id {VOCAB + 4} >= vocab_size {VOCAB} "
                                        r"\(row 3, token 7; the shard's first such token\)"):
        TokenDataset.open(root, "train")


def test_manifest_disagreeing_with_shard_contents_is_refused(data_dir):
    manifest_path = data_dir / "dataset.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["vocab_size"] = 100  # the train shards hold ids up to 183
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"train-00001\.parquet: token id \d+ >= vocab_size 100"):
        TokenDataset.open(data_dir, "train")
    manifest["vocab_size"] = VOCAB
    manifest["splits"]["val"]["shards"][0]["documents"] = 5
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"val-00000\.parquet: 4 documents / 64 tokens, "
                                        r"dataset\.json says 5 / 64"):
        TokenDataset.open(data_dir, "val")
