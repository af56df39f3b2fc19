"""In-memory snapshots of a rank's state, the targets of a spike rollback (spec section 8.1).

Every ``spike_guard.snapshot_every`` steps each rank copies its model state, optimizer state and loader
cursor into memory; the two newest are kept. A rollback (``orchestrator/recovery/spike_rollback.py``)
restores the newest one at or before a given step on every rank, without touching storage.
"""

from __future__ import annotations

import collections

__all__ = ["SnapshotRing"]


class SnapshotRing:
    """The ``keep`` newest in-memory snapshots of one rank (model, optimizer, loader)."""

    def __init__(self, keep: int = 2) -> None:
        self.snapshots: collections.deque = collections.deque(maxlen=keep)

    def take(self, step: int, stage, optimizer, loader) -> None:
        """Copy this rank's state after ``step``."""
        optim = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()}
                 for p in stage.parameters() if optimizer.state.get(p)}
        self.snapshots.append({
            "step": step,
            "model": {k: v.clone() for k, v in stage.state_dict().items()},
            "optim": optim,
            "loader": loader.state_dict(),
        })

    def restore(self, newest_allowed: int, stage, optimizer, loader, skip_data: bool) -> int:
        """Restore the newest snapshot taken at or before step ``newest_allowed``; its step (-1: none).

        With ``skip_data`` the loader keeps its current position, so the batches between the snapshot and
        now are not trained on again. Newer snapshots (of the abandoned trajectory) are dropped.
        """
        snap = next((s for s in reversed(self.snapshots) if s["step"] <= newest_allowed), None)
        if snap is None:
            return -1
        stage.load_state_dict(snap["model"])
        optimizer.state.clear()
        for p in stage.parameters():
            if id(p) in snap["optim"]:
                optimizer.state[p] = {k: v.clone() for k, v in snap["optim"][id(p)].items()}
        if not skip_data:
            loader.load_state_dict(snap["loader"])
        while self.snapshots and self.snapshots[-1]["step"] > snap["step"]:
            self.snapshots.pop()
        return snap["step"]
