"""Per-step plans as pure functions of the global counters (docs/architecture.md principle 3; spec sections 6-7).

Everything a rank needs to run optimizer step ``step`` (sequence length, global batch, micro-batch size,
learning rate, attention mode, MTP loss weight) is computed here from the job spec and the global
counters (the step index and the tokens consumed before it), so a run resumed on any layout continues
with the same values.

Without a ``curriculum`` section the sequence length is ``data.seq_len``, the batch ``train.global_batch``
and the learning rate follows ``train.warmup_steps`` and a cosine over all steps. With one, V4's shape
(spec section 7: 4K -> 16K -> 64K -> 1M, dense attention first, an indexer warm-up, then sparse):

- **stages** by consumed tokens, each with its sequence length (tokens), attention mode and optionally
  its micro-batch size;
- a **global-batch ramp** from ``batch_ramp_start`` to ``train.global_batch`` sequences over the first
  ``batch_ramp_tokens`` tokens, in multiples of ``batch_multiple`` (the same on every layout whose
  micro-batch size x data-parallel size divides it);
- a **token-based learning rate**: linear warmup over ``lr_warmup_tokens``, constant, then cosine decay
  to ``train.lr * train.min_lr_ratio`` over the final ``lr_decay_fraction`` of the run's tokens;
- the **MTP loss weight**: ``mtp_weight`` until the decay starts, ``mtp_weight_decay`` after (spec 5.3).
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

from v4train.orchestrator.spec import JobSpec, TrainSpec

__all__ = ["StepPlan", "lr_at", "plan_step", "plan_at", "total_tokens"]


@dataclass(frozen=True)
class StepPlan:
    """What every rank runs for one optimizer step (a small message sent over the control plane).

    ``step`` is 1-based; ``global_batch`` and ``micro_batch_size`` are in sequences, ``seq_len`` in tokens;
    ``stage`` is the index of the curriculum stage (0 without a curriculum). ``anticipatory_routing`` and
    ``prefetch_routing`` (the next step's plan, whose routing is captured during this step with the
    parameters before this step's update) are set by the supervisor while anticipatory routing is on.
    """

    step: int
    seq_len: int
    global_batch: int
    micro_batch_size: int
    lr: float
    attention_mode: str = "dense"
    mtp_loss_weight: float = 0.3
    stage: int = 0
    anticipatory_routing: bool = False
    prefetch_routing: dict | None = None

    @property
    def global_batch_tokens(self) -> int:
        return self.global_batch * self.seq_len

    def to_dict(self) -> dict:
        return asdict(self)


def lr_at(step: int, train: TrainSpec) -> float:
    """Step-based learning rate (no curriculum): linear warmup, then cosine to ``lr * min_lr_ratio``.

    The warmup reaches the peak at ``step == warmup_steps``; the cosine ends at ``step == steps``.
    """
    if train.warmup_steps and step <= train.warmup_steps:
        return train.lr * step / train.warmup_steps
    span = max(1, train.steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / span)
    floor = train.lr * train.min_lr_ratio
    return floor + (train.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _stage_at(job: JobSpec, consumed_tokens: int) -> int:
    bound = 0
    stages = job.curriculum.stages
    for i, stage in enumerate(stages[:-1]):
        bound += stage.tokens
        if consumed_tokens < bound:
            return i
    return len(stages) - 1


def _global_batch(job: JobSpec, consumed_tokens: int) -> int:
    c = job.curriculum
    full = job.train.global_batch
    if not c.batch_ramp_tokens or consumed_tokens >= c.batch_ramp_tokens:
        return full
    start = c.batch_ramp_start or c.batch_multiple
    raw = start + (full - start) * consumed_tokens / c.batch_ramp_tokens
    return max(c.batch_multiple, min(full, int(raw) // c.batch_multiple * c.batch_multiple))


def _shape(job: JobSpec, consumed_tokens: int) -> tuple[int, int, int, int]:
    """(stage index, seq_len, global batch, micro-batch size) for a step starting at ``consumed_tokens``."""
    i = _stage_at(job, consumed_tokens)
    stage = job.curriculum.stages[i]
    return i, stage.seq_len, _global_batch(job, consumed_tokens), stage.micro_batch_size or job.train.micro_batch_size


def _tokens_before_steps(job: JobSpec) -> tuple[int, ...]:
    """consumed tokens before each step 1..steps+1 (the curriculum's shapes are a function of these)."""
    return _tokens_table(job.model_dump_json())


@functools.lru_cache(maxsize=16)
def _tokens_table(job_json: str) -> tuple[int, ...]:
    job = JobSpec.model_validate_json(job_json)
    out = [0]
    for _ in range(job.train.steps):
        _, seq_len, batch, _ = _shape(job, out[-1])
        out.append(out[-1] + seq_len * batch)
    return tuple(out)


def total_tokens(job: JobSpec) -> int:
    """Tokens the whole run trains on (``train.steps`` steps of the curriculum)."""
    if job.curriculum is None:
        return job.train.steps * job.train.global_batch * job.data.seq_len
    return _tokens_before_steps(job)[-1]


def _lr_by_tokens(job: JobSpec, consumed_tokens: int) -> tuple[float, bool]:
    """(learning rate, decay started) at ``consumed_tokens``."""
    c, t = job.curriculum, job.train
    total = total_tokens(job)
    if c.lr_warmup_tokens and consumed_tokens < c.lr_warmup_tokens:
        return t.lr * (consumed_tokens + 1) / c.lr_warmup_tokens, False
    decay_start = total * (1.0 - c.lr_decay_fraction)
    if consumed_tokens < decay_start:
        return t.lr, False
    progress = min(1.0, (consumed_tokens - decay_start) / max(1.0, total - decay_start))
    floor = t.lr * t.min_lr_ratio
    return floor + (t.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)), True


def plan_at(job: JobSpec, step: int, consumed_tokens: int) -> StepPlan:
    """The plan for 1-based optimizer ``step``, which starts after ``consumed_tokens`` tokens."""
    if job.curriculum is None:
        return StepPlan(step=step, seq_len=job.data.seq_len, global_batch=job.train.global_batch,
                        micro_batch_size=job.train.micro_batch_size, lr=lr_at(step, job.train))
    c = job.curriculum
    i, seq_len, batch, mbs = _shape(job, consumed_tokens)
    lr, decaying = _lr_by_tokens(job, consumed_tokens)
    return StepPlan(step=step, seq_len=seq_len, global_batch=batch, micro_batch_size=mbs, lr=lr,
                    attention_mode=c.stages[i].attention, stage=i,
                    mtp_loss_weight=c.mtp_weight_decay if decaying else c.mtp_weight)


def plan_step(job: JobSpec, step: int) -> StepPlan:
    """The plan for ``step`` of an uninterrupted run (consumed tokens derived from the step)."""
    tokens = (step - 1) * job.train.global_batch * job.data.seq_len if job.curriculum is None \
        else _tokens_before_steps(job)[step - 1]
    return plan_at(job, step, tokens)
