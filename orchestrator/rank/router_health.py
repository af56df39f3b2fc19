"""Per-layer router health of a training step, over the whole data-parallel group (not one rank's tokens).

Every MoE layer of the stage counts the tokens it routes to each expert and logs its mean router entropy
per training forward (``model/moe.py``: ``MoE.load_counts``, ``MoE.entropy_log``). :func:`collect` reads
them before the step's statistics are cleared; :func:`reduce` sums them over the data-parallel group in one
all-reduce and returns, per layer ``L`` (the model's layer index):

- ``router/L/max_load``: max_i load_i / mean_i load_i (1 = perfect balance, E = every token on one expert);
- ``router/L/dead_experts``: experts that received no token from any data-parallel rank this step;
- ``router/L/entropy``: mean over the group's micro-batches of the mean per-token entropy (nats) of the
  normalised router scores s_i / sum_j s_j (ln E = uniform).

Routing is replicated over tensor-parallel ranks (every TP rank routes every token), so the data-parallel
group holds each token once; under context parallelism the trainer passes the data x context parallel group
(each CP rank routes its share of every sequence).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from v4train.model.moe import MoE

__all__ = ["collect", "reduce"]


def collect(stage: torch.nn.Module) -> list[tuple[int, torch.Tensor, float, int]]:
    """``(layer index, tokens per expert [E] int64, sum of micro-batch entropies, micro-batches)`` of every
    MoE layer of ``stage`` that ran a training forward since its statistics were last cleared."""
    out = []
    for module in stage.modules():
        if isinstance(module, MoE) and module.entropy_log:
            entropies = torch.stack(module.entropy_log)
            out.append((module.gate.layer_idx, module.load_counts.clone(), float(entropies.sum()), len(entropies)))
    return out


def reduce(layers: list[tuple[int, torch.Tensor, float, int]], group: dist.ProcessGroup | None) -> dict[str, float]:
    """The per-layer metrics of :func:`collect`'s layers summed over ``group`` (collective: every rank of
    the group calls it with the same layers; ``group`` None or torch.distributed not initialised: this
    rank alone)."""
    if not layers:
        return {}
    counts_LE = torch.stack([counts for _, counts, _, _ in layers]).to(torch.float64)
    entropy_L2 = torch.tensor([[total, n] for _, _, total, n in layers], dtype=torch.float64)
    packed = torch.cat([counts_LE, entropy_L2], dim=1)
    if group is not None and dist.is_available() and dist.is_initialized():
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    counts_LE, entropy_L2 = packed[:, :-2], packed[:, -2:]
    out = {}
    for (layer, *_), load_E, (total, n) in zip(layers, counts_LE, entropy_L2):
        out[f"router/{layer}/max_load"] = float(load_E.max() / load_E.mean().clamp(min=1e-30))
        out[f"router/{layer}/dead_experts"] = float((load_E == 0).sum())
        out[f"router/{layer}/entropy"] = float(total / n)
    return out
