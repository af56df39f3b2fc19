"""The tiny V4 job, the shared pool of Ray rank workers and a Supervisor runner for end-to-end tests.

Starting ranks is the expensive part on a 2-core machine (each imports torch and Megatron-core), so the
multi-rank tests share one pool of four RankWorker actors (the ``rank_pool`` fixture in ``tests/conftest.py``);
each job re-initialises the process group and Megatron's groups on the first ``world_size`` actors. Every
call through the pool is bounded by a timeout, so a hang fails the test instead of waiting.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

POOL_SIZE = 4
CALL_TIMEOUT_S = 180.0

# A tiny V4 with every mechanism active (SWA, CSA, HCA, indexer, mHC, MoE, MTP): overrides of nano.
TINY_MODEL = {
    "preset": "nano",
    "dim": 64,
    "n_heads": 2,
    "head_dim": 32,
    "rope_head_dim": 8,
    "q_lora_rank": 32,
    "o_groups": 2,
    "o_lora_rank": 32,
    "window": 16,
    "n_routed_experts": 4,
    "n_activated_experts": 2,
    "moe_inter_dim": 64,
    "init_std": 0.02,
}


def stdlib_documents() -> list[str]:
    """Real English prose available offline: docstrings of the standard library's modules."""
    import argparse, collections, contextlib, dataclasses, functools, itertools, json as js, logging  # noqa: E401
    import pathlib, re, subprocess, textwrap, threading, unittest, urllib.request  # noqa: E401

    mods = [argparse, collections, contextlib, dataclasses, functools, itertools, js, logging, pathlib, re,
            subprocess, textwrap, threading, unittest, urllib.request]
    docs = []
    for mod in mods:
        parts = [inspect.getdoc(mod) or ""]
        for _, obj in inspect.getmembers(mod):
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", "") == mod.__name__:
                parts.append(inspect.getdoc(obj) or "")
        docs.append("\n\n".join(p for p in parts if p))
    return docs


def stdlib_dataset(out: Path, vocab_size: int = 8192, val_fraction: float = 0.1, documents=None,
                   tokenizer: Path | None = None) -> Path:
    """Prepare a dataset at ``out`` from ``documents`` (default: ``stdlib_documents()``), one text file each.

    The texts are written beside ``out`` (``<out>.docs/``). Either ``vocab_size`` trains a new tokenizer or
    ``tokenizer`` (a ``tokenizer.json``) reuses one. Returns ``out``.
    """
    from v4train.data.prepare import prepare_dataset

    docs_dir = out.parent / f"{out.name}.docs"
    docs_dir.mkdir(parents=True, exist_ok=True)
    inputs = []
    for i, text in enumerate(stdlib_documents() if documents is None else documents):
        path = docs_dir / f"doc{i:03d}.txt"
        path.write_text(text)
        inputs.append(path)
    prepare_dataset(out, inputs=inputs, vocab_size=vocab_size, tokenizer=tokenizer, val_fraction=val_fraction,
                    seed=0)
    return out


def tiny_job(dataset: Path, **sections) -> dict:
    """A job dict for the tiny model; keyword arguments update whole sections (e.g. parallel={...})."""
    job = {
        "name": "tiny",
        "seed": 7,
        "model": dict(TINY_MODEL),
        "data": {"path": str(dataset), "seq_len": 64},
        "train": {"steps": 3, "global_batch": 8, "micro_batch_size": 2, "lr": 3e-3, "warmup_steps": 1,
                  "max_restarts": 0, "eval_batches": 0},
        "parallel": {"tp": 1, "pp": 1, "ep": 1, "dp": 1},
        "checkpoint": {"every_steps": 0, "at_end": False},
        "spike_guard": {"enabled": False},
    }
    for key, value in sections.items():
        job[key] = {**job[key], **value} if isinstance(job.get(key), dict) else value
    return job


class RankPool:
    """Long-lived RankWorker actors shared by tests; a job that failed (and so killed its actors) is
    followed by fresh actors in the dead ones' places."""

    def __init__(self, size: int) -> None:
        from v4train.orchestrator.control.ray_group import RayRankGroup

        self.actors = RayRankGroup.create(size, CALL_TIMEOUT_S).actors

    def take(self, world: int):
        import ray

        from v4train.orchestrator.control.ray_group import RayRankGroup

        for i, actor in enumerate(self.actors[:world]):
            try:
                ray.get(actor.pid.remote(), timeout=60)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                self.actors[i] = RayRankGroup.create(1, CALL_TIMEOUT_S).actors[0]
        return RayRankGroup(self.actors[:world], CALL_TIMEOUT_S, owned=False)

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)


def run_job(pool, job: dict, run_dir: Path, resume_from: str | None = None, faults=(), make_workers=None,
            expect_failure: bool = False):
    """Run `job` through the real Supervisor, by default on the first world_size actors of the pool.

    `resume_from` names a committed step directory under the run directory. Returns (metrics records,
    events, supervisor); fails the test with the rank's root cause if the run fails unexpectedly.
    """
    from v4train.orchestrator.spec import ClusterSpec, JobSpec
    from v4train.orchestrator.control.supervisor import Phase, Supervisor
    from v4train.orchestrator.control.telemetry import Telemetry

    spec = JobSpec.model_validate(job)
    world = spec.parallel.world_size
    cluster = ClusterSpec(name="pool", devices_per_node=world, collective_timeout_s=120)
    if make_workers is None:
        def make_workers():
            return pool.take(world)
    telemetry = Telemetry(run_dir, spec.train.steps, live=False)
    supervisor = Supervisor(spec, cluster, str(run_dir), make_workers, telemetry, resume_from=resume_from,
                            faults=list(faults))
    try:
        phase = supervisor.run()
    finally:
        telemetry.close()
    if expect_failure:
        assert phase is Phase.FAILED
    else:
        assert phase is Phase.FINISHED, f"run failed: {supervisor.failure}"
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()] \
        if (run_dir / "metrics.jsonl").exists() else []
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    return metrics, events, supervisor
