"""Pipeline bubble of Megatron's 1F1B and interleaved 1F1B schedules through parallel.schedules.

    python benchmarks/pipeline_bubble.py                          # PP 2 and 4, m = 4, 8, 16, vp = 2
    python benchmarks/pipeline_bubble.py --pp 2 --microbatches 8 --steps 3 --out bubble.json

For each PP the script spawns PP gloo ranks (one pipeline, CPU) and times
``parallel.schedules.forward_backward`` over m micro-batches, once with one stage module per rank
(1F1B) and once with ``--vp`` chunks per rank (interleaved; skipped where the schedule refuses it,
i.e. m not a multiple of PP). The machine has 2 cores, so stage compute is modelled by sleeps,
which do not contend for them: a stage's forward sleeps t_f = ``--t-fwd-ms`` and its backward
t_b = 2 t_f on a [1, 1, 8] boundary tensor; an interleaved chunk holds 1/vp of the stage, so it
sleeps t_f/vp and t_b/vp. Every rank therefore does the same ideal work per step,
m (t_f + t_b), in both schedules, and what remains of a step is bubble (plus p2p and Python
overhead, which interleaving multiplies by vp: vp times the messages).

Convention (measured and theory are the same quantity): bubble fraction = bubble time / step time
= 1 - m (t_f + t_b) / T, with T the step's wall time on the slowest rank (ranks start together
after a barrier; median over ``--steps`` steps after ``--warmup``). Narayanan et al. 2021
("Efficient Large-Scale Language Model Training on GPU Clusters using Megatron-LM", §2.2) give the
bubble relative to the ideal time instead: r = (p-1)/m for 1F1B and r = (p-1)/(v m) interleaved;
as a fraction of the step, f = r / (1 + r), i.e. (p-1)/(m+p-1) and (p-1)/(v m+p-1), which the
table prints as theory (the JSON also carries r).

Sleeps isolate the schedule only while the cores have room to wake the ranks on time: every rank
also records how long it actually slept, and rows whose sleeps overran by more than 1% (another
job on the cores) are listed under the table, their bubble inflated by the late wake-ups.
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
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from v4train.orchestrator.control.rendezvous import free_port  # noqa: E402
from v4train.parallel import groups  # noqa: E402
from v4train.parallel.groups import ParallelContext  # noqa: E402
from v4train.parallel.schedules import forward_backward  # noqa: E402

S, B, H = 1, 1, 8  # the boundary tensor x_SBH: tiny, so p2p cost stays small next to the sleeps
OVERRUN_WARNING = 0.01  # flag a row whose stage sleeps took > 1% longer than asked
RANK_HANG_S = 600  # a hung rank dumps its stack and exits (a normal PP run takes ~1 min)

# Seconds this process actually slept in stage compute since the last reset (sleep overshoots).
_slept_s = 0.0


class _Sleep(torch.autograd.Function):
    """Identity on ``x`` whose forward sleeps ``t_fwd_s`` and backward ``t_bwd_s`` seconds."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, t_fwd_s: float, t_bwd_s: float) -> torch.Tensor:
        ctx.t_bwd_s = t_bwd_s
        _sleep(t_fwd_s)
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        _sleep(ctx.t_bwd_s)
        return grad, None, None


def _sleep(seconds: float) -> None:
    global _slept_s
    start = time.perf_counter()
    time.sleep(seconds)
    _slept_s += time.perf_counter() - start


class SleepStage(nn.Module):
    """One (virtual) pipeline stage whose forward costs ``t_fwd_s`` and backward ``2 * t_fwd_s``.

    The first virtual stage starts from a [S, B, H] = [1, 1, 8] parameter (so its backward runs);
    the others from the boundary tensor set by the schedule. Output: [1, 1, 8] fp32.
    """

    def __init__(self, t_fwd_s: float, first: bool) -> None:
        super().__init__()
        self.t_fwd_s = t_fwd_s
        self.source_SBH = nn.Parameter(torch.zeros(S, B, H)) if first else None
        self.input_SBH = None

    def set_input_tensor(self, x_SBH: torch.Tensor | None) -> None:
        self.input_SBH = x_SBH

    def forward(self) -> torch.Tensor:
        x_SBH = self.source_SBH if self.source_SBH is not None else self.input_SBH
        return _Sleep.apply(x_SBH, self.t_fwd_s, 2 * self.t_fwd_s)


