"""Loss-spike guard (spec section 8.1): detect a spike against a running estimate, decide a rollback.

A pure policy: :meth:`SpikeGuard.observe` takes one step's loss and gradient norm and returns a
:class:`Decision`; the supervisor acts on it (rolls the ranks back to a snapshot, skips the offending data
window, switches anticipatory routing on for ``anticipatory_steps`` steps). Its state (the running mean
and variance of the loss, the remaining anticipatory-routing period) is a small dict saved in every
checkpoint, so a resumed run keeps guarding with the same estimate.

A step is a spike when its loss or gradient norm is not finite, or, after ``warmup_steps`` observations, when it exceeds
``ema + sigma * std`` and ``ratio * ema`` both (the two conditions together keep a noisy early loss from
triggering), or when the gradient norm exceeds ``grad_norm_ratio`` times its running mean (if set).
The running estimates are exponential moving averages with weight ``beta`` and are not updated by
spike steps.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from v4train.orchestrator.spec import SpikeGuardSpec

__all__ = ["Decision", "SpikeGuard"]


@dataclass(frozen=True)
class Decision:
    """``spike``: roll back; ``reason`` says why; ``ema`` is the running loss estimate (nats)."""

    spike: bool
    reason: str = ""
    ema: float = float("nan")


@dataclass
class _State:
    n: int = 0
    loss_mean: float = 0.0
    loss_var: float = 0.0
    grad_mean: float = 0.0


class SpikeGuard:
    """Running loss/grad-norm statistics and the spike rule of a :class:`SpikeGuardSpec`."""

    def __init__(self, spec: SpikeGuardSpec) -> None:
        self.spec = spec
        self.state = _State()

    def observe(self, loss: float, grad_norm: float) -> Decision:
        """Classify one step; update the estimates only with non-spike steps."""
        s, spec = self.state, self.spec
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return Decision(True, f"non-finite loss {loss} or grad_norm {grad_norm}", s.loss_mean)
        if s.n >= spec.warmup_steps:
            std = math.sqrt(max(s.loss_var, 0.0))
            if loss > s.loss_mean + spec.sigma * std and loss > spec.ratio * s.loss_mean:
                return Decision(True, f"loss {loss:.4f} > ema {s.loss_mean:.4f} + {spec.sigma} std {std:.4f}",
                                s.loss_mean)
            if spec.grad_norm_ratio and grad_norm > spec.grad_norm_ratio * s.grad_mean:
                return Decision(True, f"grad_norm {grad_norm:.3f} > {spec.grad_norm_ratio} x {s.grad_mean:.3f}",
                                s.loss_mean)
        if s.n == 0:
            s.loss_mean, s.grad_mean = loss, grad_norm
        else:
            beta = spec.beta
            delta = loss - s.loss_mean
            s.loss_mean += (1 - beta) * delta
            s.loss_var = beta * (s.loss_var + (1 - beta) * delta * delta)
            s.grad_mean = beta * s.grad_mean + (1 - beta) * grad_norm
        s.n += 1
        return Decision(False, "", s.loss_mean)

    def state_dict(self) -> dict:
        return asdict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = _State(**state)
