"""prepare_dataset end to end on small synthetic corpora: manifest, shards, split, CLI."""

from __future__ import annotations

import argparse
import hashlib
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from v4train.data.errors import DataError
from v4train.data.loader import TokenDataset
from v4train.data.prepare import add_cli_arguments, prepare_dataset, run_cli
from v4train.data.shards import _paragraph_pieces, split_train_val, token_dtype, write_manifest, write_split
from v4train.data.tokenizer import load_tokenizer, train_tokenizer

WORDS = "thou art more lovely and temperate rough winds do shake the darling buds of may".split()


def corpus(n_docs, paragraphs):
    """Documents of numbered paragraphs `[d.p]`; every paragraph's tag occurs once in the corpus."""
    rng = np.random.default_rng(n_docs)
    return [
        "\n\n".join(f"[{d}.{p}] " + " ".join(rng.choice(WORDS, size=rng.integers(5, 40)))
                    for p in range(paragraphs)) + "\n"
        for d in range(n_docs)
    ]


def write_inputs(tmp_path, docs):
    paths = []
    for i, doc in enumerate(docs):
        paths.append(tmp_path / f"doc{i:03d}.txt")
        paths[-1].write_text(doc, encoding="utf-8")
    return paths


def decoded_split(out_dir, split):
    ds = TokenDataset.open(out_dir, split)
    tok = load_tokenizer(out_dir / "tokenizer.json")
    return [tok.decode(ds.tokens[a:b].tolist())
            for a, b in zip(ds.doc_offsets[:-1], ds.doc_offsets[1:])]


@pytest.fixture(scope="module")
def few_docs(tmp_path_factory):
    """4 documents of 150 paragraphs: few enough that documents are cut into pieces."""
    root = tmp_path_factory.mktemp("few")
    docs = corpus(4, 150)
    manifest = prepare_dataset(root / "out", inputs=write_inputs(root, docs), vocab_size=400,
                               shard_tokens=6000, seed=0)
    return docs, root / "out", manifest


def test_manifest_records_every_shard_with_size_and_sha256(few_docs):
    _, out, manifest = few_docs
    assert json.loads((out / "dataset.json").read_text()) == manifest
    assert {k: manifest[k] for k in ("format_version", "tokenizer", "vocab_size", "eos_id",
                                     "dtype")} == {"format_version": 1,
                                                   "tokenizer": "tokenizer.json",
                                                   "vocab_size": 400, "eos_id": 0,
                                                   "dtype": "uint16"}
    files = sorted(p.name for p in out.iterdir())
    listed = [s["file"] for split in ("train", "val") for s in manifest["splits"][split]["shards"]]
    assert files == sorted(listed + ["dataset.json", "tokenizer.json"])
    assert len(manifest["splits"]["train"]["shards"]) > 2
    for name, split in manifest["splits"].items():
        shards = split["shards"]
        assert split["tokens"] == sum(s["tokens"] for s in shards)
        assert split["documents"] == sum(s["documents"] for s in shards)
        for i, shard in enumerate(shards):
            data = (out / shard["file"]).read_bytes()
            assert shard["file"] == f"{name}-{i:05d}.parquet"
            assert shard["bytes"] == len(data)
            assert shard["sha256"] == hashlib.sha256(data).hexdigest()
            table = pq.read_table(out / shard["file"])
            assert table.schema.field("tokens").type == pa.list_(pa.uint16())
            assert table.num_rows == shard["documents"]
            if i < len(shards) - 1:  # a shard closes once it reaches shard_tokens
                assert shard["tokens"] >= 6000


def test_val_split_is_disjoint_complete_and_paragraph_aligned(few_docs):
    docs, out, manifest = few_docs
    train, val = decoded_split(out, "train"), decoded_split(out, "val")

    def tags(texts):
        return [t for text in texts for t in re.findall(r"\[\d+\.\d+\]", text)]

    assert set(tags(train)).isdisjoint(tags(val))
    assert sorted(tags(train) + tags(val)) == sorted(tags(docs))  # each paragraph exactly once
    # Every piece is a paragraph-aligned slice of one source document, and the pieces of each
    # document tile it exactly.
    for d, doc in enumerate(docs):
        pieces = sorted((doc.index(p), p) for p in train + val if p.startswith(f"[{d}."))
        assert "".join(p for _, p in pieces) == doc
        assert all(p.startswith("[") for _, p in pieces)
    val_chars = sum(map(len, val)) / sum(map(len, docs))
    assert 0.05 <= val_chars < 0.07
    assert len(val) >= 20  # a sample from all over the corpus, not one or two documents
    # Stored in shuffled order, so a short evaluation reading the start still samples everything.
    first_tags = [re.match(r"\[(\d+)\.(\d+)\]", v).groups() for v in val]
    assert first_tags != sorted(first_tags, key=lambda t: (int(t[0]), int(t[1])))
    assert len({doc for doc, _ in first_tags[:8]}) > 1
    val_tokens = manifest["splits"]["val"]["tokens"]
    assert 0.04 < val_tokens / (val_tokens + manifest["splits"]["train"]["tokens"]) < 0.08


