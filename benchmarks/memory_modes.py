"""What the memory options buy on the simulated cluster: optimizer state per rank under the distributed optimizer,
and peak resident memory and step time per recompute mode, each beside `v4train plan`'s figure.

    python benchmarks/memory_modes.py                                   # both sections, seq 1024
    python benchmarks/memory_modes.py --sections recompute --seqs 1024,4096 --steps 4 --json out.json

``optimizer``: DP = 1, 2, 4 gloo ranks (spawned processes) each build the ``nano`` stage and the job's optimizer
(Muon + AdamW) with and without ``train.distributed_optimizer`` (dense parameters over the data-parallel group,
routed experts over the expert-data-parallel group, here the same group: AdamW moments in equal element ranges,
Muon matrices whole by the FLOP-balanced partition), take one step on random gradients and count the bytes of
their optimizer state (moments and momentum; step counters left out).

``recompute``: for each sequence length and ``train.recompute`` mode, one run of ``v4train submit`` on
``clusters/local-sim-1.yaml`` (one Ray rank worker; ``nano``, micro-batch 1, global batch 1, no evaluation or
checkpoint) for ``--steps`` steps. Reported: the rank's peak RSS (``peak_rss_mb``, ru_maxrss), the median
in-rank step time after the first step, and ``v4train plan``'s peak for the same job and cluster. The modes
run one after the other in fresh processes; the machine's other load is not controlled, so step times carry
its noise.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


# ------------------------------------------------------------------ optimizer state
def _state_bytes(optimizer) -> int:
    opts = getattr(optimizer, "optimizers", [optimizer])
    return sum(v.numel() * v.element_size() for opt in opts for state in opt.state.values()
               for k, v in state.items() if k != "step")


def _optimizer_rank(rank: int, port: int, world: int, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    from v4train.model import ModelConfig, V4Stage
    from v4train.parallel.mixed_precision import MixedPrecision
    from v4train.parallel.optim import build_optimizer

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    try:
        out = {}
        for precision in ("fp32", "bf16"):
            for distributed in (False, True):
                torch.manual_seed(0)
                stage = V4Stage(ModelConfig.preset("nano"), pp_rank=0, pp_size=1)
                named = list(stage.named_parameters())
                dense = [p for n, p in named if ".ffn.experts." not in n]
                expert = [p for n, p in named if ".ffn.experts." in n]
                groups = [(dist.group.WORLD, dense), (dist.group.WORLD, expert)] if distributed else None
                opt = build_optimizer(named, algorithm="muon", lr=1e-3, weight_decay=0.1, eps=1e-20,
                                      muon_shard_groups=groups, adamw_shard_groups=groups)
                mp = MixedPrecision(stage, precision, opt.optimizers if distributed else ())
                gen = torch.Generator().manual_seed(1)
                for _, p in named:
                    p.grad = torch.randn(p.shape, generator=gen)
                opt.step()
                sharded = mp.sharded is not None and bool(mp.sharded.params)
                # the parameters' own storage (fp32 values, or a sharded one's 4-byte placeholder), the bf16 copies
                # (kept between steps when sharded, made for each step's forward and backward otherwise) and the
                # sharded fp32 masters
                weights = sum(p.untyped_storage().nbytes() for _, p in named)
                weights += sum(t.numel() * 2 for t in mp.sharded.bf16.values()) if sharded else \
                    sum(p.numel() * 2 for p in mp.params)
                weights += mp.sharded.master_bytes() if sharded else 0
                out[f"{precision}_{'distributed' if distributed else 'plain'}"] = {
                    "weights": weights, "gradients": sum(p.grad.numel() * 4 for _, p in named),
                    "optimizer": _state_bytes(opt)}
        out["parameters"] = sum(p.numel() for _, p in named)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


def _planned(dp: int, precision: str, distributed: bool) -> dict:
    """``v4train plan``'s parameter, gradient and optimizer terms for the nano stage at DP ``dp`` (one stage)."""
    from v4train.model import ModelConfig
    from v4train.orchestrator.tools.plan import Layout, optimizer_bytes, parameter_bytes, stage_parameters

    cfg, layout = ModelConfig.preset("nano"), Layout(1, 1, 1, dp, 1)
    ((_, dense, expert),) = stage_parameters(cfg, 1)
    return {"weights": parameter_bytes(cfg, layout, precision, distributed)[0], "gradients": 4 * (dense + expert),
            "optimizer": optimizer_bytes(cfg, layout, distributed)[0]}


def optimizer_section() -> list[dict]:
    from support.spawn import free_ports, spawn_ranks

    rows = []
    for dp in (1, 2, 4):
        out = Path(tempfile.mkdtemp(prefix="v4train-optstate-"))
        try:
            spawn_ranks(_optimizer_rank, (free_ports(1)[0], dp, str(out)), dp, 900, f"optimizer ranks dp{dp}")
            ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(dp)]
        finally:
            shutil.rmtree(out, ignore_errors=True)
        for precision in ("fp32", "bf16"):
            for distributed in (False, True):
                key = f"{precision}_{'distributed' if distributed else 'plain'}"
                largest = max(ranks, key=lambda r: sum(r[key].values()))[key]
                rows.append({"dp": dp, "precision": precision, "distributed": distributed, **largest,
                             "total": sum(largest.values()),
                             "smallest_total": min(sum(r[key].values()) for r in ranks),
                             "planned": _planned(dp, precision, distributed), "parameters": ranks[0]["parameters"]})
                print(f"dp {dp} {key}: {rows[-1]}", flush=True)
    return rows


