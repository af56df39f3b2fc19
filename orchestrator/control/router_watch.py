"""Watches each MoE layer's router health across steps and says when a layer's routing has collapsed.

The ranks report per-layer health over the data-parallel group (``router/<layer>/dead_experts``,
``router/<layer>/max_load``, ``orchestrator/rank/router_health.py``). :class:`RouterWatch` counts, per layer,
the consecutive steps with a dead expert and with the busiest expert above ``router_health.max_load`` times
the mean; when either streak reaches ``router_health.collapse_steps`` it returns one ``router_collapse``
record for that layer (again only after the layer has recovered for a step). A step at or before the last one
observed means the run went back (a restart, a rollback, a resume to an earlier step): the steps counted since
were undone, so the streaks start again.
"""

from __future__ import annotations

from v4train.orchestrator.spec.job import RouterHealthSpec

__all__ = ["RouterWatch"]


class RouterWatch:
    """Per-layer collapse streaks of one run.

    Args:
        spec: the job's ``router_health`` section.
    """

    def __init__(self, spec: RouterHealthSpec) -> None:
        self.spec = spec
        self.streaks: dict[tuple[str, str], int] = {}  # (layer, "dead" | "overloaded") -> consecutive steps
        self.last_step = 0

    def observe(self, record: dict) -> list[dict]:
        """Update the streaks with one step's metrics; the ``router_collapse`` fields of every layer whose
        streak reached ``collapse_steps`` at this step: layer, reason, steps, dead_experts, max_load."""
        if record["step"] <= self.last_step:
            self.streaks.clear()
        self.last_step = record["step"]
        collapsed = []
        for key, dead in record.items():
            if not (key.startswith("router/") and key.endswith("/dead_experts")):
                continue
            layer = key.split("/")[1]
            max_load = record[f"router/{layer}/max_load"]
            for reason, bad in (("dead", dead > 0), ("overloaded", max_load > self.spec.max_load)):
                streak = self.streaks.get((layer, reason), 0) + 1 if bad else 0
                self.streaks[(layer, reason)] = streak
                if streak == self.spec.collapse_steps:
                    collapsed.append({"layer": int(layer), "reason": reason, "steps": streak,
                                      "dead_experts": int(dead), "max_load": round(max_load, 3)})
        return collapsed
