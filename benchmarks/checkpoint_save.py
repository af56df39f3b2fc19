"""Checkpoint save throughput by DCP shard serialisation, side by side in one run, without training or Ray.

Four gloo processes hold the ``nano`` model as PP=2 x DP=2 would (each rank its pipeline stage's parameters
and optimizer state, data-parallel replicas written once), and save it round after round into the same
checkpoint root through the whole rank path (``shard_state``, ``dcp.save`` with the hashing writer,
``commit``: manifest, publish, ``COMMIT``), alternating three ways of saving: what v4train does (one
``torch.save`` record per tensor), torch DCP's ``serialization_format=SAFETENSORS`` (one safetensors record
per rank, which the format could adopt), and DCP's save-plan caching (``DefaultSavePlanner(
enable_plan_caching=True)``: after the first save, unchanged plans are not gathered, deduplicated and
sent back again), to measure whether either would pay.
Each round also writes the same number of bytes as one plain sequential file (+fsync). Medians over the
rounds; the CPU seconds the four ranks spent in ``dcp.save`` are a less load-dependent view of the cost.

Usage: python benchmarks/checkpoint_save.py [--rounds 5] [--preset nano] [--root runs/ckpt-bench]
Prints a Markdown table (paste into BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint import DefaultSavePlanner
from torch.distributed.checkpoint.filesystem import SerializationFormat

WORLD = 4
# name: (DCP serialisation, DCP save-plan caching)
VARIANTS = {"v4train: one torch.save record per tensor": (SerializationFormat.TORCH_SAVE, False),
            "DCP option: one safetensors record per rank": (SerializationFormat.SAFETENSORS, False),
            "DCP option: save-plan caching": (SerializationFormat.TORCH_SAVE, True)}


def plain_write_s(path: Path, nbytes: int) -> float:
    """Seconds to write ``nbytes`` (whole MiB, at least one) of random bytes to ``path`` sequentially and fsync
    them: the baseline a checkpoint save is measured against. The file is removed after."""
    chunk = os.urandom(1 << 20)
    start = time.perf_counter()
    with path.open("wb") as f:
        for _ in range(max(1, nbytes >> 20)):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    path.unlink()
    return seconds


def _rank(rank: int, root: str, preset: str, rounds: int, port: int, results) -> None:
    warnings.filterwarnings("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    from v4train.model import ModelConfig, V4Stage
    from v4train.orchestrator import checkpoint
    from v4train.orchestrator.checkpoint.hashed_writer import HashingWriter
    from v4train.orchestrator.checkpoint.storage import Storage
    from v4train.parallel.optim import build_optimizer

    stage = V4Stage(ModelConfig.preset(preset), pp_rank=rank % 2, pp_size=2)
    stage.init_weights(0)
    optimizer = build_optimizer(list(stage.named_parameters()), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95),
                                eps=1e-8)
    storage = Storage(root)
    step = 0
    for _ in range(rounds):
        for name, (fmt, caching) in VARIANTS.items():
            step += 1
            dist.barrier()
            start = time.perf_counter()
            box = [checkpoint.begin_attempt(storage, step) if rank == 0 else None]
            dist.broadcast_object_list(box, 0)
            state = checkpoint.shard_state(stage, optimizer)
            cpu = time.process_time()
            dcp.save(state, storage_writer=HashingWriter(storage.url_of(box[0]), serialization_format=fmt),
                     planner=DefaultSavePlanner(enable_plan_caching=caching))
            cpu = time.process_time() - cpu
            dist.barrier()
            if rank == 0:
                checkpoint.commit(storage, box[0], step, {"step": step})
                checkpoint.apply_retention(storage, keep=1)
            seconds = time.perf_counter() - start
            cpus = [None] * WORLD
            dist.all_gather_object(cpus, cpu)
            if rank == 0:
                nbytes = sum(storage.files(checkpoint.step_name(step)).values())
                results.put((name, nbytes, seconds, sum(cpus), plain_write_s(Path(root) / "plain.bin", nbytes)))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--root", default="runs", help="directory on the disk to measure (a temporary root inside)")
    args = parser.parse_args()
    from v4train.orchestrator.control.ray_group import free_port

    Path(args.root).mkdir(parents=True, exist_ok=True)
    root = tempfile.mkdtemp(dir=args.root)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, root, args.preset, args.rounds, port, results)) for r in range(WORLD)]
    for p in procs:
        p.start()
    rows = [results.get(timeout=1800) for _ in range(args.rounds * len(VARIANTS))]
    for p in procs:
        p.join(timeout=60)
    shutil.rmtree(root, ignore_errors=True)
    print(f"| {args.preset}, PP=2 x DP=2, {args.rounds} rounds (medians) | checkpoint | save | plain write + fsync "
          "| ratio | CPU in dcp.save, 4 ranks |\n|---|---|---|---|---|---|")
    for name in VARIANTS:
        mine = [r for r in rows if r[0] == name]
        nbytes = statistics.median(r[1] for r in mine)
        save_s = statistics.median(r[2] for r in mine)
        plain_s = statistics.median(r[4] for r in mine)
        ratio = statistics.median(r[4] / r[2] for r in mine)
        print(f"| {name} | {nbytes / 1e6:.0f} MB | {nbytes / 1e6 / save_s:.0f} MB/s ({save_s:.2f} s) | "
              f"{nbytes / 1e6 / plain_s:.0f} MB/s | {ratio:.2f} | {statistics.median(r[3] for r in mine):.2f} s |")


if __name__ == "__main__":
    main()