# ------------------------------------------------------------------ recompute
def _dataset(tmp: Path) -> Path:
    from support.jobs import stdlib_dataset

    return stdlib_dataset(tmp / "dataset", vocab_size=2048, val_fraction=0.05)


def _job(data: Path, seq: int, steps: int, recompute: str, precision: str) -> dict:
    return {"name": f"mem-{recompute}-{seq}-{precision}", "seed": 0, "model": {"preset": "nano"},
            "data": {"path": str(data), "seq_len": seq},
            "train": {"steps": steps, "global_batch": 1, "micro_batch_size": 1, "lr": 1e-3, "warmup_steps": 0,
                      "eval_batches": 0, "max_restarts": 0, "recompute": recompute, "precision": precision},
            "parallel": {"tp": 1, "pp": 1, "ep": 1, "dp": 1},
            "checkpoint": {"every_steps": 0, "at_end": False}, "spike_guard": {"enabled": False}}


def recompute_section(tmp: Path, seqs: list[int], steps: int, timeout: float,
                      precisions: list[str] = ("fp32",),
                      modes: list[str] = ("none", "selective", "full")) -> list[dict]:
    from v4train.orchestrator.spec import load_cluster
    from v4train.orchestrator.tools.plan import Layout, plan_job
    from v4train.orchestrator.tools.plan_cli import load_job_for_plan

    data = _dataset(tmp)
    cluster = load_cluster(ROOT / "clusters" / "local-sim-1.yaml")
    rows = []
    for precision, seq, mode in itertools.product(precisions, seqs, modes):
        path = tmp / f"job-{mode}-{seq}-{precision}.yaml"
        path.write_text(yaml.safe_dump(_job(data, seq, steps, mode, precision)))
        run = tmp / f"run-{mode}-{seq}-{precision}"
        cmd = [sys.executable, "-m", "v4train.orchestrator.tools.cli", "submit", str(path), "--cluster",
               str(ROOT / "clusters" / "local-sim-1.yaml"), "--run-dir", str(run), "--overwrite"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{mode} seq {seq} failed ({proc.returncode}): {proc.stderr[-2000:]}")
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        job, cfg, par = load_job_for_plan(str(path), [])
        plan = plan_job(cfg, job, cluster, Layout(1, 1, 1, 1, 1, mode))
        rows.append({"seq": seq, "precision": precision, "recompute": mode,
                     "peak_rss_mb": max(m["peak_rss_mb"] for m in metrics),
                     "step_time_s": statistics.median(m["step_time_s"] for m in metrics[1:]),
                     "planned_mb": plan.peak.total / 2**20, "final_loss": metrics[-1]["loss"]})
        print(f"seq {seq} {precision} {mode}: {rows[-1]}", flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", default="optimizer,recompute")
    parser.add_argument("--seqs", default="1024", help="comma-separated sequence lengths (recompute section)")
    parser.add_argument("--precisions", default="fp32", help="comma-separated train.precision values (recompute)")
    parser.add_argument("--modes", default="none,selective,full", help="train.recompute modes (recompute section)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per run")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    sections = args.sections.split(",")
    results = {}
    tmp = Path(tempfile.mkdtemp(prefix="v4train-mem-"))
    try:
        if "optimizer" in sections:
            results["optimizer"] = rows = optimizer_section()
            mib = 2 ** 20
            print("\n| DP | precision | distributed optimizer | weights | gradients | optimizer | total (largest rank) "
                  "| smallest rank | planned weights | planned total |")
            print("|---|---|---|---|---|---|---|---|---|---|")
            for r in rows:
                p = r["planned"]
                print(f"| {r['dp']} | {r['precision']} | {'yes' if r['distributed'] else 'no'} "
                      f"| {r['weights'] / mib:.1f} MiB | {r['gradients'] / mib:.1f} MiB "
                      f"| {r['optimizer'] / mib:.1f} MiB "
                      f"| {r['total'] / mib:.1f} MiB | {r['smallest_total'] / mib:.1f} MiB "
                      f"| {p['weights'] / mib:.1f} MiB | {sum(p.values()) / mib:.1f} MiB |")
        if "recompute" in sections:
            seqs = [int(s) for s in args.seqs.split(",")]
            results["recompute"] = rows = recompute_section(tmp, seqs, args.steps, args.timeout,
                                                            args.precisions.split(","), args.modes.split(","))
            print("\n| seq | precision | recompute | peak RSS | vs none | step time | vs none | planned "
                  "| planned / measured |")
            print("|---|---|---|---|---|---|---|---|---|")
            for r in rows:
                base = next((x for x in rows if x["seq"] == r["seq"] and x["precision"] == r["precision"]
                             and x["recompute"] == "none"), r)
                print(f"| {r['seq']} | {r['precision']} | {r['recompute']} | {r['peak_rss_mb']:.0f} MiB "
                      f"| {r['peak_rss_mb'] / base['peak_rss_mb']:.3f} | {r['step_time_s']:.2f} s "
                      f"| {r['step_time_s'] / base['step_time_s']:.3f} | {r['planned_mb']:.0f} MiB "
                      f"| {r['planned_mb'] / r['peak_rss_mb']:.3f} |")
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
