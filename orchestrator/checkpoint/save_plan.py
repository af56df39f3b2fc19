"""torch DCP's save-plan cache, scoped to one process group's lifetime so a recovered group never reuses it.

A DCP save gathers every rank's local plan on the coordinator, de-duplicates replicated keys, builds the
global metadata and scatters the final plans back: per key, on every save, though a training job's state
keeps the same keys, shapes and dtypes from one save to the next. ``DefaultSavePlanner(enable_plan_caching=
True)`` skips that work when nothing changed: a rank whose local plan equals the one it cached sends an empty
"unchanged" plan, and the coordinator reuses the global plan and metadata it cached.

That cache lives in class attributes of torch's ``SavePlanner`` (torch 2.13), keyed by a string that torch sets to
the planner's class name: the same in every process, for ever. After a recovery in place (kept rank processes
beside a replacement, in new process groups) a kept rank would answer "unchanged" to a coordinator that has no
cache (a replacement coordinator builds the global plan from the empty plans: the kept ranks' tensors would
silently be left out of the checkpoint) or that cached another world's plans. Here the key is a **generation**: a
fresh token per process group (:func:`new_generation`, taken whenever a save group is created; :func:`forget`
drops its plans when the group is left), so every rank of a new group starts uncached, the first save plans in
full, and only later saves of the same group reuse the plan. Within a generation, a change of any rank's keys or
shapes is caught by torch's own plan comparison (the rank sends its new plan and the coordinator re-plans) and a
change of dtype by :class:`CachedSavePlanner` (torch's comparison does not look at it).
"""

from __future__ import annotations

import uuid

from torch.distributed.checkpoint import DefaultSavePlanner
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner

__all__ = ["CachedSavePlanner", "new_generation", "forget"]

_PREFIX = "v4train-save-plan:"
# SavePlanner's class-level caches (torch 2.13), every one keyed by the planner's ``_cached_plans_key``
_CACHES = ("_cached_save_plan", "_cached_final_save_plan", "_cached_all_plans", "_cached_global_plan",
           "_cached_metadata")


def new_generation() -> str:
    """A fresh cache generation for a new process group (a token no other group of any process shares)."""
    return uuid.uuid4().hex


def forget(generation: str) -> None:
    """Drop this process's cached plans of ``generation`` (its group is being left)."""
    for name in _CACHES:
        getattr(SavePlanner, name).pop(_PREFIX + generation, None)


def _properties(plan: SavePlan) -> list:
    return [item.tensor_data.properties if item.tensor_data is not None else None for item in plan.items]


class CachedSavePlanner(DefaultSavePlanner):
    """DCP's default save planner, reusing its plans across the saves of one process group.

    Args:
        generation: the process group's token (:func:`new_generation`): the same for every save on one group,
            new when the group is re-created (any recovery or change of world).
    """

    def __init__(self, generation: str) -> None:
        super().__init__(enable_plan_caching=True)
        self._cached_plans_key = _PREFIX + generation

    def create_local_plan(self) -> SavePlan:
        """This rank's plan, or DCP's empty "unchanged" plan when it equals the cached one in keys, shapes and
        dtypes."""
        plan = super().create_local_plan()
        cached = SavePlanner._cached_save_plan.get(self._cached_plans_key)
        if not plan.usable and cached is not None and _properties(cached) != _properties(self.plan):
            self._pending_local_plan = self.plan  # torch's comparison ignores dtypes: re-plan in full
            return self.plan
        return plan
