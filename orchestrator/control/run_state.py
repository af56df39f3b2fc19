"""The run's global state: the counters every plan and decision is a function of, and ``train_state.json``.

:class:`RunState` is the one place the global counters live (docs/architecture.md principle 3: state is a function of
(spec, checkpoint)): the optimizer step, the consumed tokens and samples, the curriculum stage, the
anticipatory-routing window, the spike guard's running estimates, the non-finite streak and the restart
count. It also owns the schema of a checkpoint's ``train_state.json``: :meth:`RunState.to_train_state`
writes it and :func:`read_train_state` reads it back, refusing a file of another format version or one that
lacks state, with a message naming the file and the field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from v4train.orchestrator.checkpoint import READABLE_FORMAT_VERSIONS, CheckpointError
from v4train.orchestrator.spec import JobSpec

__all__ = ["TRAIN_STATE_KEYS", "GuardStats", "RoutingWindow", "RunState", "SavedState",
           "read_train_state"]

# What a resumable train_state.json must hold (``restarts`` is informational and may be absent).
TRAIN_STATE_KEYS = ("step", "consumed_tokens", "consumed_samples", "loader", "rng", "model", "data_path",
                    "curriculum", "anticipatory_routing")


@dataclass(frozen=True)
class GuardStats:
    """The spike guard's running estimates (spec section 8.1): observations ``n``, the exponential moving
    average and variance of the loss (nats, nats^2) and the moving average of the gradient norm."""

    n: int = 0
    loss_mean: float = 0.0
    loss_var: float = 0.0
    grad_mean: float = 0.0


@dataclass(frozen=True)
class RoutingWindow:
    """Anticipatory routing (spec section 8.1): ``remaining`` steps still to run with the routing of step t
    chosen with the parameters of step t-1; ``delay_steps`` is that lag (always 1). The routing tape itself
    is held by the ranks (``orchestrator/recovery/anticipatory_routing.py``)."""

    remaining: int = 0
    delay_steps: int = 1


@dataclass(frozen=True)
class SavedState:
    """The rank-side part of a checkpoint's train state: the global loader cursor, each rank's RNG state
    (base64, by global rank), the number of ranks that saved, and the global anticipatory-routing tape
    ``{step: {layer: encoded [global_batch, seq, top-k] indices}}`` merged from every rank's rows."""

    loader: dict
    rng: dict[str, str]
    ranks: int
    routing_rows: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RunState:
    """The global counters of a run (immutable: every change returns a new state).

    ``step`` is the last finished optimizer step (0 before the first); ``consumed_tokens`` and
    ``consumed_samples`` count what the steps up to it trained on; ``curriculum_stage`` is the stage of the
    last planned step (None before the first); ``consecutive_nonfinite`` counts skipped steps in a row;
    ``restarts`` the recoveries so far; ``last_committed`` the step of the newest committed checkpoint.
    """

    step: int = 0
    consumed_tokens: int = 0
    consumed_samples: int = 0
    curriculum_stage: int | None = None
    routing: RoutingWindow = RoutingWindow()
    guard: GuardStats = GuardStats()
    consecutive_nonfinite: int = 0
    restarts: int = 0
    last_committed: int | None = None

    def replace(self, **changes) -> RunState:
        return dataclasses.replace(self, **changes)

    def after_step(self, step: int, tokens: int, samples: int) -> RunState:
        """The state once optimizer ``step`` has trained on ``tokens`` tokens in ``samples`` sequences."""
        return self.replace(step=step, consumed_tokens=self.consumed_tokens + tokens,
                            consumed_samples=self.consumed_samples + samples)

    def to_train_state(self, job: JobSpec, saved: SavedState) -> dict:
        """The ``train_state.json`` of a checkpoint of this state (without ``format_version``, which the
        commit adds)."""
        return {
            "step": self.step,
            "consumed_tokens": self.consumed_tokens,
            "consumed_samples": self.consumed_samples,
            "layout": job.parallel.model_dump(),
            "model": job.model.model_dump(),
            "data_path": job.data.path,
            "loader": saved.loader,
            "rng": saved.rng,
            "ranks": saved.ranks,
            # The plan is a function of (step, consumed_tokens); the stage is recorded for inspection.
            "curriculum": {"stage": self.curriculum_stage},
            "spike_guard": dataclasses.asdict(self.guard) if job.spike_guard.enabled else {},
            "anticipatory_routing": {"remaining": self.routing.remaining, "delay_steps": self.routing.delay_steps,
                                     "rows": saved.routing_rows},
            "restarts": self.restarts,
        }

    def restored(self, train_state: dict) -> RunState:
        """This state moved to a checkpoint's counters (restarts and the non-finite streak are kept: they
        count this run's history, not the checkpoint's)."""
        ar = train_state["anticipatory_routing"]
        guard = train_state.get("spike_guard") or None
        return self.replace(
            step=int(train_state["step"]),
            consumed_tokens=int(train_state["consumed_tokens"]),
            consumed_samples=int(train_state["consumed_samples"]),
            routing=RoutingWindow(int(ar.get("remaining", 0)), int(ar.get("delay_steps", 1))),
            guard=GuardStats(**guard) if guard else self.guard,
            last_committed=int(train_state["step"]),
        )


def read_train_state(state: dict, where: str, job: JobSpec | None = None) -> dict:
    """Check a parsed ``train_state.json`` (from ``where``, for messages) and return it.

    Raises CheckpointError when its ``format_version`` is not one this v4train reads (the schema is versioned
    with the checkpoint format, ``checkpoint/commit.py``), when it lacks a
    field of :data:`TRAIN_STATE_KEYS`, or (given ``job``) when it was saved for another model.
    """
    version = state.get("format_version")
    if version not in READABLE_FORMAT_VERSIONS:
        raise CheckpointError(f"{where}/train_state.json: format version {version}; this v4train reads versions "
                              f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))}")
    for key in TRAIN_STATE_KEYS:
        if key not in state:
            raise CheckpointError(f"{where}/train_state.json: lacks {key!r}")
    if job is not None and _architecture(state["model"]) != _architecture(job.model.model_dump()):
        raise CheckpointError(f"{where}: saved for model {state['model']}, this job has {job.model.model_dump()}")
    return state


def _architecture(model_section: dict) -> dict:
    """The model section without ``init_from``: where the first weights came from is not part of the model,
    so a run resumes whatever it was initialised from (and checkpoints written before the field existed)."""
    return {k: v for k, v in model_section.items() if k != "init_from"}
