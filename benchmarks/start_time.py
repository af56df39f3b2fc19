"""The time from ``v4train submit`` to the first step on the 4-rank simulated cluster, split into its parts.

Runs ``v4train submit JOB --cluster CLUSTER`` for one step (no checkpoint, no evaluation) and reads the parts
from what the run records: the driver's imports and its spec validation + preflight (``preflight`` event),
the Ray start (``ray_started``), the rank group's creation, the rank processes' start (each worker's
``process up in`` log line: Ray's worker start and its imports of torch and Megatron-core), the rendezvous
with the node preflight, each rank's set-up (gloo process group, Megatron's groups, the engine: dataset,
model, optimizer; the ``set up in`` line) and the first step (the ``start`` event to the first metrics
record). While the job runs, the CPU seconds of every process under the driver (the driver, Ray's own
processes, the rank workers, idle workers) are sampled, so the start's CPU cost is known on a loaded machine
whose wall times mean little.

    python benchmarks/start_time.py --json runs/bench/start_time.json     # ~1 min on an idle 2-core machine
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
# the process kinds the CPU seconds are grouped by, from each process's command line (Ray names its workers),
# most specific first: a prestarted idle worker becomes a rank when an actor is placed on it
KINDS = (("rank", "ray::RankWorker"), ("idle worker", "ray::IDLE"), ("idle worker", "default_worker.py"),
         ("ray", "gcs_server"), ("ray", "raylet"), ("ray", "ray/"), ("ray", "ray::"))
RANKING = ("rank", "ray", "idle worker", "driver", "other")


def _kind(proc: psutil.Process, driver_pid: int) -> str:
    if proc.pid == driver_pid:
        return "driver"
    try:
        line = " ".join(proc.cmdline())
    except psutil.Error:
        return "other"
    return next((kind for kind, mark in KINDS if mark in line), "other")


def _sample(driver: psutil.Process, seen: dict[int, tuple[str, float]]) -> None:
    """Record every process of the driver's tree: its most specific kind so far and its CPU seconds (user +
    system) so far."""
    try:
        procs = [driver, *driver.children(recursive=True)]
    except psutil.Error:
        return
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        kind = min(_kind(p, driver.pid), seen.get(p.pid, ("other", 0.0))[0], key=RANKING.index)
        seen[p.pid] = (kind, t.user + t.system)


def _events(run_dir: Path) -> dict[str, dict]:
    out = {}
    for line in (run_dir / "events.jsonl").read_text().splitlines():
        e = json.loads(line)
        out.setdefault(e["event"], e)
    return out


def _rank_logs(run_dir: Path) -> list[dict]:
    """Each rank's ``process up`` (wall, CPU) and ``set up in`` laps from its log."""
    ranks = []
    for path in sorted((run_dir / "logs").glob("rank_*.log")):
        text = path.read_text()
        up = re.search(r"process up in ([\d.]+) s \(([\d.]+) CPU s\)", text)
        setup = re.search(r"set up in (.*) total=", text)
        pairs = (p.split("=") for p in setup.group(1).split()) if setup else ()
        laps = {k: float(v.rstrip("s")) for k, v in pairs}
        ranks.append({"rank": int(path.stem.split("_")[1]), "process_up_s": float(up.group(1)) if up else None,
                      "process_up_cpu_s": float(up.group(2)) if up else None, **laps})
    return ranks


def measure(job: str, cluster: str, run_dir: Path, poll_s: float = 0.2) -> dict:
    """One ``v4train submit`` of ``job`` for one step; the start's parts (wall seconds) and CPU seconds by
    process kind up to the first step. Raises RuntimeError naming the run directory if the submit fails."""
    cmd = [str(Path(sys.executable).parent / "v4train"), "submit", job, "--cluster", cluster, "--run-dir",
           str(run_dir), "--overwrite", "--set", "train.steps=1", "--set", "checkpoint.every_steps=0",
           "--set", "checkpoint.at_end=false", "--set", "train.eval_batches=0"]
    submitted = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    driver = psutil.Process(proc.pid)
    seen: dict[int, tuple[str, float]] = {}
    metrics = run_dir / "metrics.jsonl"
    while proc.poll() is None and not (metrics.exists() and metrics.read_text().strip()):
        _sample(driver, seen)
        time.sleep(poll_s)
    _sample(driver, seen)
    first_step_at = time.time()
    output, _ = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"v4train submit failed ({run_dir}): {output.strip().splitlines()[-1:]}")
    events = _events(run_dir)
    first = json.loads(metrics.read_text().splitlines()[0])
    pre, start = events["preflight"], events["start"]
    parts = start.get("setup_parts_s", {})
    ranks = _rank_logs(run_dir)
    cpu: dict[str, float] = {}
    for kind, seconds in seen.values():
        cpu[kind] = cpu.get(kind, 0.0) + seconds
    return {
        "submit_to_first_step_s": round(first["time"] - submitted, 3),
        "parts_s": {
            "driver imports (CLI)": pre["imports_s"],
            "spec validation + preflight": pre["spec_and_preflight_s"],
            "Ray start": events["ray_started"]["seconds"],
            "rank group created (placement group, actors)": parts.get("create"),
            "rank processes up (worker start + imports; slowest)": parts.get("processes"),
            "rendezvous + node preflight": parts.get("rendezvous"),
            "rank set-up (gloo, Megatron groups, dataset, model, optimizer; slowest)": parts.get("setup"),
            "first step": round(first["time"] - start["time"], 3),
        },
        "driver_imports_cpu_s": pre["imports_cpu_s"],
        "ranks": ranks,
        "cpu_s_to_first_step": {k: round(v, 2) for k, v in sorted(cpu.items())},
        "processes": {k: sum(1 for kind, _ in seen.values() if kind == k) for k in sorted(cpu)},
        "sampled_until_s": round(first_step_at - submitted, 3),
    }


def table(result: dict) -> str:
    lines = ["| part | wall s |", "|---|---|"]
    for part, seconds in result["parts_s"].items():
        lines.append(f"| {part} | {seconds if seconds is not None else '-'} |")
    lines.append(f"| **submit to first step** | **{result['submit_to_first_step_s']}** |")
    r = result["ranks"]
    up = [x["process_up_cpu_s"] for x in r if x["process_up_cpu_s"] is not None]
    lines += ["", "| CPU seconds to the first step, by process | CPU s | processes |", "|---|---|---|"]
    for kind, seconds in result["cpu_s_to_first_step"].items():
        lines.append(f"| {kind} | {seconds} | {result['processes'][kind]} |")
    lines.append(f"| total | {round(sum(result['cpu_s_to_first_step'].values()), 2)} | |")
    if up:
        lines.append(f"\nrank processes' imports: {min(up):.2f}-{max(up):.2f} CPU s each; driver imports "
                     f"{result['driver_imports_cpu_s']} CPU s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", default="configs/demo.yaml")
    parser.add_argument("--cluster", default="clusters/local-sim.yaml")
    parser.add_argument("--json", type=Path, help="write the result here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="start_time-") as tmp:
        result = measure(args.job, args.cluster, Path(tmp) / "run")
    result["load_avg_1m"] = psutil.getloadavg()[0]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
