"""The demo job trained with V4's attention recipe against the same budget trained dense.

Two runs of ``v4train submit`` on the simulated cluster, identical but for the attention mode of the
curriculum stages: ``recipe`` is the job as shipped (dense, a Lightning Indexer warm-up, then sparse
top-k attention; evaluated in sparse mode), ``dense`` trains every stage dense (evaluated dense). Same
seed, data, schedule, steps and layout. With ``--steps`` below the job's, every stage's token count is
scaled by the same factor, so the reduced run keeps the recipe's shape (and the LR warmup its share).
The validation loss (nats) of each run is its final ``eval`` event; step times come from
``metrics.jsonl`` (median per attention mode).

    python benchmarks/sparse_vs_dense_demo.py                  # the full demo, both arms (long)
    python benchmarks/sparse_vs_dense_demo.py --steps 120      # a reduced, equal budget for both arms

Runs the two arms one after the other unless ``--parallel`` (twice the ranks on the machine at once:
step times are then inflated alike). The dataset must exist (``make demo`` or ``v4train prepare-data
--source shakespeare --out datasets/shakespeare``). Writes ``runs/sparse_vs_dense/result.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def arm_overrides(job: dict, steps: int, dense: bool) -> list[str]:
    """``--set`` overrides of one arm: the step count, stage tokens scaled to it, and (dense) every mode dense."""
    cur = job["curriculum"]
    factor = steps / job["train"]["steps"]
    stages = []
    for stage in cur["stages"]:
        stage = dict(stage)
        if "tokens" in stage:
            stage["tokens"] = int(round(stage["tokens"] * factor))
        if dense:
            stage["attention"] = "dense"
        stages.append(stage)
    warmup = int(round(cur.get("lr_warmup_tokens", 0) * factor))
    return [f"train.steps={steps}", f"curriculum.stages={json.dumps(stages)}",
            f"curriculum.lr_warmup_tokens={warmup}", "checkpoint.every_steps=0", "checkpoint.at_end=false"]


def run_arm(name: str, job_path: str, cluster: str, overrides: list[str], out: Path) -> subprocess.Popen:
    cmd = [str(ROOT / ".venv" / "bin" / "v4train"), "submit", job_path, "--cluster", cluster,
           "--run-dir", str(out / name), "--overwrite"]
    for item in overrides:
        cmd += ["--set", item]
    log = (out / f"{name}.log").open("w")
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def summarise(run_dir: Path) -> dict:
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in events if e["event"] == "eval"]
    stages = [e for e in events if e["event"] == "stage_change"]
    by_mode: dict[str, list[float]] = {}
    for m in metrics:
        mode = next((s["attention_mode"] for s in reversed(stages) if s["step"] < m["step"]), "dense")
        by_mode.setdefault(mode, []).append(m["step_time_s"])
    last = metrics[-10:]
    return {
        "val_loss": evals[-1]["val_loss"] if evals else None,
        "final_train_loss_mean_last_10": sum(m["loss"] for m in last) / len(last),
        "median_step_s_by_mode": {k: statistics.median(v) for k, v in by_mode.items()},
        "steps": len(metrics),
        "stage_changes": [{"step": s["step"], "attention_mode": s["attention_mode"]} for s in stages],
        "indexer_recall_last": next((m["indexer_recall"] for m in reversed(metrics) if "indexer_recall" in m), None),
        "indexer_loss_last": next((m["indexer_loss"] for m in reversed(metrics) if "indexer_loss" in m), None),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", default="configs/demo.yaml")
    parser.add_argument("--cluster", default="clusters/local-sim.yaml")
    parser.add_argument("--steps", type=int, default=None, help="equal reduced budget for both arms")
    parser.add_argument("--parallel", action="store_true", help="run both arms at once")
    parser.add_argument("--out", default=str(ROOT / "runs" / "sparse_vs_dense"))
    args = parser.parse_args(argv)
    job = yaml.safe_load((ROOT / args.job).read_text())
    steps = args.steps or job["train"]["steps"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    arms = {"recipe": arm_overrides(job, steps, dense=False), "dense": arm_overrides(job, steps, dense=True)}
    procs = {}
    for name, overrides in arms.items():
        procs[name] = run_arm(name, args.job, args.cluster, overrides, out)
        if not args.parallel:
            procs[name].wait()
    for name, proc in procs.items():
        if proc.wait() != 0:
            sys.exit(f"arm {name} failed (exit {proc.returncode}); see {out / (name + '.log')}")
    result = {"job": args.job, "steps": steps, "parallel": args.parallel, "overrides": arms,
              **{name: summarise(out / name) for name in arms}}
    result["val_loss_recipe_minus_dense"] = result["recipe"]["val_loss"] - result["dense"]["val_loss"]
    (out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "overrides"}, indent=2))
    return result


if __name__ == "__main__":
    main()
