"""Context parallelism on the simulated cluster: the longest sequence under a per-rank memory cap at CP = 1, 2, 4,
the bytes each rank moves per step against ring attention, and the step time.

Each point spawns ``cp`` gloo ranks; every rank builds the same one-stage model (``--preset``, default
nano, with ``--set``-style overrides), runs one training forward and backward in ``sparse`` mode on its
share of one packed sequence of T tokens, and reports the growth of its peak resident memory over the
forward and backward (``ru_maxrss`` after minus before: activations, the exchanges' buffers and
gradients; the model and the process are excluded), the step time, and the bytes it handed to
``torch.distributed`` (counted at the calls: halo rows point to point, entries all-gathered, their
gradients all-reduced, position ids and labels all-gathered). Ring attention's bytes are the formula
(it does not exist here): every rank passes its K and V blocks (one shared head of head_dim) around
the ring, cp - 1 hops forward and the same with their gradients backward, per layer.

For each cp the sequence length doubles from ``--start`` while the largest rank's growth stays within
``--cap-mib``; the longest that fits is reported.

    python benchmarks/context_parallel.py --cap-mib 400
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
import torch.distributed as dist  # noqa: E402

from support.spawn import run_in_world  # noqa: E402
from v4train.model.config import ModelConfig  # noqa: E402
from v4train.model.transformer import V4Stage  # noqa: E402
from v4train.parallel.context_parallel import ContextParallel, exchange_bytes, shard_tokens  # noqa: E402


class _ByteCounter:
    """Counts the bytes this rank hands to torch.distributed's point-to-point and collective calls."""

    def __init__(self):
        self.bytes = 0
        self._saved = {}

    def __enter__(self):
        for name in ("all_gather", "all_reduce", "P2POp"):
            self._saved[name] = getattr(dist, name)
        counter = self

        def all_gather(parts, tensor, *a, **k):
            counter.bytes += tensor.numel() * tensor.element_size() * (len(parts) - 1)
            return counter._saved["all_gather"](parts, tensor, *a, **k)

        def all_reduce(tensor, *a, **k):
            world = dist.get_world_size(k.get("group"))
            counter.bytes += 2 * (world - 1) / world * tensor.numel() * tensor.element_size()  # ring all-reduce
            return counter._saved["all_reduce"](tensor, *a, **k)

        def p2p(op, tensor, *a, **k):
            if op is dist.isend:
                counter.bytes += tensor.numel() * tensor.element_size()
            return counter._saved["P2POp"](op, tensor, *a, **k)

        dist.all_gather, dist.all_reduce, dist.P2POp = all_gather, all_reduce, p2p
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(dist, name, fn)


def _cfg(preset: str, overrides: dict) -> ModelConfig:
    return ModelConfig.preset(preset, **overrides)


def _rank(pctx, seq_len: int, preset: str, overrides: dict) -> dict:
    """One CP rank (``support.spawn.run_in_world``): the stage's sparse forward and backward on its share of the
    sequence; its peak-memory growth (MiB), time (s) and bytes sent."""
    cp = pctx.cp
    cpg = ContextParallel(pctx.cp_group, pctx.cp_rank, cp) if cp > 1 else ContextParallel()
    cfg = _cfg(preset, overrides)
    stage = V4Stage(cfg, pp_rank=0, pp_size=1, cp=cpg)
    stage.init_weights(0)
    stage.train()
    stage.attention_mode = "sparse"
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (1, seq_len), generator=gen)
    doc = seq_len // 3
    pos = torch.cat((torch.arange(doc), torch.arange(seq_len - doc)))[None]
    labels = torch.roll(ids, -1, dims=1)
    local = [shard_tokens(t, cp, cpg.rank) if cp > 1 else t for t in (ids, pos, labels)]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with _ByteCounter() as counted:
        stage(*local).sum().backward()
    step_s = time.perf_counter() - start
    grow = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    return {"grow_mib": grow / 1024, "step_s": step_s, "bytes": counted.bytes}


def measure(cp: int, seq_len: int, preset: str, overrides: dict) -> dict:
    ranks = run_in_world(_rank, (seq_len, preset, overrides), cp, {"cp": cp}, deadline_s=1800,
                         what=f"cp={cp} T={seq_len}")
    exchange = exchange_bytes(_cfg(preset, overrides), seq_len, cp)
    return {"cp": cp, "seq_len": seq_len, "max_grow_mib": max(r["grow_mib"] for r in ranks),
            "max_step_s": max(r["step_s"] for r in ranks), "bytes_per_rank": max(r["bytes"] for r in ranks),
            "exchange_formula_bytes": exchange["cp_exchange"], "ring_attention_bytes": exchange["ring_attention"]}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--model", default='{"balance_loss_weight": 0.0}',
                        help="JSON overrides of the preset")
    parser.add_argument("--cap-mib", type=float, default=400.0)
    parser.add_argument("--start", type=int, default=1024)
    parser.add_argument("--max-len", type=int, default=65536)
    parser.add_argument("--cps", default="1,2,4")
    parser.add_argument("--out", default=str(ROOT / "runs" / "context_parallel.json"))
    args = parser.parse_args(argv)
    overrides = json.loads(args.model)
    points, longest = [], {}
    for cp in (int(c) for c in args.cps.split(",")):
        seq_len = args.start
        while seq_len <= args.max_len:
            point = measure(cp, seq_len, args.preset, overrides)
            points.append(point)
            print(json.dumps(point), flush=True)
            if point["max_grow_mib"] > args.cap_mib:
                break
            longest[cp] = point
            seq_len *= 2
    result = {"preset": args.preset, "overrides": overrides, "cap_mib": args.cap_mib, "points": points,
              "longest": {str(cp): p["seq_len"] for cp, p in longest.items()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result["longest"]))
    return result


if __name__ == "__main__":
    main()
