"""Benchmark: where one PP1 training step of the ``nano`` model goes, part by part.

One rank, the whole model (pp = 1), ``--micro-batches`` micro-batches of ``--micro-batch-size`` x
``--seq-len`` random tokens (the demo's shape: 2 x 4 x 256), forward + backward in sparse attention
mode (MTP on, weight 0.3), then the Muon + AdamW step, on ``--threads`` CPU threads, with glibc's malloc
set as a rank process sets it (``orchestrator/rank/host_allocator.py``; ``--glibc-malloc-defaults`` leaves
glibc's defaults). After a warm-up step, ``--repeats`` steps run under ``torch.profiler`` and every
operator's own CPU time is charged to one part:

* forward operators to the innermost labelled region they run in: ``attention`` (the
  ``Attention`` modules), ``moe`` (``MoE``), ``mhc`` (the hyper-connection reads and writes,
  ``HyperHead``), ``head+loss`` (final norm, vocabulary head, cross-entropy, main and MTP),
  ``mtp`` (the rest of the MTP block), ``embed``, ``optimizer``;
* backward operators (including recomputations) to the part of the forward operator whose autograd
  node they run for (the profiler's sequence numbers link the two);
* the rest (Python between operators, unlinked backward nodes) is ``other``.

Prints one markdown table (seconds per step, share of the step's wall time, and CPU seconds per step:
the share times the CPU time of an unprofiled step); ``--json`` writes it.

    python benchmarks/step_profile.py --json runs/bench/step_profile.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from v4train.model import ModelConfig, V4Stage
from v4train.model import block as block_module
from v4train.model import mhc as mhc_module
from v4train.model import transformer as transformer_module
from v4train.model.attention import Attention
from v4train.model.moe import MoE
from v4train.model.mtp import MTPBlock
from v4train.orchestrator.rank import host_allocator
from v4train.parallel.optim import build_optimizer

PARTS = ("attention", "moe", "mhc", "head+loss", "mtp", "embed", "optimizer", "other")


def _label_module(module: torch.nn.Module, label: str) -> None:
    """Run ``module``'s forward inside ``record_function("part::<label>")``."""
    stack = []

    def enter(_module, _args):
        region = record_function(f"part::{label}")
        region.__enter__()
        stack.append(region)

    def leave(_module, _args, _out):
        stack.pop().__exit__(None, None, None)

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave)


def _labelled(fn, label: str):
    def wrapper(*args, **kwargs):
        with record_function(f"part::{label}"):
            return fn(*args, **kwargs)
    return wrapper


def _install_labels(stage: V4Stage) -> None:
    """Label the parts (module docstring). Functions are wrapped where the model looks them up."""
    for module in stage.modules():
        if isinstance(module, Attention):
            _label_module(module, "attention")
        elif isinstance(module, MoE):
            _label_module(module, "moe")
        elif isinstance(module, MTPBlock):
            _label_module(module, "mtp")
        elif isinstance(module, mhc_module.HyperHead):
            _label_module(module, "mhc")
    _label_module(stage.embed, "embed")
    for mtp in stage.mtp.values():
        _label_module(mtp.norm, "head+loss")
    _label_module(stage.norm, "head+loss")
    _label_module(stage.head, "head+loss")
    mhc_module.HyperConnection.read = _labelled(mhc_module.HyperConnection.read, "mhc")
    block_module.hc_write = _labelled(block_module.hc_write, "mhc")
    # the loss: the unfused cross-entropy, or the fused head + loss where the stage has one
    for name in ("vocab_cross_entropy", "fused_head_loss"):
        if hasattr(transformer_module, name):
            setattr(transformer_module, name, _labelled(getattr(transformer_module, name), "head+loss"))


