"""Wall time of the consecutive phases of one piece of rank work (set-up, a step, leaving a failed call),
written to the rank's log so that a slow recovery can be split into its parts."""

from __future__ import annotations

import time

__all__ = ["PhaseClock"]


class PhaseClock:
    """Laps of one piece of work: ``lap(name)`` closes the phase that ran since the previous lap (or since
    the clock was made). ``str()`` gives ``name=seconds`` pairs and the total, in seconds."""

    def __init__(self) -> None:
        self.started = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> float:
        """Close phase ``name``; its seconds."""
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self.last
        self.last = now
        return self.laps[name]

    @property
    def total(self) -> float:
        return self.last - self.started

    def __str__(self) -> str:
        return " ".join(f"{k}={v:.3f}s" for k, v in self.laps.items()) + f" total={self.total:.3f}s"
