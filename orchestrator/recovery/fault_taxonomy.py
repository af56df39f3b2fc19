"""Which failures a restart can fix: the fault taxonomy of the supervisor (docs/architecture.md section 3).

*Transient* faults are recovered within ``train.max_restarts``: a rank dies or stalls, a collective times out
or loses its peer, a storage call returns a retryable error (503 SlowDown, throttling, a reset connection)
after its own retries. *Deterministic* faults end the run at once with one line naming the file, field,
tensor or rank, without spending the restart budget, because the same inputs give the same failure: bad data
(:class:`v4train.data.errors.DataError`: a corrupt shard, a token outside the vocabulary), a checkpoint that
fails verification or lacks a file, a permission or credential error, a job the model cannot take (a
``ValueError`` or ``TypeError`` while a rank sets up), and any fault that repeats at the same step with the
same cause after a restart (:class:`FaultHistory`).

Failures cross process boundaries as text (a rank's exception reaches the supervisor as
``"TypeName: message"``, and torch DCP gathers several ranks' tracebacks into one
``CheckpointException``), so :func:`classify` reads the exception type from the text's root line
(:func:`root_line`) as well as from a local exception's class.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from v4train.orchestrator.control.rank_group import RankFailure

__all__ = ["FaultClass", "Verdict", "DeterministicFault", "FaultHistory", "classify", "root_line"]


class FaultClass(enum.Enum):
    TRANSIENT = "transient"
    DETERMINISTIC = "deterministic"


# Exception types whose cause a restart cannot change (bad inputs, refused credentials, missing files).
_DETERMINISTIC_TYPES = frozenset({
    "DataError", "CheckpointError", "SpecError", "PermissionError", "FileNotFoundError", "NotADirectoryError",
    "IsADirectoryError", "NoCredentialsError", "PartialCredentialsError", "NoSuchBucket",
})
# Raised while a rank builds its model from the job: the job is one the model cannot take.
_SETUP_CONFIG_TYPES = frozenset({"ValueError", "TypeError", "KeyError", "AssertionError"})
# Storage answers that a later call may not get: retried by botocore per call, then a transient fault.
_RETRYABLE_STORAGE = re.compile(r"SlowDown|\b503\b|ServiceUnavailable|Throttl|RequestTimeout|InternalError|"
                                r"Connection reset|EndpointConnectionError|ReadTimeout")
_EXC_LINE = re.compile(r"^\s*(?:[A-Za-z_][\w.]*\.)?([A-Za-z_]\w*(?:Error|Exception|Fault))\b:?(.*)$")
_VOLATILE = re.compile(r"0x[0-9a-f]+|[0-9a-f]{12,}|\b\d+(?:\.\d+)? ?s\b|pid=?\d+", re.IGNORECASE)


@dataclass(frozen=True)
class Verdict:
    """A classified failure: its ``fault_class``, the exception type name (``""`` when none is named), the
    one-line ``cause`` a user reads, and ``reason`` for the class."""

    fault_class: FaultClass
    type_name: str
    cause: str
    reason: str

    @property
    def deterministic(self) -> bool:
        return self.fault_class is FaultClass.DETERMINISTIC


class DeterministicFault(RuntimeError):
    """A run stopped by a deterministic fault; ``str()`` is the one line the command line prints."""


def root_line(text: str) -> str:
    """The line of a (possibly multi-line) error text that names the root cause.

    A single line is returned unchanged. In a gathered traceback (torch DCP's ``CheckpointException``, a
    rank's re-raised error) that is the first ``SomeError: message`` line after the first line; else the
    first non-empty line.
    """
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    if not lines:
        return ""
    for line in lines[1:]:
        if _EXC_LINE.match(line) and not line.startswith("Traceback"):
            return line
    return lines[0]


def _type_of(line: str) -> str:
    match = _EXC_LINE.match(line)
    return match.group(1) if match else ""


def classify(exc: BaseException) -> Verdict:
    """Classify one failure (a :class:`RankFailure` from the rank group, or an exception the supervisor
    itself raised) without history; :meth:`FaultHistory.classify` adds the repeat rule."""
    if isinstance(exc, RankFailure):
        where = f"rank {exc.rank} ({exc.method})"
        if exc.kind in ("died", "stall", "node_lost"):
            return Verdict(FaultClass.TRANSIENT, "", f"{where}: {exc.kind}: {root_line(exc.message)}",
                           f"a rank {exc.kind}")
        if exc.kind == "unreachable":  # a node that cannot reach the rendezvous or the root will not by restarting
            return Verdict(FaultClass.DETERMINISTIC, "unreachable", f"{where}: {root_line(exc.message)}",
                           "a node cannot reach the rendezvous or the checkpoint root")
        line = root_line(exc.message)
        type_name = _type_of(line)
        names = {type_name, _type_of(exc.message)}
        cause = f"{where}: {line}"
        if exc.method == "setup" and type_name in _SETUP_CONFIG_TYPES:
            return Verdict(FaultClass.DETERMINISTIC, type_name, cause, "the job is one the model cannot take")
    else:
        names = {c.__name__ for c in type(exc).__mro__}
        line = root_line(f"{type(exc).__name__}: {exc}")
        type_name = type(exc).__name__
        cause = line
    if _RETRYABLE_STORAGE.search(line) and "PermissionError" not in names:
        return Verdict(FaultClass.TRANSIENT, type_name, cause, "a retryable storage error")
    hit = names & _DETERMINISTIC_TYPES
    if hit:
        return Verdict(FaultClass.DETERMINISTIC, type_name, cause, f"{sorted(hit)[0]} (a restart cannot fix it)")
    return Verdict(FaultClass.TRANSIENT, type_name, cause, "may not recur")


class FaultHistory:
    """The failures of one run, for the repeat rule: a fault whose signature (rank-independent cause, with
    addresses, ids and durations left out) was already seen at the same step before a restart is
    deterministic."""

    def __init__(self) -> None:
        self._seen: set[tuple[int, str]] = set()

    @staticmethod
    def signature(cause: str) -> str:
        """``cause`` (a :class:`Verdict`'s, or a ``failure`` event's) without the rank, addresses, ids and
        durations."""
        cause = cause.split(": ", 1)[-1] if cause.startswith("rank ") else cause
        return _VOLATILE.sub("#", cause)

    def classify(self, exc: BaseException, step: int) -> Verdict:
        """Classify ``exc``, raised while the run was at optimizer step ``step``, and remember it."""
        verdict = classify(exc)
        key = (step, self.signature(verdict.cause))
        if not verdict.deterministic and key in self._seen:
            verdict = Verdict(FaultClass.DETERMINISTIC, verdict.type_name, verdict.cause,
                              f"the same fault repeated at step {step} after a restart")
        self._seen.add(key)
        return verdict
