"""Compare launch configurations of the Triton sparse-attention kernels on one GPU (a tuning sweep).

For each T it builds the V4-Flash CSA problem of ``benchmarks/kernels_gpu.py`` (window + indexer picks)
and times, per candidate :class:`kernels.triton_attention.AttentionConfig`, the forward alone (forward
candidates) or forward + backward with the default forward (backward candidates). Each candidate's
output (forward) or gradients (backward) are compared with the default configuration's: a candidate that
changes the result by more than bf16 rounding is a bug, not a speed-up. The fastest correct candidate is
what ``attention_config`` should return; the table says so, and ``attention_config`` is changed by hand
from a measured table only.

Candidates: the tile sizes the sm_90 compile check passes without exceeding shared memory (BLOCK_H of
16, 32 and 64 heads; BLOCK_K entries), in both launch orders (``heads_fastest``: a token's head blocks
back to back, so they share its KV gather in L2). TFLOP/s counts 4*B*T*H*K*D for the forward and 2.5x
that for the backward, as ``kernels_gpu.py`` does.

Run: ``python benchmarks/sparse_attention_configs.py --out DIR`` (cuda), ``--device cpu`` (interpreter, tiny
shapes: checks the logic only). Writes DIR/sparse_attention_configs.{json,md} after every T.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1] == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernels_gpu  # noqa: E402

from v4train.kernels import triton_module  # noqa: E402

FWD = [(16, 32, 8, 2, False), (16, 32, 8, 2, True), (32, 32, 8, 2, True), (32, 64, 8, 2, True),
       (64, 32, 8, 2, True), (64, 16, 8, 2, True)]
BWD = [(16, 16, 8, 1, False), (16, 16, 8, 1, True), (32, 16, 8, 1, True), (32, 32, 8, 1, True)]


def _configs(rows, D: int):
    attn = triton_module("triton_attention")
    block_d = max(16, 1 << (D - 1).bit_length())
    return [attn.AttentionConfig(BLOCK_H=h, BLOCK_K=k, BLOCK_D=block_d, num_warps=w, num_stages=s, heads_fastest=f)
            for h, k, w, s, f in rows]


def _name(cfg) -> str:
    order = "heads-first" if cfg.heads_fastest else "tokens-first"
    return f"H{cfg.BLOCK_H} K{cfg.BLOCK_K} w{cfg.num_warps} s{cfg.num_stages} {order}"


def sweep(args, T: int, device: torch.device) -> list[dict]:
    """One row per candidate at length T: ms, TFLOP/s, max abs difference from the default's result."""
    attn = triton_module("triton_attention")
    prob = kernels_gpu.make_problem(args, T, device)
    B, H, D, K = prob["q"].shape[0], prob["q"].shape[2], prob["q"].shape[3], prob["indices"].shape[2]
    flops = 4 * B * T * H * K * D

    def run(fwd_cfg=None, bwd_cfg=None, backward=False):
        q, kv, sink = (prob[k].detach().requires_grad_(backward) for k in ("q", "kv", "sink"))
        out = attn.sparse_attention(q, kv, sink, prob["indices"], prob["scale"], fwd_config=fwd_cfg, bwd_config=bwd_cfg)
        if not backward:
            return (out,)
        out.backward(prob["do"])
        return q.grad, kv.grad, sink.grad

    rows = []
    for kind, cands in (("fwd", _configs(FWD, D)), ("fwd+bwd", _configs(BWD, D))):
        backward = kind == "fwd+bwd"
        default = run(backward=backward)
        for cfg in cands:
            row = {"T": T, "kind": kind, "config": _name(cfg)}
            try:
                call = (lambda cfg=cfg: run(None, cfg, True)) if backward else (lambda cfg=cfg: run(cfg))
                ms, res = kernels_gpu.timed(call, args.repeats, device)
                row.update(ms=ms, tflops=flops * (3.5 if backward else 1.0) / ms / 1e9,
                           max_diff=max(float((a.float() - b.float()).abs().max()) for a, b in zip(res, default)))
            except Exception as exc:   # a candidate that cannot launch (shared memory, registers) is a row, not a stop
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| T | pass | config | ms | TFLOP/s | max abs diff vs default |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['T']} | {r['kind']} | {r['config']} | - | - | {r['error']} |")
        else:
            lines.append(f"| {r['T']} | {r['kind']} | {r['config']} | {r['ms']:.2f} | {r['tflops']:.0f} | "
                         f"{r['max_diff']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[16384, 65536])
    p.add_argument("--out", type=Path, default=Path("runs/bench"))
    p.add_argument("--tiny", action="store_true", help="small heads and dims (what --device cpu uses)")
    known, rest = p.parse_known_args(argv)
    args = kernels_gpu.parse_args(rest)
    device = torch.device(args.device)
    if device.type == "cpu":   # the interpreter: tiny shapes, logic only
        args.heads, args.head_dim, args.topk, args.indexer_heads, args.indexer_dim, args.window = 4, 64, 8, 4, 32, 16
        args.repeats = 1
        known.seq_lens = [64]
    known.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for T in known.seq_lens:
        rows += sweep(args, T, device)
        (known.out / "sparse_attention_configs.json").write_text(json.dumps(rows, indent=1))
        (known.out / "sparse_attention_configs.md").write_text(markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
