"""Checkpoint save cost, side by side in one run, without Ray: throughput against a plain write, CPU and wall time
per phase, and what an asynchronous save costs the steps that follow it.

Four gloo processes hold a model preset as PP=2 x DP=2 would (each rank its pipeline stage's parameters and
optimizer state, data-parallel replicas written once) and save it round after round through the rank path
(``shard_state``, the host copy, the save on a save group, ``commit``: manifest, ``COMMIT``, publish, ``latest``,
each durable; retention's deletions run after, on a thread, as the coordinator's do),
alternating two record formats:

- *records*: ``dcp.save`` with DCP's filesystem writer, one ``torch.save`` record per tensor (the save path
  before raw records), hashed while written the same way; planned in full at every save;
- *raw*: v4train's save (``orchestrator/checkpoint/dcp_storage.py``): ``save`` without DCP's per-key wrapper,
  each rank's tensors as raw bytes in one file, one sequential stream, one fsync; the group's first save is
  DCP's, the later ones replay its layout (``save_plan.py``).

Each synchronous save is followed by a plain sequential write (+fsync) of the same number of bytes to the
same disk. Every phase's process CPU time (time.process_time: on a loaded machine wall time measures the
scheduler) and wall time are taken per rank: *plan* is ``dcp.save`` up to the write (DCP's per-key state dict
walk, local plan, the plan's gather/scatter on the save group), *write* this rank's file, *gather + finish* the
write results' gather, ``.metadata`` and the hashes file, *commit* the barrier and the coordinator's commit.
A replayed save has no *gather + finish*: its *plan* is the layout check and its one all-reduce, its *write*
includes rank 0's ``.metadata``.
The asynchronous part times a fixed CPU step (matrix products and a gradient-sized all-reduce on the default
group, like a training step's) on every rank: the median of steps with no save in flight, then the steps while
each asynchronous save persists (the rank's host copy written on a writer thread); their extra time over that
median, plus the time the request blocked, is the save's cost to training.

Usage: nice -n 19 python benchmarks/checkpoint_save.py [--rounds 3] [--presets nano,small] [--root runs]
Prints Markdown tables (paste into BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import os
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 4
WAYS = ("records", "raw")
# asynchronous saves: (record format, whether the writer thread runs at idle priority as RankCheckpointIO's does)
ASYNC_WAYS = (("records", False), ("raw", False), ("raw", True))
# phases timed per rank (the coordinator's global plan, finish and commit come on rank 0)
PHASES = ("state + copy", "plan", "write", "gather + finish", "commit")


def plain_write_s(path: Path, nbytes: int, cpu: list | None = None) -> float:
    """Seconds to write ``nbytes`` (whole MiB, at least one) of random bytes to ``path`` sequentially and fsync
    them: the baseline a checkpoint save is measured against. The file is removed after. The process CPU
    seconds it took are appended to ``cpu`` when given."""
    chunk = os.urandom(1 << 20)
    start, start_cpu = time.perf_counter(), time.process_time()
    with path.open("wb") as f:
        for _ in range(max(1, nbytes >> 20)):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    if cpu is not None:
        cpu.append(time.process_time() - start_cpu)
    path.unlink()
    return seconds


class _Clock:
    """Process CPU and wall seconds per phase of one save, phase after phase (``mark`` closes the running one)."""

    def __init__(self) -> None:
        self.cpu: collections.Counter = collections.Counter()
        self.wall: collections.Counter = collections.Counter()
        self.start()

    def start(self) -> None:
        self._cpu, self._wall = time.process_time(), time.perf_counter()

    def mark(self, phase: str) -> None:
        cpu, wall = time.process_time(), time.perf_counter()
        self.cpu[phase] += cpu - self._cpu
        self.wall[phase] += wall - self._wall
        self._cpu, self._wall = cpu, wall


def _writer(way: str, storage, attempt: str, clock: _Clock):
    """The storage writer of ``way``, marking the end of the plan phase when the write starts and of the write
    when it returns."""
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter
    from v4train.orchestrator.checkpoint.dcp_storage import HashingWriter

    class RecordsWriter(HashingWriter):
        """The writer before raw records: DCP's ``torch.save`` record per item, hashed while written."""

        def write_data(self, plan, planner):
            future = FsspecWriter.write_data(self, plan, planner)
            self._rank = int(plan.storage_data.prefix.strip("_"))
            self._record_hashes()
            return future

    writer = storage.dcp_writer(attempt)
    if way == "records":
        writer.__class__ = RecordsWriter

    def timed(inner):
        def call(*args, **kwargs):
            clock.mark("plan")
            try:
                return inner(*args, **kwargs)
            finally:
                clock.mark("write")
        return call

    writer.write_data = timed(writer.write_data)
    writer.write_cached = timed(writer.write_cached)  # a save of a cached layout: the write and .metadata
    return writer


