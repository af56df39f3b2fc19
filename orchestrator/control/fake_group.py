"""An in-process fake of the ranks, for fast tests of the supervisor (no processes, no model).

:class:`FakeRankGroup` keeps what the supervisor can observe of real ranks (the step counter, a global data
cursor, in-memory snapshots, checkpoints) and answers each call from a :class:`Script`: the loss of every
step as a function of the step and the data it trained on, steps whose gradient is not finite, and rank
failures to raise once. Checkpoints are real: :meth:`FakeRankGroup.save` writes a one-tensor DCP checkpoint
into the attempt directory, so the commit protocol (``orchestrator/checkpoint``) runs unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed.checkpoint as dcp

from v4train.orchestrator.control.decisions import EvalRequest
from v4train.orchestrator.control.rank_group import RankFailure, RankInfo, RankSave, SetupRequest
from v4train.orchestrator.curriculum import StepPlan
from v4train.orchestrator.checkpoint.storage import Storage

__all__ = ["Script", "FakeRankGroup"]


def _default_loss(step: int, cursor: int) -> float:
    return 5.0 * 0.97 ** cursor


@dataclass
class Script:
    """What the fake ranks do. ``loss(step, batches consumed before the step)`` gives each step's loss
    (nats); ``nonfinite`` steps report an infinite gradient norm and are skipped (once each); ``failures`` maps a step
    to the failure kind (``exception``, ``died``, ``stall``) raised once, on rank ``failing_rank``, when
    that step is asked for; ``save_failures`` does the same for the save after a step."""

    loss: Callable[[int, int], float] = _default_loss
    nonfinite: set[int] = field(default_factory=set)
    failures: dict[int, str] = field(default_factory=dict)
    save_failures: dict[int, str] = field(default_factory=dict)
    failing_rank: int = 0


@dataclass
class _Ranks:
    """The state every fake rank shares (they are identical): step, data cursor (batches), snapshots."""

    step: int = 0
    cursor: int = 0
    snapshots: list[tuple[int, int]] = field(default_factory=list)


class FakeRankGroup:
    """``world_size`` fake ranks following ``script`` (shared across restarts, so a failure fires once).

    ``calls`` records every operation by name, for tests of what the supervisor asked for.
    """

    launcher = "fake"

    def __init__(self, world_size: int, script: Script) -> None:
        self.world_size = world_size
        self.script = script
        self.calls: list[str] = []
        self.job = None
        self.ranks = _Ranks()

    def coordinate(self, fn):
        return fn()

    def _fail(self, table: dict[int, str], step: int, method: str) -> None:
        kind = table.pop(step, None)
        if kind is not None:
            raise RankFailure(self.script.failing_rank, kind, f"scripted {kind} at step {step}", method)

    def setup(self, request: SetupRequest, timeout_s: float) -> list[RankInfo]:
        self.calls.append("setup")
        self.job = request.job
        self.ranks = _Ranks()
        last = self.world_size - 1
        return [RankInfo(r, pp_rank=0, dp_rank=0, tp_rank=0, stage_params=1, reporter=r == last)
                for r in range(self.world_size)]

    def train_step(self, plan: StepPlan) -> list[dict]:
        self.calls.append("train_step")
        ranks = self.ranks
        if plan.step != ranks.step + 1:
            raise RuntimeError(f"fake ranks asked for step {plan.step} at step {ranks.step}")
        self._fail(self.script.failures, plan.step, "train_step")
        loss = self.script.loss(plan.step, ranks.cursor)
        bad = plan.step in self.script.nonfinite
        self.script.nonfinite.discard(plan.step)
        record = {"step": plan.step, "loss": loss, "grad_norm": math.inf if bad else 1.0, "lr": plan.lr,
                  "seq_len": plan.seq_len, "global_batch_tokens": plan.global_batch_tokens, "step_time_s": 0.0,
                  "tokens_per_s": 0.0, "data_fingerprint": ranks.cursor, "peak_rss_mb": 0.0, "skipped": bad}
        if plan.anticipatory_routing:
            record["routing_fingerprint"] = plan.step
        ranks.step, ranks.cursor = plan.step, ranks.cursor + 1
        guard = self.job.spike_guard
        if guard.enabled and plan.step % guard.snapshot_every == 0:
            ranks.snapshots = (ranks.snapshots + [(ranks.step, ranks.cursor)])[-2:]
        return [dict(record) for _ in range(self.world_size)]

    def evaluate(self, request: EvalRequest) -> list[dict]:
        self.calls.append(f"evaluate@{request.seq_len}")
        value = {"val_loss": self.script.loss(self.ranks.step, self.ranks.cursor), "val_batches": request.batches}
        return [dict(value) for _ in range(self.world_size)]

    def save(self, root: str, attempt: str, asynchronous: bool, timeout_s: float) -> list[RankSave]:
        self.calls.append("save")
        self._fail(self.script.save_failures, self.ranks.step, "save")
        state = {"model.step": torch.tensor([self.ranks.step, self.ranks.cursor])}
        dcp.save(state, storage_writer=Storage(root).dcp_writer(attempt), no_dist=True)
        loader = {"cursor": self.ranks.cursor}
        return [RankSave(r, 0, loader, "", {}) for r in range(self.world_size)]

    def save_done(self, timeout_s: float) -> bool:
        return True

    def wait_saved(self, timeout_s: float) -> None:
        return None

    def load(self, root: str, name: str, train_state: dict, timeout_s: float) -> list[int]:
        self.calls.append(f"load@{train_state['step']}")
        self.ranks.step = int(train_state["step"])
        self.ranks.cursor = int(train_state["loader"]["cursor"])
        self.ranks.snapshots = []
        return [self.ranks.step] * self.world_size

    def rollback(self, newest_allowed: int, skip_data: bool) -> list[int]:
        self.calls.append(f"rollback@{newest_allowed}")
        snap = next((s for s in reversed(self.ranks.snapshots) if s[0] <= newest_allowed), None)
        if snap is None:
            return [-1] * self.world_size
        self.ranks.step = snap[0]
        if not skip_data:
            self.ranks.cursor = snap[1]
        self.ranks.snapshots = [s for s in self.ranks.snapshots if s[0] <= snap[0]]
        return [self.ranks.step] * self.world_size

    def loader_state(self) -> dict:
        return {"cursor": self.ranks.cursor}

    def set_loader_state(self, state: dict) -> None:
        self.ranks.cursor = int(state["cursor"])

    def shutdown(self) -> None:
        self.calls.append("shutdown")

    def abort(self) -> None:
        self.calls.append("abort")

    def rejoin(self, failure: RankFailure, timeout_s: float) -> bool:
        """Never: a failed fake group is aborted and a new one made, so tests see every restart."""
        return False