def _forward_step(data_iterator, stage: SleepStage):
    next(data_iterator)  # the schedule's contract: every stage draws one micro-batch per step
    return stage(), _loss


def _loss(output_SBH: torch.Tensor) -> tuple[torch.Tensor, dict]:
    return output_SBH.sum(), {}


def _timed_step(stage, pctx: ParallelContext, vp: int, m: int) -> tuple[float, float]:
    """(wall s, slept s) of one forward_backward, each the maximum over the pipeline's ranks."""
    global _slept_s
    dist.barrier(group=pctx.pp_group)
    _slept_s = 0.0
    start = time.perf_counter()
    forward_backward(
        _forward_step, iter(range(m)) if vp == 1 else [iter(range(m)) for _ in range(vp)], stage,
        num_microbatches=m, seq_length=S, micro_batch_size=B, hidden_size=H, pctx=pctx,
    )
    both = torch.tensor([time.perf_counter() - start, _slept_s], dtype=torch.float64)
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=pctx.pp_group)
    return both[0].item(), both[1].item()


def _rank_main(rank: int, pp: int, port: int, args: dict, out_path: str) -> None:
    faulthandler.dump_traceback_later(RANK_HANG_S, exit=True)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=pp,
        timeout=datetime.timedelta(seconds=120),
    )
    pctx = groups.initialize(1, pp, 1, 1)
    t_fwd_s = args["t_fwd_ms"] / 1000
    rows = []
    for m in args["microbatches"]:
        for vp in (1, args["vp"]):
            if vp == 1:
                stage = SleepStage(t_fwd_s, first=pctx.is_first_stage)
            else:
                stage = [SleepStage(t_fwd_s / vp, first=i == 0 and pctx.is_first_stage)
                         for i in range(vp)]
            try:
                steps = [_timed_step(stage, pctx, vp, m)
                         for _ in range(args["warmup"] + args["steps"])][args["warmup"]:]
            except ValueError as refusal:  # raised on every rank before any p2p: all skip together
                rows.append({"pp": pp, "m": m, "vp": vp, "refused": str(refusal)})
                continue
            rows.append({
                "pp": pp, "m": m, "vp": vp,
                "step_s": [wall for wall, _ in steps],
                "slept_s": [slept for _, slept in steps],
            })
    groups.destroy()
    dist.destroy_process_group()
    if rank == 0:
        Path(out_path).write_text(json.dumps(rows))
    faulthandler.cancel_dump_traceback_later()


