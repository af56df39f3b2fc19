"""Step checkpoints (docs/architecture.md principle 4, commit then believe; ``docs/checkpoint-format.md``).

``commit.py`` is the protocol the coordinator runs (attempt, manifest, ``COMMIT``, ``latest``, retention,
verification); ``shards.py`` what each rank writes and reads through torch DCP; ``storage.py`` the one module
that knows how files reach a local or ``s3://`` root; ``save_plan.py`` the save layout a save group's first DCP
save fixed, replayed by its later saves (imported by the rank's checkpoint I/O). This package's namespace is their
public API.
"""

from v4train.orchestrator.checkpoint.commit import (FORMAT_VERSION, READABLE_FORMAT_VERSIONS, CheckpointError,
                                                    apply_retention, begin_attempt, commit, expired, inspect,
                                                    latest_committed, list_checkpoints, read_train_state, step_name,
                                                    supersede_after, verify)
from v4train.orchestrator.checkpoint.shards import (decode_rows, encode_rows, load_shards, load_state, merge_routing,
                                                    rng_state,
                                                    save_shards, set_rng_state, shard_state)

__all__ = ["FORMAT_VERSION", "READABLE_FORMAT_VERSIONS", "CheckpointError", "save_shards", "load_shards", "load_state",
           "shard_state", "rng_state", "set_rng_state", "step_name", "begin_attempt", "commit", "latest_committed",
           "list_checkpoints", "verify", "inspect", "read_train_state", "expired", "apply_retention",
           "supersede_after", "encode_rows", "decode_rows", "merge_routing"]
