"""Training data: document sources, tokenizer, Parquet token shards and the global-cursor loader.

`data.prepare` builds a dataset directory (`v4train prepare-data`); `data.loader` reads it back,
verified, as a deterministic global stream of packed batches. numpy, pyarrow and tokenizers
only: no torch here.
"""
