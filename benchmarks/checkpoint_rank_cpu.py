"""The process CPU of one rank's checkpoint save and of the commit, without the noise of four processes meeting in
collectives on a loaded machine: one process in a gloo world of one (so it is also DCP's coordinator, writing
``.metadata``), ``nano``'s second pipeline stage (643 tensors, 81.5 MB) saved ``--saves`` times as a rank saves:
its host copy (``SavedCopies.put``), then ``dcp_storage.save`` of that copy with one save group's
``CachedSavePlanner`` (as ``RankCheckpointIO`` saves); each save then committed (manifest, ``COMMIT``,
``latest``), and retention ``keep=1`` run after it (timed apart: the coordinator runs it off the commit's path).

Run it with ``PYTHONPATH`` pointing at another checkout's parent (a directory holding it as ``v4train``) to
measure that code instead: ``git archive main | tar -x -C /tmp/main/v4train``, then
``PYTHONPATH=/tmp/main python benchmarks/checkpoint_rank_cpu.py``.

Usage: nice -n 19 python benchmarks/checkpoint_rank_cpu.py [--saves 7] [--root runs]
Prints one line: the code measured, medians (and minima) of the copy's, the save's, the commit's and retention's CPU
seconds, the first two saves left out (the first is DCP's full save), and the load average.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings

import torch
import torch.distributed as dist


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saves", type=int, default=7)
    parser.add_argument("--root", default="runs", help="directory on the disk to measure (a temporary root inside)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    from v4train.model import ModelConfig, V4Stage
    from v4train.orchestrator import checkpoint
    from v4train.orchestrator.checkpoint import save_plan
    from v4train.orchestrator.checkpoint.dcp_storage import save
    from v4train.orchestrator.checkpoint.storage import Storage
    from v4train.orchestrator.control.ray_group import free_port
    from v4train.orchestrator.rank.saved_copies import SavedCopies
    from v4train.parallel.optim import build_optimizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    stage = V4Stage(ModelConfig.preset("nano"), pp_rank=1, pp_size=2)
    stage.init_weights(0)
    optimizer = build_optimizer(list(stage.named_parameters()), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95),
                                eps=1e-8)
    live = checkpoint.shard_state(stage, optimizer)
    copies = SavedCopies()
    os.makedirs(args.root, exist_ok=True)
    root = tempfile.mkdtemp(dir=args.root)
    storage = Storage(root)
    group, generation = dist.new_group(backend="gloo"), save_plan.new_generation()
    cpu: dict[str, list[float]] = {"copy": [], "save": [], "commit": [], "retention": []}
    for step in range(1, args.saves + 1):
        attempt = checkpoint.begin_attempt(storage, step)
        marks = [time.process_time()]
        state = copies.put(storage.url, attempt, 0, live)
        marks.append(time.process_time())
        save(state, storage.dcp_writer(attempt), planner=save_plan.CachedSavePlanner(generation), process_group=group)
        marks.append(time.process_time())
        checkpoint.commit(storage, attempt, step, {"step": step})
        marks.append(time.process_time())
        checkpoint.apply_retention(storage, keep=1)
        marks.append(time.process_time())
        for phase, start, end in zip(cpu, marks, marks[1:]):
            cpu[phase].append(end - start)
    dist.destroy_process_group()
    shutil.rmtree(root, ignore_errors=True)
    code = sys.modules[save.__module__].__file__.rsplit("/orchestrator/", 1)[0]
    nbytes = sum(v.numel() * v.element_size() for v in state.values())
    print(f"{code}: {len(state)} tensors, {nbytes / 1e6:.1f} MB; CPU-s, median (min): " + ", ".join(
        f"{phase} {statistics.median(v[2:]):.3f} ({min(v[2:]):.3f})" for phase, v in cpu.items())
        + f"; load average (1 min) {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
