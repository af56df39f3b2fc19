"""Muon's cost on the nano model: distributed over DP ranks, against torch.optim.Muon, batched vs one by one.

    python benchmarks/muon_distributed.py                    # DP 1, 2, 4; 3 timed steps each
    python benchmarks/muon_distributed.py --dp 1 2 --steps 2 --out muon.json

All in one run, on the nano model's Muon matrices (one pipeline stage, gradients of one real forward and
backward on random tokens, the same on every rank as after the data-parallel all-reduce):

1. **Step time per rank at DP = 1, 2, 4.** DP gloo ranks (one thread each) run
   :class:`parallel.distributed_muon.DistributedMuon`; each step starts after a barrier and is timed on
   every rank, wall-clock and the rank's CPU time (``time.process_time``, all its threads). The
   simulated cluster shares the machine's cores, so with more ranks than cores the wall time also
   counts waiting for a core; the CPU time is the work a rank does. Medians over ``--steps`` after one
   warm-up step; the slowest rank is reported.
2. **Against torch.optim.Muon** at DP = 1 (one thread): one optimizer step over the same parameters
   with the same 10 Newton-Schulz iterations in bf16 (torch's Muon always iterates in bf16; ours with
   ``ns_dtype=torch.bfloat16``), and ours in fp32. torch's Muon orthogonalises each parameter whole, ours
   each ``muon_split`` block (V4's rule), so the Newton-Schulz part is also timed on identical blocks.
3. **Batched against one-by-one** Newton-Schulz on the same blocks (same-shape blocks stacked into one
   ``bmm`` chain, or one call per block), fp32 and bf16.

Parts 2 and 3 report CPU seconds of this process (one thread), the variants called in turn each round
(medians over ``--steps`` rounds after a warm-up round), so load on a shared machine reaches all alike.
4. **bf16 orthogonality.** Singular values of the Newton-Schulz output of every block in fp32 and in
   bf16 (smallest, median, largest over all blocks), and the largest relative difference between them.
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from v4train.model import V4Stage  # noqa: E402
from v4train.orchestrator.control.rendezvous import free_port  # noqa: E402
from v4train.model.config import ModelConfig  # noqa: E402
from v4train.parallel.distributed_muon import DistributedMuon  # noqa: E402
from v4train.parallel.muon import V4_NS_STEPS, Muon, hybrid_newton_schulz  # noqa: E402
from v4train.parallel.optim import build_optimizer  # noqa: E402

RANK_HANG_S = 900
SEQ = 128


def _stage_with_grads() -> tuple[V4Stage, list[tuple[str, torch.nn.Parameter]]]:
    """The nano stage (seed 0) after one forward/backward on seeded random tokens, and its Muon params."""
    torch.manual_seed(0)
    cfg = ModelConfig.preset("nano")
    stage = V4Stage(cfg, pp_rank=0, pp_size=1)
    stage.init_weights(0)
    stage.attention_mode = "dense"
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (1, SEQ + 1), generator=gen)
    pos = torch.arange(SEQ).unsqueeze(0)
    stage(ids[:, :-1], pos, ids[:, 1:]).mean().backward()
    # matrices the dense-attention forward does not reach (the Lightning Indexer) get seeded noise
    for p in stage.parameters():
        if p.grad is None:
            p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    hybrid = build_optimizer(stage.named_parameters(), algorithm="muon", lr=1e-3, weight_decay=0.1, eps=1e-20)
    muon_ids = {id(p) for g in hybrid.optimizers[0].param_groups for p in g["params"]}
    return stage, [(n, p) for n, p in stage.named_parameters() if id(p) in muon_ids]


def _rank(rank: int, port: int, world: int, steps: int, out_dir: str) -> None:
    faulthandler.dump_traceback_later(RANK_HANG_S, exit=True)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    try:
        _, named = _stage_with_grads()
        params = [p for _, p in named]
        dense = [p for n, p in named if ".ffn.experts." not in n]
        experts = [p for n, p in named if ".ffn.experts." in n]
        # ep = 1: the expert-data-parallel group is the data-parallel group
        opt = DistributedMuon(params, lr=1e-3, weight_decay=0.1,
                              shard_groups=[(dist.group.WORLD, dense), (dist.group.WORLD, experts)])
        wall, cpu = [], []
        for i in range(steps + 1):
            dist.barrier()
            w0, c0 = time.perf_counter(), time.process_time()
            opt.step()
            if i:  # the first step allocates the momentum
                wall.append(time.perf_counter() - w0)
                cpu.append(time.process_time() - c0)
        owned = sum(o for o, _ in opt.owned_flops())
        total = sum(t for _, t in opt.owned_flops())
        momentum = sum(s["momentum_buffer"].numel() for s in opt.state.values() if "momentum_buffer" in s)
        json.dump({"wall_s": statistics.median(wall), "cpu_s": statistics.median(cpu),
                   "flops_share": owned / total, "momentum_elements": momentum,
                   "matrices": len(params)}, open(f"{out_dir}/dp{world}_rank{rank}.json", "w"))
    finally:
        dist.destroy_process_group()
        faulthandler.cancel_dump_traceback_later()


def _interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median CPU seconds of each of ``fns``, called in turn ``repeats`` times after one warm-up round, so a
    change in the machine's load during the run reaches every variant alike."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.process_time()
            fn()
            times[name].append(time.process_time() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _single_process(steps: int) -> dict:
    """Parts 2-4 in this process, one thread."""
    torch.set_num_threads(1)
    stage, named = _stage_with_grads()
    params = [p for _, p in named]
    grads = [p.grad.clone() for p in params]

    torch_muon_steps = len(V4_NS_STEPS)
    # the parameters keep the same gradients, so every step of an optimizer costs the same
    out = {f"{name}_s": t for name, t in _interleaved({
        "torch_muon_bf16": torch.optim.Muon(params, lr=1e-3, ns_steps=torch_muon_steps).step,
        "ours_bf16": Muon(params, lr=1e-3, ns_dtype=torch.bfloat16).step,
        "ours_fp32": Muon(params, lr=1e-3).step,
    }, steps).items()}
    # the same blocks for every Newton-Schulz comparison: each parameter's muon_split blocks
    blocks = []
    for p, g in zip(params, grads, strict=True):
        split = getattr(p, "muon_split", None)
        blocks.extend(split.blocks(g) if split is not None else [g])
    by_shape = defaultdict(list)
    for b in blocks:
        by_shape[tuple(b.shape)].append(b)
    stacks = [torch.stack(bs) for bs in by_shape.values()]
    from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, EPS, _zeropower_via_newtonschulz

    out["blocks"] = len(blocks)
    out["shapes"] = {"x".join(map(str, s)): len(bs) for s, bs in by_shape.items()}
    ns = {"ns_torch_bf16": lambda: [_zeropower_via_newtonschulz(
        b, (DEFAULT_A, DEFAULT_B, DEFAULT_C), torch_muon_steps, EPS) for b in blocks]}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        ns[f"ns_batched_{name}"] = lambda dtype=dtype: [hybrid_newton_schulz(s, compute_dtype=dtype) for s in stacks]
        ns[f"ns_one_by_one_{name}"] = lambda dtype=dtype: [hybrid_newton_schulz(b, compute_dtype=dtype)
                                                           for b in blocks]
    out.update({f"{name}_s": t for name, t in _interleaved(ns, steps).items()})
    sv = {}
    outs = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        outs[name] = [hybrid_newton_schulz(b, compute_dtype=dtype) for b in blocks]
        s = torch.cat([torch.linalg.svdvals(o.double()) for o in outs[name]])
        sv[name] = {"min": s.min().item(), "median": s.median().item(), "max": s.max().item()}
    out["singular_values"] = sv
    out["bf16_vs_fp32_max_rel_diff"] = max(((a - b).norm() / b.norm()).item()
                                           for a, b in zip(outs["bf16"], outs["fp32"], strict=True))
    # the covered part (sigma / ||M||_F >= 1e-3, spec 10.3 item 4): how far from 1 in each precision
    for name in ("fp32", "bf16"):
        dev = []
        for b, o in zip(blocks, outs[name], strict=True):
            src = torch.linalg.svdvals(b.double())
            covered = src / src.norm() >= 1e-3
            dev.append((torch.linalg.svdvals(o.double())[covered] - 1).abs().max().item() if covered.any() else 0.0)
        out[f"covered_max_abs_sigma_minus_1_{name}"] = max(dev)
    del stage
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    result = {"dp": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.dp:
            mp.start_processes(_rank, args=(free_port(), world, args.steps, tmp), nprocs=world, join=True,
                               start_method="spawn")
            ranks = [json.load(open(f"{tmp}/dp{world}_rank{r}.json")) for r in range(world)]
            result["dp"][world] = r = {
                "wall_s_slowest": max(r["wall_s"] for r in ranks),
                "cpu_s_slowest": max(r["cpu_s"] for r in ranks),
                "flops_share_largest": max(r["flops_share"] for r in ranks),
                "momentum_elements_largest": max(r["momentum_elements"] for r in ranks),
                "matrices": ranks[0]["matrices"],
            }
            print(f"DP {world}: {json.dumps(r)}", flush=True)
    result["single"] = _single_process(args.steps)
    base = result["dp"].get(1)
    print("| DP | wall s / rank (slowest) | CPU s / rank (slowest) | wall vs DP 1 | CPU vs DP 1 "
          "| largest FLOPs share | momentum elements (largest rank) |")
    print("|---|---|---|---|---|---|---|")
    for world, r in result["dp"].items():
        rel = (f"{r['wall_s_slowest'] / base['wall_s_slowest']:.2f}x | "
               f"{r['cpu_s_slowest'] / base['cpu_s_slowest']:.2f}x"
               if base else "- | -")
        print(f"| {world} | {r['wall_s_slowest']:.3f} | {r['cpu_s_slowest']:.3f} | {rel} | "
              f"{r['flops_share_largest']:.3f} | {r['momentum_elements_largest']:,} |")
    s = result["single"]
    print(f"\nDP 1, one thread, one optimizer step over {base['matrices'] if base else '?'} matrices "
          f"({s['blocks']} blocks {s['shapes']}):")
    print(f"  torch.optim.Muon bf16 10 it: {s['torch_muon_bf16_s']:.3f} s   ours bf16: {s['ours_bf16_s']:.3f} s "
          f"({s['ours_bf16_s'] / s['torch_muon_bf16_s']:.2f}x)   ours fp32: {s['ours_fp32_s']:.3f} s")
    print(f"  Newton-Schulz on the same blocks: torch bf16 one by one {s['ns_torch_bf16_s']:.3f} s; ours "
          f"batched fp32 {s['ns_batched_fp32_s']:.3f} s, one by one fp32 {s['ns_one_by_one_fp32_s']:.3f} s; "
          f"batched bf16 {s['ns_batched_bf16_s']:.3f} s, one by one bf16 {s['ns_one_by_one_bf16_s']:.3f} s")
    for name in ("fp32", "bf16"):
        sv = s["singular_values"][name]
        print(f"  {name}: singular values min {sv['min']:.4f} median {sv['median']:.4f} max {sv['max']:.4f}; "
              f"covered part max |sigma - 1| {s[f'covered_max_abs_sigma_minus_1_{name}']:.4f}")
    print(f"  bf16 vs fp32 output: largest relative difference {s['bf16_vs_fp32_max_rel_diff']:.4f}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