def _attribute(events, wall_s: float, steps: int) -> dict[str, float]:
    """Seconds per step of each part (module docstring) from the profiler's events."""
    regions = sorted((e.time_range.start, e.time_range.end, e.name[len("part::"):])
                     for e in events if e.name.startswith("part::"))

    def region_of(t: float) -> str | None:
        best = None
        for start, end, label in regions:  # innermost = latest start that still contains t
            if start > t:
                break
            if end >= t:
                best = label
        return best

    def backward_node(e):
        while e is not None:
            if e.name.startswith("autograd::engine::evaluate_function"):
                return e
            e = e.cpu_parent
        return None

    seq_part: dict[int, str] = {}
    for e in events:
        if e.sequence_nr >= 0 and backward_node(e) is None and not e.name.startswith("part::"):
            label = region_of(e.time_range.start)
            if label is not None:
                seq_part.setdefault(e.sequence_nr, label)
    totals = dict.fromkeys(PARTS, 0.0)
    for e in events:
        if e.name.startswith("part::") or e.name.startswith("ProfilerStep"):
            continue
        node = backward_node(e)
        label = seq_part.get(node.sequence_nr) if node is not None else region_of(e.time_range.start)
        totals[label or "other"] += e.self_cpu_time_total / 1e6
    totals = {k: v / steps for k, v in totals.items()}
    totals["other"] += wall_s - sum(totals.values())  # Python between operators, profiler gaps
    return totals


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--glibc-malloc-defaults", action="store_true",
                        help="leave glibc's malloc as it is, instead of the rank's setting (host_allocator.py)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.glibc_malloc_defaults:
        host_allocator.keep_freed_memory()  # as every rank process does
    cfg = ModelConfig.preset("nano")
    stage = V4Stage(cfg, pp_rank=0, pp_size=1)
    stage.init_weights(0)
    stage.train()
    stage.attention_mode = "sparse"
    stage.aux_loss_scale = 1.0 / args.micro_batches
    optimizer = build_optimizer(stage.named_parameters(), algorithm="muon", lr=1e-3, weight_decay=0.1, eps=1e-8)
    gen = torch.Generator().manual_seed(0)
    B, S = args.micro_batch_size, args.seq_len
    micro = []
    for _ in range(args.micro_batches):
        ids = torch.randint(0, cfg.vocab_size, (B, S), generator=gen)
        labels = torch.roll(ids, -1, dims=1)
        labels[:, -1] = -100
        micro.append((ids, torch.arange(S).repeat(B, 1), labels))

    def step():
        optimizer.zero_grad(set_to_none=True)
        for ids, pos, labels in micro:
            (stage(ids, pos, labels).mean() / len(micro)).backward()
        with record_function("part::optimizer"):
            optimizer.step()
        stage.pop_aux_metrics()

    _install_labels(stage)
    step()  # warm-up: lazy initialisations, optimizer state
    walls = []
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            step()
            walls.append(time.perf_counter() - t0)
    wall_s = sum(walls) / len(walls)
    parts = _attribute(prof.events(), wall_s, args.repeats)
    # the same steps without the profiler: its overhead is in `other` above, reported apart
    plain, plain_cpu = [], []
    for _ in range(args.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        plain.append(time.perf_counter() - t0)
        plain_cpu.append(time.process_time() - c0)
    cpu_s = statistics.median(plain_cpu)
    # CPU seconds per part: the part's profiled share of the step times the unprofiled step's CPU time
    # (on a loaded machine wall times include waiting for a core; CPU time does not)
    parts_cpu = {part: cpu_s * parts[part] / wall_s for part in PARTS}
    result = {"step_s_profiled": wall_s, "step_s": statistics.median(plain), "step_cpu_s": cpu_s,
              "parts_s": parts, "parts_cpu_s": parts_cpu,
              "shape": {"micro_batches": args.micro_batches, "micro_batch_size": B, "seq_len": S,
                        "threads": args.threads}}
    print("| part | s / step (profiled) | share | CPU s / step |\n|---|---|---|---|")
    for part in PARTS:
        print(f"| {part} | {parts[part]:.3f} | {100 * parts[part] / wall_s:.1f}% | {parts_cpu[part]:.3f} |")
    print(f"| step (profiled) | {wall_s:.3f} | 100% | |\n"
          f"| step (not profiled, median) | {result['step_s']:.3f} | | {cpu_s:.3f} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
