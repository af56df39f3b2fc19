"""Peak memory of one context-parallel attention layer's training forward and backward (HCA by default).

Each of ``--cp`` gloo ranks builds the same attention layer (nano with small widths, so the per-query slot
bookkeeping is a visible share of the layer's memory; ``--ratio`` 128 for V4's HCA), takes its
load-balanced share of one packed sequence of ``--seq-len`` tokens (two documents) and runs
``parallel.context_parallel.context_parallel_attention`` forward and backward in ``--mode``. Reported per
rank: the growth of peak resident memory over the forward and backward (``ru_maxrss`` after minus before:
activations, index lists, exchange buffers, gradients; the layer and the process excluded) and the time.

    python benchmarks/context_parallel_layer.py --seq-len 65536 --cp 2
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402

from support.spawn import run_in_world  # noqa: E402
from v4train.model.attention import Attention  # noqa: E402
from v4train.model.config import ModelConfig  # noqa: E402
from v4train.parallel.context_parallel import (ContextParallel, CPSequence, context_parallel_attention,  # noqa: E402
                                               shard_tokens)

LAYER = 2  # compress_ratios (0, 4, ratio, 4, 0): layer 2 is the HCA layer


def _cfg(ratio: int) -> ModelConfig:
    return ModelConfig.preset("nano", dim=32, n_heads=4, head_dim=16, rope_head_dim=8, q_lora_rank=16, o_groups=2,
                              o_lora_rank=16, window=16, index_n_heads=2, index_head_dim=8, index_topk=8,
                              compress_ratios=(0, 4, ratio, 4, 0))


def _rank(pctx, seq_len: int, ratio: int, mode: str) -> dict:
    """One CP rank (``support.spawn.run_in_world``): the layer's forward and backward on its share of the
    sequence; its peak-memory growth (MiB), time (s) and output checksum."""
    cp = pctx.cp
    cpg = ContextParallel(pctx.cp_group, pctx.cp_rank, cp) if cp > 1 else ContextParallel()
    cfg = _cfg(ratio)
    attn = Attention(cfg, layer_idx=LAYER).train()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    doc = seq_len // 3
    pos = torch.cat((torch.arange(doc), torch.arange(seq_len - doc)))[None]
    x = shard_tokens(torch.randn(1, seq_len, cfg.dim, generator=gen), cp, cpg.rank).requires_grad_(True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    y = context_parallel_attention(attn, x, CPSequence(pos, cpg, attention_mode=mode))
    y.square().sum().backward()
    step_s = time.perf_counter() - start
    grow = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    return {"grow_mib": grow / 1024, "step_s": step_s, "y_abs_sum": float(y.detach().abs().sum())}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=65536)
    parser.add_argument("--cp", type=int, default=2)
    parser.add_argument("--ratio", type=int, default=128)
    parser.add_argument("--mode", default="dense", choices=("dense", "indexer_warmup", "sparse"))
    args = parser.parse_args(argv)
    ranks = run_in_world(_rank, (args.seq_len, args.ratio, args.mode), args.cp, {"cp": args.cp}, deadline_s=3600,
                         what=f"cp={args.cp} T={args.seq_len}")
    result = {"cp": args.cp, "seq_len": args.seq_len, "ratio": args.ratio, "mode": args.mode,
              "max_grow_mib": max(r["grow_mib"] for r in ranks), "max_step_s": max(r["step_s"] for r in ranks),
              "y_abs_sum": [r["y_abs_sum"] for r in ranks]}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