class _Step:
    """A fixed CPU step: matrix products, then an all-reduce of a gradient-sized buffer on the default group."""

    def __init__(self, numel: int) -> None:
        g = torch.Generator().manual_seed(dist.get_rank())
        self.a = torch.randn(384, 384, generator=g)
        self.grad = torch.zeros(numel)

    def __call__(self) -> float:
        start = time.perf_counter()
        x = self.a
        for _ in range(96):
            x = torch.tanh(x @ self.a)
        dist.all_reduce(self.grad)
        return time.perf_counter() - start


def _rank(rank: int, root: str, preset: str, rounds: int, port: int, results) -> None:
    warnings.filterwarnings("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    from torch.distributed.checkpoint import save as dcp_save

    from v4train.model import ModelConfig, V4Stage
    from v4train.orchestrator import checkpoint
    from v4train.orchestrator.checkpoint import save_plan
    from v4train.orchestrator.checkpoint.dcp_storage import save as raw_save
    from v4train.orchestrator.checkpoint.storage import Storage
    from v4train.orchestrator.control.checkpointing import Retention
    from v4train.orchestrator.rank.checkpoint_io import background_priority
    from v4train.orchestrator.rank.saved_copies import SavedCopies
    from v4train.parallel.optim import build_optimizer

    stage = V4Stage(ModelConfig.preset(preset), pp_rank=rank % 2, pp_size=2)
    stage.init_weights(0)
    optimizer = build_optimizer(list(stage.named_parameters()), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95),
                                eps=1e-8)
    storage = Storage(root)
    retention = Retention(storage)
    group = dist.new_group(backend="gloo")  # the save group, as RankCheckpointIO makes one
    generations = {way: save_plan.new_generation() for way in WAYS}  # one plan cache per way, as per group
    saved = SavedCopies()
    writer_threads = {False: concurrent.futures.ThreadPoolExecutor(1),
                      True: concurrent.futures.ThreadPoolExecutor(1, initializer=background_priority)}
    numel = torch.tensor([sum(p.numel() for p in stage.parameters())])
    dist.all_reduce(numel, op=dist.ReduceOp.MAX)  # one gradient size on every rank (the larger stage's)
    step_fn = _Step(int(numel))
    n = 0

    def request(way: str, asynchronous: bool, clock: _Clock, idle: bool = False):
        """One save request as the trainer makes it; returns the future of an asynchronous one."""
        nonlocal n
        n += 1
        box = [checkpoint.begin_attempt(storage, n) if rank == 0 else None]
        dist.broadcast_object_list(box, 0, group=group)
        clock.start()
        state = checkpoint.shard_state(stage, optimizer)
        copy = saved.put(root, box[0], rank, state)
        clock.mark("state + copy")
        kwargs = dict(storage_writer=_writer(way, storage, box[0], clock),
                      planner=save_plan.CachedSavePlanner(generations[way]), process_group=group)
        save = dcp_save if way == "records" else raw_save
        if not asynchronous:
            save(copy, **kwargs)
            clock.mark("gather + finish")
            return None, box[0], n
        return writer_threads[idle].submit(save, copy, **kwargs), box[0], n

    def commit(attempt: str, step: int, clock: _Clock) -> None:
        """The coordinator's commit; the save is complete when it returns (COMMIT and ``latest`` durable).
        Retention then deletes the previous step on its thread, as the coordinator's does, and is waited for
        after the clock stops (before the plain write and the next save, so it overlaps neither)."""
        clock.start()
        dist.barrier(group=group)
        if rank == 0:
            checkpoint.commit(storage, attempt, step, {"step": step})
            retention.start(checkpoint.expired(storage, keep=1))
        clock.mark("commit")

    # synchronous saves: throughput and CPU per phase
    for _ in range(rounds):
        for way in WAYS:
            clock = _Clock()
            dist.barrier()
            start = time.perf_counter()
            _, attempt, step = request(way, False, clock)
            commit(attempt, step, clock)
            seconds = time.perf_counter() - start
            retention.wait()
            clocks = [None] * WORLD
            dist.all_gather_object(clocks, (dict(clock.cpu), dict(clock.wall)))
            if rank == 0:
                nbytes = sum(storage.files(checkpoint.step_name(step)).values())
                plain_cpu: list = []
                plain = plain_write_s(Path(root) / "plain.bin", nbytes, plain_cpu)
                results.put(("sync", way, nbytes, seconds, [c for c, _ in clocks], plain, plain_cpu[0],
                             [w for _, w in clocks]))
    # asynchronous saves: the extra time of the steps trained while each persists
    for _ in range(rounds):
        for way, idle in ASYNC_WAYS:
            quiet = [step_fn() for _ in range(3)]
            dist.barrier()
            start = time.perf_counter()
            future, attempt, step = request(way, True, _Clock(), idle)
            blocked = time.perf_counter() - start
            overlapped = []
            cpu0, thread0 = time.process_time(), time.thread_time()
            while True:
                overlapped.append(step_fn())
                flag = torch.tensor([0 if future.done() else 1])
                dist.all_reduce(flag)  # every rank steps until every rank's save has persisted
                if not flag.item():
                    break
            future.result()
            # CPU the save took in this process while those steps ran (all threads but the step's)
            background = (time.process_time() - cpu0) - (time.thread_time() - thread0)
            commit(attempt, step, _Clock())
            retention.wait()
            if rank == 0:
                results.put(("async", (way, idle), statistics.median(quiet), blocked, overlapped, background))
    dist.destroy_process_group()


