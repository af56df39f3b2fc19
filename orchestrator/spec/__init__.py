"""Job and cluster specifications: YAML files validated with pydantic before anything starts.

A job file has the sections ``model``, ``data``, ``train``, ``parallel`` and ``checkpoint`` (plus ``name``
and ``seed``); a cluster file describes where the ranks run. Every unknown key is an error, every value is
type-checked, and the cross-field rules (layout product = device count, global batch divisible by
micro-batch size x data-parallel size, a dataset that exists, a model config that validates) run in
:func:`load_job` so that a bad file exits with one line naming the field before Ray or any rank starts
(docs/architecture.md section 3, "validates JobSpec + ClusterSpec before anything starts").
"""

from v4train.orchestrator.spec.cluster import ClusterSpec, HardwareSpec, RaySpec
from v4train.orchestrator.spec.files import (apply_overrides, dump_job, job_warnings, load_cluster, load_job,
                                             validate_against_cluster)
from v4train.orchestrator.spec.job import (CheckpointSpec, CurriculumSpec, DataSpec, JobSpec, ModelSpec, ParallelSpec,
                                           SpecError, SpikeGuardSpec, StageSpec, TrainSpec)

__all__ = ["SpecError", "ModelSpec", "DataSpec", "TrainSpec", "ParallelSpec", "CheckpointSpec", "StageSpec",
           "CurriculumSpec", "SpikeGuardSpec", "JobSpec", "ClusterSpec", "HardwareSpec", "RaySpec", "load_job",
           "load_cluster", "apply_overrides", "validate_against_cluster", "job_warnings", "dump_job"]
