"""Step-time benchmarks in one table: the per-part profile of a PP1 step, the pipeline stage balance of the
demo's PP2 layout (even split against ``stage_layers: auto``), the attention layers at 32k against SDPA, the
fused vocabulary head + loss against the unfused one, and the demo's start (``v4train submit`` to the first step).

Runs ``step_profile.py``, ``stage_balance.py --balance``, ``attention_layer.py`` (T = ``--seq-len``, the three
V4 layer types and SDPA), ``head_loss.py`` and ``start_time.py`` one after another (each writes its JSON under
``--out``), then writes one markdown table, ``step_time.md``, with every figure as a ratio measured within one
run of its script (the start: its parts' wall seconds and the CPU seconds every process spent until the first
step).

    python benchmarks/step_time.py --out runs/bench            # make bench
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _run(script: str, *args: str) -> None:
    subprocess.run([sys.executable, str(HERE / script), *args], check=True)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--seq-len", type=int, default=32768)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    _run("step_profile.py", "--json", str(args.out / "step_profile.json"))
    _run("stage_balance.py", "--balance", "--json", str(args.out / "stage_balance.json"))
    _run("attention_layer.py", "--seq-lens", str(args.seq_len), "--repeats", "1", "--variants",
         "v4 csa", "v4 hca", "v4 swa", "sdpa mha", "--json", str(args.out / "attention_layer.json"))
    _run("head_loss.py", "--json", str(args.out / "head_loss.json"))
    demo_data = HERE.parent / "datasets" / "shakespeare" / "dataset.json"
    if demo_data.exists():  # the start is the demo job's: it needs the demo's prepared data
        _run("start_time.py", "--json", str(args.out / "start_time.json"))
    else:
        print(f"start_time.py skipped: no {demo_data} (v4train prepare-data --source shakespeare)", file=sys.stderr)
    profile = json.loads((args.out / "step_profile.json").read_text())
    attention = {r["variant"]: r for r in json.loads((args.out / "attention_layer.json").read_text())}
    head = {r["variant"]: r for r in json.loads((args.out / "head_loss.json").read_text())}
    step = profile["step_s_profiled"]
    lines = ["| benchmark | figure | value |", "|---|---|---|"]
    for part, seconds in profile["parts_s"].items():
        lines.append(f"| PP1 step profile | {part} share of the step | {100 * seconds / step:.1f}% |")
    lines.append(f"| PP1 step profile | step wall time (not profiled, median) | {profile['step_s']:.2f} s |")
    balance = json.loads((args.out / "stage_balance.json").read_text())["balance"]
    for name, split in balance["splits"].items():
        lines.append(f"| stage balance PP{balance['pp']} ({balance['model']}, S={balance['seq_len']}) | {name} split "
                     f"{split['stage_layers']}: slowest / mean stage | {split['slowest_over_mean']:.2f}x |")
    sdpa = attention["sdpa mha"]
    for variant in ("v4 csa", "v4 hca", "v4 swa"):
        r = attention[variant]
        lines.append(f"| attention layer T={args.seq_len} | {variant}: speed-up over SDPA (CPU s), memory vs SDPA | "
                     f"{sdpa['cpu_s'] / r['cpu_s']:.2f}x, {r['peak_mib'] / sdpa['peak_mib']:.2f}x |")
    un, fu = head["unfused"], head["fused"]
    lines.append(f"| head + loss ({fu['tokens']} tokens) | fused vs unfused: CPU time, peak memory | "
                 f"{fu['cpu_s'] / un['cpu_s']:.2f}x, {fu['peak_mib'] / un['peak_mib']:.2f}x |")
    start = json.loads((args.out / "start_time.json").read_text()) if demo_data.exists() else {"parts_s": {}}
    for part, seconds in start["parts_s"].items():
        lines.append(f"| demo start (load {start['load_avg_1m']:.1f}) | {part} | {seconds} s |")
    if start["parts_s"]:
        lines.append(f"| demo start | submit to first step; CPU s of every process until then | "
                     f"{start['submit_to_first_step_s']} s; {sum(start['cpu_s_to_first_step'].values()):.1f} CPU s |")
    table = "\n".join(lines)
    (args.out / "step_time.md").write_text(table + "\n")
    print(table)
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