def measure(pp: int, args: dict) -> list[dict]:
    """Spawn ``pp`` gloo ranks and time every (m, vp) of ``args``; one dict per (m, vp).

    Returns rows with pp, m, vp and either ``refused`` (the schedule's ValueError message) or
    ``step_s`` / ``slept_s`` (seconds per measured step, max over ranks) and ``step_s_median``,
    ``ideal_s`` = m (t_f + t_b), ``bubble`` = 1 - ideal_s / step_s_median, ``bubble_theory`` =
    (p-1)/(vp m + p-1), and ``bubble_over_ideal`` / ``bubble_over_ideal_theory``: the same bubble
    relative to the ideal time (Narayanan et al. 2021, §2.2: (p-1)/(vp m)); ``step_s_theory`` =
    ideal_s / (1 - bubble_theory), the step a schedule with free p2p would take; ``sleep_overrun``
    = median slept_s / ideal_s - 1 (a rank woken late by CPU contention). Times in seconds.
    Raises:
        torch.multiprocessing.ProcessRaisedException: a rank raised (its traceback is included).
        torch.multiprocessing.ProcessExitedException: a rank died, e.g. by the hang watchdog.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out_path = f"{tmp}/rows.json"
        mp.start_processes(
            _rank_main, args=(pp, free_port(), args, out_path), nprocs=pp, start_method="spawn"
        )
        rows = json.loads(Path(out_path).read_text())
    microbatch_s = 3 * args["t_fwd_ms"] / 1000  # t_f + t_b of a rank (all its chunks together)
    for row in rows:
        if "refused" in row:
            continue
        row["ideal_s"] = row["m"] * microbatch_s
        row["step_s_median"] = statistics.median(row["step_s"])
        row["bubble"] = 1 - row["ideal_s"] / row["step_s_median"]
        row["bubble_theory"] = (pp - 1) / (row["vp"] * row["m"] + pp - 1)
        row["bubble_over_ideal"] = row["step_s_median"] / row["ideal_s"] - 1
        row["bubble_over_ideal_theory"] = (pp - 1) / (row["vp"] * row["m"])
        row["step_s_theory"] = row["ideal_s"] / (1 - row["bubble_theory"])
        row["sleep_overrun"] = statistics.median(row["slept_s"]) / row["ideal_s"] - 1
    return rows


def table(rows: list[dict], vp: int) -> str:
    """Markdown table of :func:`measure` rows: one line per (PP, m), 1F1B (vp = 1) and interleaved
    (``vp``) side by side; bubbles as fractions of the step, step times in ms.

    Raises:
        KeyError: a (PP, m) lacks its 1F1B or its interleaved row.
    """
    by_key = {(r["pp"], r["m"], r["vp"]): r for r in rows}
    lines = [
        f"| PP | m | 1F1B bubble | 1F1B theory (p-1)/(m+p-1) | interleaved vp={vp} bubble | "
        f"interleaved theory (p-1)/(vm+p-1) | 1F1B step ms | interleaved step ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for pp, m in sorted({(r["pp"], r["m"]) for r in rows}):
        plain, inter = by_key[(pp, m, 1)], by_key[(pp, m, vp)]

        def cells(row: dict) -> tuple[str, str, str]:
            if "refused" in row:
                return "refused", "n/a", "n/a"
            return (f"{row['bubble']:.3f}", f"{row['bubble_theory']:.3f}",
                    f"{1000 * row['step_s_median']:.0f}")

        (pb, pt, ps), (ib, it, is_) = cells(plain), cells(inter)
        lines.append(f"| {pp} | {m} | {pb} | {pt} | {ib} | {it} | {ps} | {is_} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Command line (see the module docstring): measure every PP, print the table, write --out.

    Raises:
        SystemExit: invalid arguments (argparse).
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pp", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--microbatches", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--vp", type=int, default=2, help="chunks per rank for the interleaved run")
    parser.add_argument("--t-fwd-ms", type=float, default=50.0,
                        help="forward sleep of a whole stage (backward: twice that)")
    parser.add_argument("--steps", type=int, default=5, help="measured steps per configuration")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured steps before them")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if any(pp < 2 for pp in args.pp) or args.vp < 2:
        parser.error("--pp values and --vp must be >= 2 (a pipeline, and chunks to interleave)")
    if args.t_fwd_ms <= 0 or min(args.microbatches) < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("--t-fwd-ms must be > 0, --microbatches and --steps >= 1, --warmup >= 0")
    settings = {name: getattr(args, name) for name in
                ("microbatches", "vp", "t_fwd_ms", "steps", "warmup")}
    rows = [row for pp in args.pp for row in measure(pp, settings)]
    print(f"t_f = {args.t_fwd_ms:g} ms, t_b = {2 * args.t_fwd_ms:g} ms per stage "
          f"(/vp per interleaved chunk); bubble = 1 - m(t_f+t_b) / step time of the slowest "
          f"rank, median of {args.steps} steps\n")
    print(table(rows, args.vp))
    # Sleeps only overrun when the cores are busy elsewhere; that wait inflates the bubble.
    overrun = [row for row in rows if row.get("sleep_overrun", 0) > OVERRUN_WARNING]
    if overrun:
        print("\nCPU contention: stage sleeps overran, so these bubbles read high (rerun idle):")
    for row in overrun:
        print(f"  PP={row['pp']} m={row['m']} vp={row['vp']}: +{row['sleep_overrun']:.1%}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "convention": "bubble = 1 - m*(t_f+t_b) / step wall time of the slowest rank; "
                          "bubble_over_ideal = step / (m*(t_f+t_b)) - 1 (Narayanan et al. 2021)",
            "settings": settings,
            "results": rows,
        }, indent=1))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
