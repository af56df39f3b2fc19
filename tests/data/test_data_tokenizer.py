"""Byte-level BPE: training, exact round trip, save/load, and errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from v4train.data.errors import DataError
from v4train.data.tokenizer import (
    EOS_TOKEN, encode_documents, eos_id, load_tokenizer, tokenizer_vocab_size, train_tokenizer,
)

CORPUS = [
    "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate.\n",
    "Rough winds do shake the darling buds of May,\nAnd summer's lease hath all too short a date.",
] * 20


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=300)


def test_round_trip_is_exact_for_seen_and_unseen_text(tok):
    unseen = ["naïve café ✓ 𝄞 \x00\t\r\n  trailing  ", "Ωμέγα — 東京", ""]
    texts = CORPUS[:2] + unseen
    for text, ids in zip(texts, encode_documents(tok, texts, np.dtype(np.uint16))):
        assert ids.dtype == np.uint16
        assert tok.decode(ids.tolist()) == text
    assert tokenizer_vocab_size(tok) == 300
    assert eos_id(tok) == 0 and tok.id_to_token(0) == EOS_TOKEN
    # Merges were learned: the corpus encodes to far fewer tokens than bytes.
    ids = encode_documents(tok, [CORPUS[0]], np.dtype(np.uint16))[0]
    assert len(ids) < len(CORPUS[0].encode()) / 2
    assert 0 not in ids  # the separator never appears inside an ordinary document


def test_saved_tokenizer_loads_with_identical_ids(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    loaded = load_tokenizer(path)
    text = "Thou art more lovely, O summer's day <|endoftext|> next"
    assert loaded.encode(text).ids == tok.encode(text).ids
    assert loaded.encode(text).ids.count(eos_id(loaded)) == 1


def test_load_errors_name_the_file(tok, tmp_path):
    with pytest.raises(DataError, match=r"missing\.json: tokenizer file not found"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "garbage.json").write_text("{not json")
    with pytest.raises(DataError, match=r"garbage\.json: not a valid tokenizer\.json"):
        load_tokenizer(tmp_path / "garbage.json")
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = []
    spec["model"]["vocab"].pop(EOS_TOKEN)
    (tmp_path / "no_eos.json").write_text(json.dumps(spec))
    with pytest.raises(DataError, match=r"no_eos\.json: tokenizer has no <\|endoftext\|> token"):
        load_tokenizer(tmp_path / "no_eos.json")


def test_vocab_too_small_is_rejected():
    with pytest.raises(ValueError, match="vocab_size=256: must be at least 257"):
        train_tokenizer(CORPUS, vocab_size=256)
