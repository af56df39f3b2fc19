"""`v4train prepare-data`: documents -> split -> tokenizer -> Parquet shards + `dataset.json`.

Steps: read the documents (built-in Shakespeare or the user's files), hold out the validation
split (`data.shards.split_train_val`), train a byte-level BPE on the training text or load the
given `tokenizer.json`, encode both splits and write `tokenizer.json`, `train-NNNNN.parquet`,
`val-NNNNN.parquet` and, last, `dataset.json` into a new or empty output directory.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from v4train.data.errors import DataError
from v4train.data.shards import FORMAT_VERSION, split_train_val, token_dtype, write_manifest, write_split
from v4train.data.sources import read_inputs, shakespeare_documents
from v4train.data.tokenizer import (
    encode_documents, eos_id, load_tokenizer, tokenizer_vocab_size, train_tokenizer,
)

__all__ = ["DEFAULT_SHARD_TOKENS", "add_cli_arguments", "default_cache_dir", "prepare_dataset",
           "run_cli", "summary"]

DEFAULT_SHARD_TOKENS = 8_000_000
SOURCES = ("shakespeare",)
TOKENIZER_FILE = "tokenizer.json"


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/v4train` (default `~/.cache/v4train`): where downloads are kept."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "v4train"


def prepare_dataset(out_dir: str | Path, *, source: str | None = None,
                    inputs: list[str | Path] | None = None, tokenizer: str | Path | None = None,
                    vocab_size: int = 8192, val_fraction: float = 0.05,
                    shard_tokens: int = DEFAULT_SHARD_TOKENS, seed: int = 0,
                    cache_dir: str | Path | None = None) -> dict:
    """Build a tokenized dataset in `out_dir` and return its manifest (the `dataset.json` content).

    Args:
        out_dir: output directory; created if missing, must be empty if present.
        source: "shakespeare" (downloaded once into `cache_dir`), or None when `inputs` is given.
        inputs: `.txt` / `.jsonl` / `.parquet` files (see `data.sources.read_inputs`).
        tokenizer: an existing `tokenizer.json` with `<|endoftext|>`; `vocab_size` is then unused.
        vocab_size: size of the BPE trained on the training split when no tokenizer is given.
        val_fraction: share of the text held out for validation, in (0, 1).
        shard_tokens: a shard is closed once it holds at least this many tokens.
        seed: chooses the validation units and their order.
        cache_dir: download cache, default `default_cache_dir()`.

    Raises:
        ValueError: naming the argument (both or neither of source/inputs, unknown source,
            shard_tokens < 1, seed < 0, val_fraction or vocab_size out of range).
        DataError: naming the file, for unreadable inputs, a failed download, a bad tokenizer
            or a non-empty `out_dir`.
    """
    if (source is None) == (inputs is None):
        raise ValueError("source/inputs: give exactly one of --source or --input")
    if source is not None and source not in SOURCES:
        raise ValueError(f"source={source!r}: expected one of {', '.join(SOURCES)}")
    if shard_tokens < 1 or seed < 0:
        raise ValueError(f"shard_tokens={shard_tokens}, seed={seed}: need shard_tokens >= 1, "
                         "seed >= 0")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: output directory exists and is not empty; choose a new one")
    if source is not None:
        documents = shakespeare_documents(cache_dir or default_cache_dir())
    else:
        documents = read_inputs(inputs)
    train_texts, val_texts = split_train_val(documents, val_fraction, seed)
    tok = load_tokenizer(tokenizer) if tokenizer else train_tokenizer(train_texts, vocab_size)
    vocab = tokenizer_vocab_size(tok)
    dtype = token_dtype(vocab)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer:
        shutil.copyfile(tokenizer, out / TOKENIZER_FILE)  # byte-identical to what the user gave
    else:
        tok.save(str(out / TOKENIZER_FILE))
    splits = {
        name: write_split(out, name, encode_documents(tok, texts, dtype), shard_tokens)
        for name, texts in (("train", train_texts), ("val", val_texts))
    }
    manifest = {
        "format_version": FORMAT_VERSION,
        "tokenizer": TOKENIZER_FILE,
        "vocab_size": vocab,
        "eos_id": eos_id(tok),
        "dtype": dtype.name,
        "seed": seed,
        "val_fraction": val_fraction,
        "source": source if source is not None else [str(p) for p in inputs],
        "splits": splits,
    }
    write_manifest(out, manifest)
    return manifest


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the `prepare-data` options to `parser`."""
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--source", choices=SOURCES, help="built-in corpus to download")
    what.add_argument("--input", nargs="+", metavar="PATH",
                      help=".txt (one document per file), .jsonl (field 'text') or .parquet "
                           "(column 'text') files")
    parser.add_argument("--out", required=True, metavar="DIR", help="new or empty output directory")
    parser.add_argument("--tokenizer", metavar="PATH",
                        help="existing tokenizer.json with <|endoftext|> (default: train a BPE)")
    parser.add_argument("--vocab-size", type=int, default=8192, metavar="N",
                        help="BPE vocabulary size when training one (default 8192)")
    parser.add_argument("--val-fraction", type=float, default=0.05, metavar="F",
                        help="share of text held out for validation (default 0.05)")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, metavar="N",
                        help=f"tokens per Parquet shard (default {DEFAULT_SHARD_TOKENS})")
    parser.add_argument("--seed", type=int, default=0, metavar="N",
                        help="seed of the validation split (default 0)")
    parser.add_argument("--cache-dir", metavar="DIR",
                        help=f"download cache (default {default_cache_dir()})")


def run_cli(args: argparse.Namespace) -> int:
    """Run `prepare-data` from parsed arguments; print a summary. Returns the exit code:
    0 on success, 1 with one `error:` line on stderr for bad data or arguments."""
    start = time.perf_counter()
    try:
        manifest = prepare_dataset(
            args.out, source=args.source, inputs=args.input, tokenizer=args.tokenizer,
            vocab_size=args.vocab_size, val_fraction=args.val_fraction,
            shard_tokens=args.shard_tokens, seed=args.seed, cache_dir=args.cache_dir)
    except ValueError as err:  # DataError included
        print(f"v4train prepare-data: error: {err}", file=sys.stderr)
        return 1
    print(summary(args.out, manifest, time.perf_counter() - start))
    return 0


def summary(out_dir: str | Path, manifest: dict, seconds: float) -> str:
    """A few lines: per split documents, tokens, shards and bytes; vocabulary; seconds."""
    lines = [f"prepared {out_dir} in {seconds:.1f} s: vocab {manifest['vocab_size']} "
             f"({manifest['dtype']}), eos id {manifest['eos_id']}"]
    for name, split in manifest["splits"].items():
        size = sum(s["bytes"] for s in split["shards"])
        lines.append(f"  {name:5s} {split['documents']:7d} documents {split['tokens']:11,d} tokens "
                     f"{len(split['shards']):3d} shard(s) {size / 1e6:8.2f} MB")
    return "\n".join(lines)
