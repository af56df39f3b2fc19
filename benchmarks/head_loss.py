"""Benchmark: the vocabulary head + cross-entropy, fused and chunked (``model/head_loss.py``) against unfused.

One forward + backward of ``loss = mean(CE(h W^T, labels))`` at the ``nano`` head (D = 192, V = 8192)
for ``--tokens`` tokens (default: one demo micro-batch, 4 x 256), one CPU thread, fp32:

* ``unfused``: ``F.cross_entropy`` on the whole ``[T, V]`` logits (the stage's head before fusion);
* ``fused``: :func:`model.head_loss.fused_head_loss`.

Each variant runs in a fresh subprocess, measured as in ``benchmarks/attention_layer.py``: peak memory
is the resident-set high-water mark of the first step minus the resident set before it (glibc told to
mmap every buffer over 64 KiB so freed memory leaves at once), then the median CPU time of
``--repeats`` steps after a warm-up. Prints a markdown table; ``--json`` writes the rows.

    python benchmarks/head_loss.py --json runs/bench/head_loss.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("unfused", "fused")


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def _child(variant: str, tokens: int, repeats: int) -> dict:
    import gc

    import torch
    import torch.nn.functional as F

    from v4train.model import ModelConfig
    from v4train.model.head_loss import fused_head_loss
    from v4train.parallel.tensor_parallel import TensorParallel

    torch.set_num_threads(1)
    cfg = ModelConfig.preset("nano")
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(1, tokens, cfg.dim, generator=gen, requires_grad=True)
    w = (torch.randn(cfg.vocab_size, cfg.dim, generator=gen) * cfg.init_std).requires_grad_()
    labels = torch.randint(0, cfg.vocab_size, (1, tokens), generator=gen)

    def step():
        if variant == "fused":
            loss = fused_head_loss(h, w, labels, TensorParallel())
        else:
            loss = F.cross_entropy((h @ w.t()).flatten(0, 1), labels.flatten(), reduction="none")
        loss.mean().backward()
        h.grad = w.grad = None

    step()
    gc.collect()
    base = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM := VmRSS
        f.write("5")
    step()
    peak_mib = (_status_kib("VmHWM") - base) / 1024
    times = []
    for _ in range(repeats):
        c0 = time.process_time()
        step()
        times.append(time.process_time() - c0)
    return {"variant": variant, "tokens": tokens, "cpu_s": statistics.median(times), "peak_mib": peak_mib}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", nargs=3, metavar=("VARIANT", "TOKENS", "REPEATS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child[0], int(args.child[1]), int(args.child[2]))))
        return []
    rows = []
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--child", variant, str(args.tokens), str(args.repeats)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    un, fu = rows
    print("| tokens | unfused: CPU s / MiB | fused: CPU s / MiB | fused vs unfused: time, memory |\n|---|---|---|---|")
    print(f"| {args.tokens} | {un['cpu_s']:.4f} / {un['peak_mib']:.1f} | {fu['cpu_s']:.4f} / {fu['peak_mib']:.1f} | "
          f"{fu['cpu_s'] / un['cpu_s']:.2f}x, {fu['peak_mib'] / max(un['peak_mib'], 1e-9):.2f}x |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
