"""Loss-spike detection (spec section 8.1): is this step a spike, judged against running estimates?

:func:`assess` is a pure rule: it takes one step's loss and gradient norm with the running estimates
(:class:`orchestrator.control.run_state.GuardStats`, saved in every checkpoint so a resumed run keeps
guarding with the same estimate) and returns a :class:`Verdict` with the updated estimates. What happens on
a spike (roll back to a snapshot, skip the data window, switch anticipatory routing on) is decided in
``orchestrator/control/decisions.py`` and carried out by ``orchestrator/recovery/spike_rollback.py``.

A step is a spike when its loss or gradient norm is not finite, or, after ``warmup_steps`` observations,
when it exceeds ``ema + sigma * std`` and ``ratio * ema`` both (the two conditions together keep a noisy
early loss from triggering), or when the gradient norm exceeds ``grad_norm_ratio`` times its running mean
(if set). The running estimates are exponential moving averages with weight ``beta`` and are not updated
by spike steps.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from v4train.orchestrator.control.run_state import GuardStats
from v4train.orchestrator.spec import SpikeGuardSpec

__all__ = ["Verdict", "assess", "SpikeGuard"]


@dataclass(frozen=True)
class Verdict:
    """``spike``: roll back; ``reason`` says why; ``ema`` is the running loss estimate (nats)."""

    spike: bool
    reason: str = ""
    ema: float = float("nan")


def assess(stats: GuardStats, spec: SpikeGuardSpec, loss: float, grad_norm: float) -> tuple[Verdict, GuardStats]:
    """Classify one step (loss in nats, global gradient norm); the estimates move only with non-spike steps."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        return Verdict(True, f"non-finite loss {loss} or grad_norm {grad_norm}", stats.loss_mean), stats
    if stats.n >= spec.warmup_steps:
        std = math.sqrt(max(stats.loss_var, 0.0))
        if loss > stats.loss_mean + spec.sigma * std and loss > spec.ratio * stats.loss_mean:
            reason = f"loss {loss:.4f} > ema {stats.loss_mean:.4f} + {spec.sigma} std {std:.4f}"
            return Verdict(True, reason, stats.loss_mean), stats
        if spec.grad_norm_ratio and grad_norm > spec.grad_norm_ratio * stats.grad_mean:
            reason = f"grad_norm {grad_norm:.3f} > {spec.grad_norm_ratio} x {stats.grad_mean:.3f}"
            return Verdict(True, reason, stats.loss_mean), stats
    if stats.n == 0:
        updated = GuardStats(1, loss, 0.0, grad_norm)
    else:
        beta = spec.beta
        delta = loss - stats.loss_mean
        updated = GuardStats(stats.n + 1, stats.loss_mean + (1 - beta) * delta,
                             beta * (stats.loss_var + (1 - beta) * delta * delta),
                             beta * stats.grad_mean + (1 - beta) * grad_norm)
    return Verdict(False, "", updated.loss_mean), updated


class SpikeGuard:
    """:func:`assess` with its estimates held in one object (for interactive use and tests)."""

    def __init__(self, spec: SpikeGuardSpec) -> None:
        self.spec = spec
        self.stats = GuardStats()

    def observe(self, loss: float, grad_norm: float) -> Verdict:
        verdict, self.stats = assess(self.stats, self.spec, loss, grad_norm)
        return verdict

    def state_dict(self) -> dict:
        return dataclasses.asdict(self.stats)

    def load_state_dict(self, state: dict) -> None:
        self.stats = GuardStats(**state)
