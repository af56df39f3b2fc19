"""What the Ray control plane costs: the same job under the Ray supervisor and under torchrun, side by side.

    python benchmarks/control_plane.py                     # demo job (nano, pp2 x dp2), 40 steps, 2 rounds
    python benchmarks/control_plane.py --steps 20 --rounds 1 --json out.json

Each round runs the job once through ``v4train submit`` (embedded Ray cluster, supervisor, RankWorker actors,
heartbeat polling) and once through ``torchrun --nproc-per-node W -m v4train.orchestrator.launch`` (no Ray: every
process runs the same supervisor loop on its own rank, results all-gathered over gloo), alternating which goes
first, on the same data, with checkpoints and evaluation off. Both write ``metrics.jsonl`` with each step's
``time`` stamped when the driver (supervisor or rank 0) records it, so the **step period** (median gap between
consecutive records, after ``--skip`` warm-up steps) includes the control plane's dispatch and collection;
``step_time_s`` is the in-rank time of ``train_step`` alone. Also reported: time from launch to the first recorded
step. The demo dataset is used when prepared (``datasets/shakespeare``), else a small corpus of standard-library
docstrings is prepared in a temp dir.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from v4train.orchestrator.control.rendezvous import free_port

ROOT = Path(__file__).resolve().parents[1]


def _dataset(tmp: Path) -> Path:
    demo = ROOT / "datasets" / "shakespeare"
    if (demo / "dataset.json").is_file():
        return demo
    sys.path.insert(0, str(ROOT / "tests"))
    from support.jobs import stdlib_dataset

    return stdlib_dataset(tmp / "dataset", vocab_size=2048, val_fraction=0.05)


def _run(kind: str, run_dir: Path, overrides: list[str], world: int, timeout: float) -> dict:
    sets = [x for o in overrides for x in ("--set", o)]
    if kind == "ray":
        cmd = [sys.executable, "-m", "v4train.orchestrator.tools.cli", "submit", "configs/demo.yaml", "--cluster",
               "clusters/local-sim.yaml", "--run-dir", str(run_dir), "--overwrite", *sets]
    else:
        torchrun = Path(sys.executable).parent / "torchrun"
        cmd = [str(torchrun), "--nproc-per-node", str(world), "--master-port", str(free_port()), "-m",
               "v4train.orchestrator.launch", "configs/demo.yaml", "--run-dir", str(run_dir), "--overwrite", *sets]
    started = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    wall = time.time() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} run failed ({proc.returncode}): {proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"kind": kind, "wall_s": wall, "first_step_after_s": rows[0]["time"] - started, "rows": rows}


def _stats(run: dict, skip: int) -> dict:
    rows = run["rows"][skip:]
    gaps = [b["time"] - a["time"] for a, b in zip(rows, rows[1:])]
    return {"step_period_s": statistics.median(gaps),
            "in_rank_step_s": statistics.median(r["step_time_s"] for r in rows),
            "first_step_after_s": run["first_step_after_s"], "wall_s": run["wall_s"],
            "final_loss": run["rows"][-1]["loss"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the medians")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="v4train-cp-"))
    try:
        data = _dataset(tmp)
        overrides = [f"train.steps={args.steps}", f"data.path={data}", "train.eval_batches=0",
                     "checkpoint.every_steps=0", "checkpoint.at_end=false"]
        results = {"ray": [], "torchrun": []}
        for r in range(args.rounds):
            for kind in (("ray", "torchrun") if r % 2 == 0 else ("torchrun", "ray")):
                run = _run(kind, tmp / f"{kind}{r}", overrides, 4, args.timeout)
                results[kind].append(_stats(run, args.skip))
                last = "  ".join(f"{k} {v:.3f}" for k, v in results[kind][-1].items())
                print(f"round {r} {kind:<9} {last}", flush=True)
        summary = {k: {m: statistics.median(x[m] for x in v) for m in v[0]} for k, v in results.items()}
        ratio = summary["ray"]["step_period_s"] / summary["torchrun"]["step_period_s"]
        print("\n| launcher | step period (median) | in-rank step | first step after | final loss |")
        print("|---|---|---|---|---|")
        for kind, s in summary.items():
            print(f"| {kind} | {s['step_period_s']:.3f} s | {s['in_rank_step_s']:.3f} s "
                  f"| {s['first_step_after_s']:.1f} s | {s['final_loss']:.4f} |")
        print(f"\nRay / torchrun step period: {ratio:.3f} ({100 * (ratio - 1):+.1f}%)")
        if args.json:
            Path(args.json).write_text(json.dumps({"runs": results, "summary": summary, "ratio": ratio}, indent=1))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