def test_paragraph_pieces_cut_at_the_first_break_past_the_target():
    text = "aa\n\nbbbb\n \n\ncc\n\nd\n\neeeeeeeeee\n"
    assert _paragraph_pieces(text, 6) == ["aa\n\nbbbb\n \n\n", "cc\n\nd\n\n", "eeeeeeeeee\n"]
    assert _paragraph_pieces(text, 1) == ["aa\n\n", "bbbb\n \n\n", "cc\n\n", "d\n\n",
                                          "eeeeeeeeee\n"]
    assert _paragraph_pieces("no break\nat all", 1) == ["no break\nat all"]


def test_tokenizer_is_trained_on_the_train_split_only(few_docs):
    docs, out, _ = few_docs
    train_texts, _ = split_train_val(docs, 0.05, seed=0)
    saved = json.loads((out / "tokenizer.json").read_text())
    assert saved == json.loads(train_tokenizer(train_texts, 400).to_str())
    assert saved != json.loads(train_tokenizer(docs, 400).to_str())  # val text would change it


def test_many_documents_are_held_out_whole_and_deterministically(tmp_path):
    docs = corpus(199, 2) + corpus(1, 300)  # one long document, never cut in this mode
    paths = write_inputs(tmp_path, docs)
    a = prepare_dataset(tmp_path / "a", inputs=paths, vocab_size=300, val_fraction=0.4)
    b = prepare_dataset(tmp_path / "b", inputs=paths, vocab_size=300, val_fraction=0.4)
    prepare_dataset(tmp_path / "c", inputs=paths, vocab_size=300, val_fraction=0.4, seed=1)
    val, train = decoded_split(tmp_path / "a", "val"), decoded_split(tmp_path / "a", "train")
    assert sorted(val + train) == sorted(docs)  # whole documents, each in exactly one split
    assert a["splits"] == b["splits"]
    assert set(val) != set(decoded_split(tmp_path / "c", "val"))


def test_existing_tokenizer_is_copied_and_used(few_docs, tmp_path):
    docs, out, _ = few_docs
    manifest = prepare_dataset(tmp_path / "again", inputs=write_inputs(tmp_path, docs[:2]),
                               tokenizer=out / "tokenizer.json", vocab_size=9999)
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == \
        (out / "tokenizer.json").read_bytes()
    assert manifest["vocab_size"] == 400
    tok = load_tokenizer(out / "tokenizer.json")
    train = TokenDataset.open(tmp_path / "again", "train")
    first = decoded_split(tmp_path / "again", "train")[0]
    assert train.tokens[:train.doc_offsets[1]].tolist() == tok.encode(first).ids


def test_uint32_shards_for_large_vocabularies(tmp_path):
    assert token_dtype(65535) == np.uint16 and token_dtype(65536) == np.uint32
    docs = [np.array([70000, 5, 65536], dtype=np.uint32), np.array([1], dtype=np.uint32)]
    split = write_split(tmp_path, "train", docs, shard_tokens=100)
    write_manifest(tmp_path, {"format_version": 1, "vocab_size": 70001, "eos_id": 0,
                              "dtype": "uint32", "splits": {"train": split}})
    ds = TokenDataset.open(tmp_path, "train")
    assert ds.tokens.dtype == np.uint32 and ds.tokens.tolist() == [70000, 5, 65536, 1]
    assert pq.read_schema(tmp_path / "train-00000.parquet").field("tokens").type == \
        pa.list_(pa.uint32())


def test_argument_and_directory_errors(tmp_path):
    paths = write_inputs(tmp_path, corpus(2, 30))
    with pytest.raises(ValueError, match="give exactly one of --source or --input"):
        prepare_dataset(tmp_path / "x", source="shakespeare", inputs=paths)
    with pytest.raises(ValueError, match="source='wiki'"):
        prepare_dataset(tmp_path / "x", source="wiki")
    with pytest.raises(ValueError, match=r"val_fraction=1\.0: must be in \(0, 1\)"):
        prepare_dataset(tmp_path / "x", inputs=paths, val_fraction=1.0)
    with pytest.raises(DataError, match="output directory exists and is not empty"):
        prepare_dataset(tmp_path, inputs=paths)
    (tmp_path / "one.txt").write_text("a single paragraph without any break")
    with pytest.raises(DataError, match=r"1 document/paragraph unit\(s\) cannot be split"):
        prepare_dataset(tmp_path / "y", inputs=[tmp_path / "one.txt"])


def test_cli_prints_a_summary_and_reports_errors(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    paths = [str(p) for p in write_inputs(tmp_path, corpus(3, 40))]
    args = parser.parse_args(["--input", *paths, "--out", str(tmp_path / "out"),
                              "--vocab-size", "300", "--val-fraction", "0.1", "--seed", "2",
                              "--shard-tokens", "1000"])
    assert run_cli(args) == 0
    manifest = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert (manifest["seed"], manifest["val_fraction"], manifest["vocab_size"]) == (2, 0.1, 300)
    printed = capsys.readouterr().out
    train = manifest["splits"]["train"]
    assert f"{train['tokens']:,d} tokens" in printed
    assert f"{len(train['shards'])} shard(s)" in printed
    assert run_cli(args) == 1  # the output directory is now taken
    err = capsys.readouterr().err.strip()
    assert err.startswith("v4train prepare-data: error: ") and "\n" not in err
