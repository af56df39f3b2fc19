"""One ``nano`` attention layer, forward + backward, against SDPA.

Measured side by side in one run, on CPU with one thread, batch 1, fp32, for T in --seq-lens:

* ``v4 csa``: the nano CSA layer (layer 1: window 32, m = 4, indexer top-16) in ``sparse`` mode,
  training forward (indexer top-k, the KL target and loss included) + backward.
* ``v4 hca``: the nano HCA layer (layer 2: window 32, m' = 32; all visible compressed entries).
* ``v4 swa``: the nano SWA layer (layer 0: window 32).
* ``sdpa mha``: an attention layer with the same model dim, heads and head size (4 x 64): q, k, v, o
  projections around ``F.scaled_dot_product_attention(is_causal=True)``.
* ``sdpa core`` and ``v4 core``: the attention cores alone (SDPA on q/k/v ``[1, 4, T, 64]``;
  :func:`kernels.torch_cores.sparse_attention` on the CSA layer's own sparse-mode indices).

Each (variant, T) runs in a fresh subprocess (glibc told to mmap every buffer over 64 KiB, so freed
memory leaves the resident set at once): a warm-up step at T = 256, then the first forward+backward
at T gives the peak memory (the resident-set high-water mark, reset through /proc/self/clear_refs
just before, minus the resident set before the step: activations, gradients and workspaces of the
step, not the parameters or inputs) and then, back on glibc's usual heap reuse, the median time of
``--repeats`` more steps after one more warm-up (a single step, no warm-up, when a step takes over
5 s), as CPU time of the (single-threaded) process and as wall
time; on a shared machine the CPU time is the fairer of the two. Prints a markdown table; ``--json`` writes the rows.

    python benchmarks/attention_layer.py                        # T = 1k, 4k, 16k, 32k
    python benchmarks/attention_layer.py --seq-lens 1024 4096 --repeats 2
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
VARIANTS = ("v4 csa", "v4 hca", "v4 swa", "sdpa mha", "v4 core", "sdpa core")


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:  # Linux >= 4.0: VmHWM := VmRSS
        f.write("5")


def _build(variant: str, T: int):
    """``step()`` closure running one forward + backward of ``variant`` at length T."""
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT))
    from v4train.model import ModelConfig
    from v4train.model.attention import Attention
    from v4train.model.layout import SequenceContext
    from v4train.kernels.torch_cores import sparse_attention

    torch.manual_seed(0)
    cfg = ModelConfig.preset("nano")
    H, C, D = cfg.n_heads, cfg.head_dim, cfg.dim
    x = torch.randn(1, T, D, requires_grad=True)
    pos = torch.arange(T).unsqueeze(0)
    grad_out = torch.randn(1, T, D)

    def init(module):
        with torch.no_grad():
            for p in module.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, cfg.init_std)
        return module

    if variant.startswith("v4") and variant != "v4 core":
        layer = init(Attention(cfg, {"v4 csa": 1, "v4 hca": 2, "v4 swa": 0}[variant])).train()

        def step():
            ctx = SequenceContext(pos, pos, attention_mode="sparse")
            layer(x, ctx).backward(grad_out)
        return step
    if variant == "sdpa mha":
        proj = init(torch.nn.ModuleDict({n: torch.nn.Linear(D, H * C, bias=False) for n in "qkv"}))
        out = init(torch.nn.Linear(H * C, D, bias=False))

        def step():
            q, k, v = (proj[n](x).view(1, T, H, C).transpose(1, 2) for n in "qkv")
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            out(o.transpose(1, 2).reshape(1, T, H * C)).backward(grad_out)
        return step
    q = torch.randn(1, T, H, C, requires_grad=True)
    g = torch.randn(1, T, H, C)
    if variant == "sdpa core":
        k, v = torch.randn(1, T, H, C, requires_grad=True), torch.randn(1, T, H, C, requires_grad=True)

        def step():
            F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True).transpose(1, 2).backward(g)
        return step
    # v4 core: the CSA layer's own sparse-mode indices (window 32 + indexer top-16 of T/4 entries)
    layer = init(Attention(cfg, 1))
    ctx = SequenceContext(pos, pos, attention_mode="sparse")
    captured = {}
    layer._core = lambda q_, kv_, idx_, *_: captured.update(kv=kv_.detach(), idx=idx_) or torch.zeros_like(q_)
    with torch.no_grad():
        layer(x, ctx)
    kv = captured["kv"].clone().requires_grad_()
    idx, sink = captured["idx"], torch.zeros(H, requires_grad=True)

    def step():
        sparse_attention(q, kv, sink, idx, C ** -0.5).backward(g)
    return step


def _child(variant: str, T: int, repeats: int) -> dict:
    import gc

    import torch

    torch.set_num_threads(1)
    _build(variant, 256)()  # lazy initialisations (kernels, autograd engine) outside the measurement
    step = _build(variant, T)
    gc.collect()
    base = _status_kib("VmRSS")
    _reset_peak()
    t0, c0 = time.perf_counter(), time.process_time()
    step()
    first = (time.perf_counter() - t0, time.process_time() - c0)
    peak_kib = _status_kib("VmHWM") - base
    # time with glibc's usual heap reuse (mmap-ing every buffer costs page faults): one warm-up step,
    # then `repeats` steps, or a single one when a step takes over 5 s
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30)
    times = []
    if first[0] <= 5:
        step()
    for _ in range(max(1, repeats) if first[0] <= 5 else 1):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append((time.perf_counter() - t0, time.process_time() - c0))
    return {"variant": variant, "T": T, "time_s": statistics.median(t for t, _ in times),
            "cpu_s": statistics.median(c for _, c in times), "peak_mib": peak_kib / 1024, "timed_steps": len(times)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", nargs=3, metavar=("VARIANT", "T", "REPEATS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child[0], int(args.child[1]), int(args.child[2]))))
        return
    rows = []
    for T in args.seq_lens:
        for variant in args.variants:
            cmd = [sys.executable, __file__, "--child", variant, str(T), str(args.repeats)]
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # freed buffers leave the RSS at once
            done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"# {variant:9s} T={T:6d} cpu {r['cpu_s']:8.3f} s wall {r['time_s']:8.3f} s {r['peak_mib']:8.1f} MiB "
                  f"load {os.getloadavg()[0]:.1f}", file=sys.stderr)
    print(f"load average after: {os.getloadavg()}", file=sys.stderr)
    by = {(r["variant"], r["T"]): r for r in rows}
    print("| T | " + " | ".join(f"{v}: CPU s / wall s / MiB" for v in args.variants)
          + " | csa vs sdpa mha: speed-up (CPU), memory |")
    print("|---|" + "---|" * (len(args.variants) + 1))
    for T in args.seq_lens:
        cells = [f"{by[v, T]['cpu_s']:.3f} / {by[v, T]['time_s']:.3f} / {by[v, T]['peak_mib']:.0f}"
                 for v in args.variants]
        ratio = ""
        if ("v4 csa", T) in by and ("sdpa mha", T) in by:
            a, b = by["v4 csa", T], by["sdpa mha", T]
            ratio = f"{b['cpu_s'] / a['cpu_s']:.2f}x, {a['peak_mib'] / max(b['peak_mib'], 1e-9):.2f}x"
        print(f"| {T} | " + " | ".join(cells) + f" | {ratio} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
