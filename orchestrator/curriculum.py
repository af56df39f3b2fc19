"""Per-step plans as pure functions of the global counters (DESIGN principle 3).

Everything a rank needs to run optimizer step ``step`` (sequence length, global batch, micro-batch size,
learning rate) is computed here from the job spec and the step index alone, so a run resumed on any
layout continues with the same values. This first cut has a constant sequence length and batch; the
sequence-length and batch ramps of V4 (spec section 7) are issue 7.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from orchestrator.spec import JobSpec, TrainSpec

__all__ = ["StepPlan", "lr_at", "plan_step"]


@dataclass(frozen=True)
class StepPlan:
    """What every rank runs for one optimizer step (a small message sent over the control plane).

    ``step`` is 1-based; ``global_batch`` and ``micro_batch_size`` are in sequences, ``seq_len`` in tokens.
    """

    step: int
    seq_len: int
    global_batch: int
    micro_batch_size: int
    lr: float

    @property
    def global_batch_tokens(self) -> int:
        return self.global_batch * self.seq_len

    def to_dict(self) -> dict:
        return asdict(self)


def lr_at(step: int, train: TrainSpec) -> float:
    """Learning rate for 1-based optimizer ``step``: linear warmup, then cosine to ``lr * min_lr_ratio``.

    The warmup reaches the peak at ``step == warmup_steps``; the cosine ends at ``step == steps``.
    """
    if train.warmup_steps and step <= train.warmup_steps:
        return train.lr * step / train.warmup_steps
    span = max(1, train.steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / span)
    floor = train.lr * train.min_lr_ratio
    return floor + (train.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def plan_step(job: JobSpec, step: int) -> StepPlan:
    """The plan for 1-based optimizer ``step`` of ``job``."""
    return StepPlan(
        step=step,
        seq_len=job.data.seq_len,
        global_batch=job.train.global_batch,
        micro_batch_size=job.train.micro_batch_size,
        lr=lr_at(step, job.train),
    )
