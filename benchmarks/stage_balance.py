"""Pipeline stage balance: calibrate the stage cost model on this device, and measure the split it chooses.

``--calibrate`` times (CPU seconds, one thread) the forward + backward of single-layer pipeline stages
(``pp_size = n_layers``: the first with the embedding, the last with the head, its loss and MTP) of the
``nano`` and ``small`` models, with and without MTP, at several sequence lengths and in dense and sparse
attention; fits the coefficients of ``orchestrator/tools/stage_costs.py`` by non-negative least squares on
relative error, and prints measured against predicted for every stage. ``--write`` stores them in
``stage_calibration.json``.

``--balance`` times (CPU seconds, one thread) each stage of a layout in-process (forward + backward of its
micro-batches, no communication: the compute a rank of that stage does in a step) under the even split and
under ``stage_layers: auto``, and reports slowest / mean stage, measured in one run.

    python benchmarks/stage_balance.py --calibrate --write          # on the device kind the jobs run on
    python benchmarks/stage_balance.py --balance                   # the demo's PP2 layout (nano, seq 256)
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from v4train.model.config import ModelConfig
from v4train.model.transformer import V4Stage, stage_layer_ranges
from v4train.orchestrator.tools import stage_costs as sc


def _time_stage(cfg: ModelConfig, sizes: list[int], rank: int, seq_len: int, batch: int, mode: str,
                micro_batches: int, repeats: int) -> float:
    """Fastest of ``repeats`` timings, in CPU seconds of this process (one thread: unlike wall time, hardly
    changed by other processes' load), of forward + backward of ``micro_batches`` micro-batches
    ``[batch, seq_len]`` through stage ``rank`` of the split ``sizes``."""
    pp = len(sizes)
    stage = V4Stage(cfg, pp_rank=rank, pp_size=pp, stage_layers=sizes)
    stage.init_weights(0)
    stage.attention_mode = mode
    gen = torch.Generator().manual_seed(rank)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=gen)
    pos = torch.arange(seq_len).expand(batch, seq_len)
    streams = torch.randn(seq_len, batch, cfg.hc_mult * cfg.dim, generator=gen)
    grad = torch.randn(seq_len, batch, cfg.hc_mult * cfg.dim, generator=gen)

    def step() -> None:
        for _ in range(micro_batches):
            if rank > 0:
                stage.set_input_tensor(streams.clone().requires_grad_(True))
            out = stage(ids, pos, ids if rank == pp - 1 else None)
            if rank == pp - 1:
                out.mean().backward()
            else:
                out.backward(grad)
        stage.pop_aux_metrics()

    step()  # warm-up: allocations, lazy initialisation
    times = []
    for _ in range(repeats):
        start = time.process_time()
        step()
        times.append(time.process_time() - start)
    return min(times)


def _features_of_stage(cfg: ModelConfig, sizes: list[int], rank: int, seq_len: int, mode: str) -> dict:
    embed, blocks, head = sc.component_features(cfg, seq_len, mode)
    layers = stage_layer_ranges(cfg.n_layers, len(sizes), sizes)[rank]
    parts = [blocks[i] for i in layers] + ([embed] if rank == 0 else []) + ([head] if rank == len(sizes) - 1 else [])
    return {k: sum(p[k] for p in parts) for k in sc.FEATURES}


def _nnls(rows: list[list[float]], targets: list[float]) -> list[float]:
    """Non-negative least squares by trying every support (6 unknowns: 63 small solves)."""
    A, b = torch.tensor(rows, dtype=torch.float64), torch.tensor(targets, dtype=torch.float64)
    best, n = None, A.shape[1]
    for k in range(1, n + 1):
        for support in itertools.combinations(range(n), k):
            x_s = torch.linalg.lstsq(A[:, support], b.unsqueeze(1)).solution.squeeze(1)
            if (x_s < 0).any():
                continue
            x = torch.zeros(n, dtype=torch.float64)
            x[list(support)] = x_s
            err = float((A @ x - b).square().sum())
            if best is None or err < best[0]:
                best = (err, x)
    return best[1].tolist()


def calibrate(args) -> dict:
    torch.set_num_threads(1)
    models = {"nano": ModelConfig.preset("nano"), "small": ModelConfig.preset("small")}
    no_mtp = models["nano"]
    models["nano, no MTP"] = dataclasses.replace(no_mtp, mtp_depth=0,
                                                 compress_ratios=no_mtp.compress_ratios[: no_mtp.n_layers])
    samples = []
    for (name, cfg), seq_len, mode in itertools.product(models.items(), args.seq_lens, ("dense", "sparse")):
        sizes = [1] * cfg.n_layers
        for rank in range(cfg.n_layers):
            seconds = _time_stage(cfg, sizes, rank, seq_len, args.batch, mode, 1, args.repeats) / args.batch
            samples.append({"model": name, "seq_len": seq_len, "mode": mode, "stage": rank, "seconds": seconds,
                            "features": _features_of_stage(cfg, sizes, rank, seq_len, mode)})
            print(f"{name} S={seq_len} {mode} stage {rank}: {seconds * 1e3:.2f} ms per sequence", flush=True)
    # relative error: divide every row by its measurement, so small stages count as much as large ones
    rows = [[s["features"][k] / s["seconds"] for k in sc.FEATURES] for s in samples]
    coefficients = dict(zip(sc.FEATURES, _nnls(rows, [1.0] * len(rows))))
    calibration = sc.Calibration(args.device, coefficients, "")
    errors = []
    for s in samples:
        s["predicted"] = calibration.seconds(s["features"])
        errors.append(abs(s["predicted"] / s["seconds"] - 1))
    result = {"device": args.device, "coefficients": coefficients, "samples": samples,
              "median_abs_rel_error": statistics.median(errors), "max_abs_rel_error": max(errors)}
    print(f"coefficients: {coefficients}")
    print(f"relative error of the fit: median {result['median_abs_rel_error']:.3f}, "
          f"max {result['max_abs_rel_error']:.3f} over {len(samples)} stages")
    if args.write:
        path = sc.CALIBRATION_FILE
        table = json.loads(path.read_text()) if path.is_file() else {}
        table[args.device] = {
            "coefficients": coefficients,
            "measured": (f"benchmarks/stage_balance.py --calibrate on {time.strftime('%Y-%m-%d')}, one thread, "
                         f"fit median relative error {result['median_abs_rel_error']:.3f}"),
        }
        path.write_text(json.dumps(table, indent=2) + "\n")
        print(f"written: {path}")
    return result


def balance(args) -> dict:
    torch.set_num_threads(1)
    cfg = ModelConfig.preset(args.model)
    pp = args.pp
    splits = {"even": [len(r) for r in stage_layer_ranges(cfg.n_layers, pp)],
              "auto": sc.resolve_stage_layers("auto", cfg, pp, args.seq_len, args.mode, args.device)}
    predicted = sc.stage_costs(cfg, args.seq_len, args.mode, sc.load_calibration(args.device))
    result = {"model": args.model, "pp": pp, "seq_len": args.seq_len, "mode": args.mode,
              "micro_batches": args.micro_batches, "micro_batch_size": args.batch, "splits": {}}
    for name, sizes in splits.items():
        seconds = [_time_stage(cfg, sizes, r, args.seq_len, args.batch, args.mode, args.micro_batches, args.repeats)
                   for r in range(pp)]
        pred = predicted.of_stages(sizes)
        mean = sum(seconds) / pp
        result["splits"][name] = {"stage_layers": sizes, "stage_s": seconds, "slowest_over_mean": max(seconds) / mean,
                                  "predicted_s": [p * args.batch * args.micro_batches for p in pred]}
        print(f"{name} {sizes}: stage seconds {[round(s, 3) for s in seconds]}, slowest / mean "
              f"{max(seconds) / mean:.2f}x; predicted {[round(p * args.batch * args.micro_batches, 3) for p in pred]}",
              flush=True)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calibrate", action="store_true")
    parser.add_argument("--write", action="store_true", help="store the fitted coefficients (with --calibrate)")
    parser.add_argument("--balance", action="store_true")
    parser.add_argument("--device", default="cpu", choices=["cpu"], help="device kind (CPU only so far)")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--model", default="nano")
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--mode", default="sparse", choices=["dense", "indexer_warmup", "sparse"])
    parser.add_argument("--batch", type=int, default=4, help="sequences per micro-batch")
    parser.add_argument("--micro-batches", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    out = {}
    if args.calibrate:
        out["calibrate"] = calibrate(args)
    if args.balance:
        out["balance"] = balance(args)
    if not out:
        parser.error("give --calibrate and/or --balance")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
