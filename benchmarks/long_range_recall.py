"""A long-range key -> value recall probe, hybrid V4 vs an all-SWA control.

Task (synthetic, one document per sequence of T = 128 tokens): ``--pairs`` (key, value) pairs sit in the
first 32 tokens, random filler fills the rest, and the sequence ends with ``QUERY key_i``; the model
must predict ``value_i``. The pairs are at least 93 tokens before the question: more than 4 windows
of 16 and beyond the 4 x 15 = 60-token receptive field of four stacked sliding-window layers, so
only compressed (CSA/HCA) entries can carry them. The loss is the cross-entropy of the answer token
only (labels -100 elsewhere).

Models: a 4-layer V4 at a tiny width (d 64, 2 heads x 32, window 16, MoE 4 experts top-2, mHC 4
streams), no MTP. Hybrid: ``compress_ratios`` (0, 4, 16, 4) = SWA, CSA, HCA, CSA, ``dense`` attention
mode. Control: (0, 0, 0, 0), all SWA, with the shared/routed expert width raised so the parameter
counts match (printed). Same data, seed, optimiser (AdamW 3e-3, cosine to 10%), steps and batch.
Reported: answer accuracy and loss on 1024 held-out sequences (chance accuracy = 1 / n_values).

    python benchmarks/long_range_recall.py                  # 1 pair, 400 steps x 32 sequences
    python benchmarks/long_range_recall.py --pairs 2        # associative recall: the key must be matched
    python benchmarks/long_range_recall.py --steps 100      # quick look
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from v4train.model import ModelConfig, V4Stage  # noqa: E402
from v4train.model.budget import param_counts  # noqa: E402

T, PAIR_REGION = 128, 32
N_FILLER, N_KEYS, N_VALUES = 16, 16, 16
KEY0, VALUE0 = N_FILLER, N_FILLER + N_KEYS
QUERY = VALUE0 + N_VALUES
VOCAB = QUERY + 1
BASE = dict(vocab_size=VOCAB, dim=64, n_layers=4, mtp_depth=0, n_heads=2, head_dim=32, rope_head_dim=8,
            q_lora_rank=32, o_groups=2, o_lora_rank=32, window=16, index_n_heads=2, index_head_dim=16,
            index_topk=8, n_routed_experts=4, n_activated_experts=2, moe_inter_dim=64, n_hash_layers=1,
            bias_update_speed=0.01)


def make_batch(n: int, pairs: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids [n, T], labels [n, T])``: pairs in the first 32 tokens, the question at the end."""
    ids = torch.randint(0, N_FILLER, (n, T), generator=gen)
    keys = torch.stack([torch.randperm(N_KEYS, generator=gen)[:pairs] for _ in range(n)]) + KEY0
    values = torch.randint(0, N_VALUES, (n, pairs), generator=gen) + VALUE0
    slots = torch.stack([torch.randperm(PAIR_REGION // 2, generator=gen)[:pairs] for _ in range(n)]) * 2
    rows = torch.arange(n).unsqueeze(1)
    ids[rows, slots], ids[rows, slots + 1] = keys, values
    ask = torch.randint(0, pairs, (n,), generator=gen)
    ids[:, T - 2] = QUERY
    ids[:, T - 1] = keys[torch.arange(n), ask]
    labels = torch.full((n, T), -100)
    labels[:, T - 1] = values[torch.arange(n), ask]
    return ids, labels


def build(kind: str, seed: int) -> V4Stage:
    if kind == "hybrid":
        cfg = ModelConfig.preset("nano", **BASE, compress_ratios=(0, 4, 16, 4))
    else:
        target = param_counts(ModelConfig.preset("nano", **BASE, compress_ratios=(0, 4, 16, 4)))["total"]
        # widen the experts until the all-SWA control has at least the hybrid's parameters
        inter = BASE["moe_inter_dim"]
        while param_counts(ModelConfig.preset("nano", **{**BASE, "moe_inter_dim": inter},
                                          compress_ratios=(0, 0, 0, 0)))["total"] < target:
            inter += 1
        cfg = ModelConfig.preset("nano", **{**BASE, "moe_inter_dim": inter}, compress_ratios=(0, 0, 0, 0))
    stage = V4Stage(cfg, pp_rank=0, pp_size=1)
    stage.attention_mode = "dense"  # every layer is SWA (compress_ratios all 0): no compressed entries
    stage.init_weights(seed)
    return stage


@torch.no_grad()
def evaluate(stage: V4Stage, ids: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    stage.eval()
    pos = torch.arange(T).expand_as(ids)
    logits = torch.cat([stage(ids[i:i + 128], pos[i:i + 128])[:, -1] for i in range(0, len(ids), 128)])
    target = labels[:, -1]
    stage.train()
    return float((logits.argmax(-1) == target).float().mean()), float(torch.nn.functional.cross_entropy(logits, target))


def train(kind: str, args) -> dict:
    from v4train.model.moe import update_expert_bias

    torch.manual_seed(args.seed)
    stage = build(kind, args.seed).train()
    opt = torch.optim.AdamW(stage.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    eval_ids, eval_labels = make_batch(1024, args.pairs, torch.Generator().manual_seed(10_000 + args.seed))
    pos = torch.arange(T).expand(args.batch, T)
    start, curve = time.perf_counter(), []
    for step in range(1, args.steps + 1):
        for group in opt.param_groups:
            group["lr"] = args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        ids, labels = make_batch(args.batch, args.pairs, gen)
        loss = stage(ids, pos, labels)[:, -1].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(stage.parameters(), 1.0)
        opt.step()
        update_expert_bias(stage, None)
        stage.pop_aux_metrics()
        if step % args.eval_every == 0 or step == args.steps:
            acc, val = evaluate(stage, eval_ids, eval_labels)
            curve.append((step, round(acc, 4), round(val, 4)))
            print(f"# {kind:7s} step {step:5d} train {loss.item():.3f} eval acc {acc:.3f} loss {val:.3f} "
                  f"({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    acc, val = evaluate(stage, eval_ids, eval_labels)
    return {"model": kind, "params": sum(p.numel() for p in stage.parameters()),
            "compress_ratios": list(stage.cfg.compress_ratios), "moe_inter_dim": stage.cfg.moe_inter_dim,
            "accuracy": acc, "loss": val, "train_s": time.perf_counter() - start, "curve": curve}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--pairs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", nargs="+", default=["hybrid", "swa"], choices=["hybrid", "swa"])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [train(kind, args) for kind in args.models]
    print("| model | compress_ratios | params | answer accuracy | answer loss | train time |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['compress_ratios']} | {r['params']:,} | {r['accuracy']:.3f} | {r['loss']:.3f} | "
              f"{r['train_s']:.0f} s |")
    print(f"chance accuracy {1 / N_VALUES:.3f}; {args.pairs} pairs, {args.steps} steps x {args.batch} sequences of {T}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