def _run(preset: str, rounds: int, root_dir: str) -> list:
    from v4train.orchestrator.control.ray_group import free_port

    root = tempfile.mkdtemp(dir=root_dir)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, root, preset, rounds, port, results)) for r in range(WORLD)]
    for p in procs:
        p.start()
    rows = [results.get(timeout=3600) for _ in range(rounds * (len(WAYS) + len(ASYNC_WAYS)))]
    for p in procs:
        p.join(timeout=60)
    shutil.rmtree(root, ignore_errors=True)
    return rows


def _print(preset: str, rounds: int, rows: list) -> None:
    print(f"\n`{preset}`, PP=2 x DP=2, {rounds} rounds (medians); per phase: rank 0 (DCP's coordinator) / "
          "mean of ranks 1-3, CPU seconds then wall seconds\n")
    print("| save | checkpoint | save | plain write + fsync | ratio | CPU, 4 ranks | CPU, plain write | "
          + " | ".join(PHASES) + " |\n" + "|---" * (7 + len(PHASES)) + "|")
    for way in WAYS:
        mine = [r for r in rows if r[0] == "sync" and r[1] == way]
        nbytes = statistics.median(r[2] for r in mine)
        save_s = statistics.median(r[3] for r in mine)
        plain_s = statistics.median(r[5] for r in mine)
        ratio = statistics.median(r[5] / r[3] for r in mine)
        total = statistics.median(sum(sum(c.values()) for c in r[4]) for r in mine)
        plain_cpu = statistics.median(r[6] for r in mine)
        phases = []
        for phase in PHASES:
            cells = []
            for i in (4, 7):  # CPU, wall
                coord = statistics.median(r[i][0].get(phase, 0.0) for r in mine)
                others = statistics.median(statistics.fmean(c.get(phase, 0.0) for c in r[i][1:]) for r in mine)
                cells.append(f"{coord:.3f} / {others:.3f}")
            phases.append(" ; ".join(cells))
        print(f"| {way} | {nbytes / 1e6:.0f} MB | {nbytes / 1e6 / save_s:.0f} MB/s ({save_s:.2f} s) | "
              f"{nbytes / 1e6 / plain_s:.0f} MB/s ({plain_s:.2f} s) | {ratio:.2f} | {total:.2f} s | "
              f"{plain_cpu:.2f} s | " + " | ".join(phases) + " |")
    print("\n| asynchronous save | median step, none in flight | blocked by the request | steps overlapped | "
          "extra time of those steps | (blocked + extra) / step | save's CPU beside the steps, rank 0 |\n"
          "|---|---|---|---|---|---|---|")
    for way, idle in ASYNC_WAYS:
        mine = [r for r in rows if r[0] == "async" and r[1] == (way, idle)]
        step = statistics.median(r[2] for r in mine)
        blocked = statistics.median(r[3] for r in mine)
        extra = statistics.median(sum(s - r[2] for s in r[4]) for r in mine)
        steps = statistics.median(len(r[4]) for r in mine)
        print(f"| {way}, writer thread {'idle priority' if idle else 'normal priority'} | {step:.3f} s | "
              f"{blocked:.3f} s | {steps:.0f} | {extra:.3f} s | "
              f"{(blocked + extra) / step:.3f} | {statistics.median(r[5] for r in mine):.3f} s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--presets", default="nano,small", help="comma-separated model presets")
    parser.add_argument("--root", default="runs", help="directory on the disk to measure (a temporary root inside)")
    args = parser.parse_args()
    Path(args.root).mkdir(parents=True, exist_ok=True)
    print(f"load average (1 min) at the start: {os.getloadavg()[0]:.1f}")
    for preset in args.presets.split(","):
        _print(preset, args.rounds, _run(preset, args.rounds, args.root))
    print(f"\nload average (1 min) at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
