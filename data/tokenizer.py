"""Tokenizer: train a byte-level BPE or load an existing HF `tokenizer.json`.

The trained tokenizer is GPT-2 style (Radford et al. 2019, section 2.2): a ByteLevel
pre-tokenizer (bytes mapped to printable characters, GPT-2 split regex), BPE merges learned with
HF `tokenizers`, a ByteLevel decoder, and one special token `<|endoftext|>` (id 0 when trained
here) that separates documents and ends each one. Byte-level BPE has no unknown token and no
normalizer, so `decode(encode(text)) == text` for every string.

A literal `<|endoftext|>` inside a document's text is encoded as the separator token, as in GPT-2.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from v4train.data.errors import DataError

__all__ = [
    "EOS_TOKEN", "encode_documents", "eos_id", "load_tokenizer", "tokenizer_vocab_size",
    "train_tokenizer",
]

EOS_TOKEN = "<|endoftext|>"
# 256 byte symbols + the separator: a smaller vocabulary could not encode every byte.
_MIN_VOCAB = 257


def train_tokenizer(documents: list[str], vocab_size: int = 8192) -> Tokenizer:
    """Learn a byte-level BPE of `vocab_size` entries (bytes + merges + `<|endoftext|>`).

    Args:
        documents: training texts (pass the train split only so validation text stays unseen).
        vocab_size: target vocabulary size; a small corpus may stop with fewer merges.

    Returns:
        the tokenizer; `eos_id(tok) == 0`.

    Raises:
        ValueError: `vocab_size` below 257.
    """
    if vocab_size < _MIN_VOCAB:
        raise ValueError(f"vocab_size={vocab_size}: must be at least {_MIN_VOCAB} "
                         "(256 bytes + <|endoftext|>)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        # All 256 byte symbols up front, so bytes absent from the corpus still encode.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(documents, trainer)
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load an HF `tokenizer.json`; it must define the `<|endoftext|>` token.

    Raises:
        DataError: naming `path` when it is missing, unreadable, or lacks `<|endoftext|>`.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: tokenizer file not found")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as err:  # the Rust side raises a bare Exception for any parse failure
        raise DataError(f"{path}: not a valid tokenizer.json ({err})") from None
    if tok.token_to_id(EOS_TOKEN) is None:
        raise DataError(f"{path}: tokenizer has no {EOS_TOKEN} token to separate documents")
    return tok


def eos_id(tok: Tokenizer) -> int:
    """Id of `<|endoftext|>`, the document separator appended after every document."""
    return tok.token_to_id(EOS_TOKEN)


def tokenizer_vocab_size(tok: Tokenizer) -> int:
    """Number of ids the tokenizer can emit (merges + added special tokens)."""
    return tok.get_vocab_size(with_added_tokens=True)


def encode_documents(tok: Tokenizer, documents: list[str], dtype: np.dtype) -> list[np.ndarray]:
    """Encode each document to a 1-D token array `[n_tokens]` of `dtype`, without separators.

    Special tokens of a loaded tokenizer's post-processor (BOS etc.) are not added: documents are
    separated by `<|endoftext|>` alone, appended by the loader.
    """
    encodings = tok.encode_batch_fast(documents, add_special_tokens=False)
    return [np.asarray(e.ids, dtype=dtype) for e in encodings]
