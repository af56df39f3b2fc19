"""Anticipatory routing (spec section 8.1), the rank side: route step t with the parameters of step t-1.

While the supervisor keeps it on (``orchestrator/control/decisions.py`` opens the window after a spike or
a drill), each step's plan carries the following step's plan: during step t, before the optimizer update,
the rank runs a routing-only forward over the batch step t+1 will train on and records every MoE layer's
chosen experts (:func:`capture`); step t+1 then replays those indices (:func:`replay_tape`) while its gate
weights use the current scores (``model/moe.py``'s :class:`RoutingTape`). The recorded rows are part of the
checkpoint (``train_state.json``: ``anticipatory_routing.rows``, merged over data-parallel ranks), so a run
resumed on any layout replays the same indices. Under context parallelism a rank captures and replays the
rows of its own tokens; the checkpoint and the fingerprint see whole sequences (gathered over the CP ranks).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import torch
import torch.distributed as dist

from v4train.model.moe import Router, RoutingTape, set_routing_tape
from v4train.orchestrator import checkpoint
from v4train.parallel import groups
from v4train.parallel.context_parallel import ContextParallel, gather_sequence, shard_tokens

__all__ = ["RoutingRows", "replay_tape", "capture", "fingerprint"]

_NO_CP = ContextParallel()  # one rank holds whole sequences

# {layer: [rows, seq, top-k] int64 routed expert indices of this rank's rows of the global batch (seq: this
# rank's tokens of each sequence under context parallelism)}
Rows = dict[int, torch.Tensor]


def replay_tape(rows: Rows, micro_batch_size: int) -> RoutingTape:
    """A replay tape from {layer: [b, S, K]} rows, one entry per micro-batch of ``micro_batch_size`` rows."""
    return RoutingTape("replay", {layer: [chunk.reshape(-1, t.shape[-1]) for chunk in t.split(micro_batch_size)]
                                  for layer, t in rows.items()})


@torch.no_grad()
def capture(stage, run_forward: Callable[[], object], batch_rows: int, seq_len: int) -> Rows:
    """A routing-only forward (``run_forward``: the schedule forward-only, no gradients) of ``batch_rows``
    sequences of ``seq_len`` tokens; returns {layer: [batch_rows, seq_len, K]}. Balancing counts and
    auxiliary metrics of the capture are discarded."""
    tape = RoutingTape("capture")
    set_routing_tape(stage, tape)
    try:
        run_forward()
    finally:
        set_routing_tape(stage, None)
        stage.pop_aux_metrics()
    return {layer: torch.cat(chunks).view(batch_rows, seq_len, -1) for layer, chunks in tape.indices.items()}


def fingerprint(rows: Rows, tp_rank: int, cp: ContextParallel = _NO_CP) -> int:
    """Sum over layers and sequences of crc32 of the routed indices replayed this step (all ranks; whole
    sequences, so every layout of the same run gives the same number)."""
    whole = {layer: gather_sequence(t, cp) for layer, t in sorted(rows.items())}
    # TP ranks replay the same rows, and CP ranks now hold the same whole rows: count them once
    crc = 0 if tp_rank or cp.rank else sum(zlib.crc32(r.to(torch.int16).cpu().numpy().tobytes())
                                           for t in whole.values() for r in t)
    total = torch.tensor([crc], dtype=torch.int64, device=groups.collective_device())
    dist.all_reduce(total)
    return int(total.item())


class RoutingRows:
    """The routing this rank captured ahead of time: {step: rows}."""

    def __init__(self) -> None:
        self.by_step: dict[int, Rows] = {}

    def take(self, step: int) -> Rows | None:
        """The rows captured for ``step`` (None: routing switched on at this step, capture it now)."""
        return self.by_step.pop(step, None)

    def put(self, step: int, rows: Rows) -> None:
        self.by_step[step] = rows

    def clear(self) -> None:
        """Forget every capture (after a rollback: they belong to the abandoned trajectory)."""
        self.by_step.clear()

    def encoded(self, cp: ContextParallel = _NO_CP) -> dict:
        """This rank's rows for ``RankSave.routing``: {step: {layer: encoded rows}}, whole sequences
        (collective over the CP group: every CP rank of a data-parallel replica then reports the same rows)."""
        return {str(step): {str(layer): checkpoint.encode_rows(gather_sequence(rows[layer], cp))
                            for layer in sorted(rows)}
                for step, rows in sorted(self.by_step.items())}

    def load(self, saved: dict, stage, dp_rank: int, dp: int, cp: ContextParallel = _NO_CP) -> None:
        """Take this rank's rows of a checkpoint's global tape ({step: {layer: [G, S, K]}}), any layout
        (under context parallelism: this CP rank's tokens of them)."""
        mine = {m.layer_idx for m in stage.modules() if isinstance(m, Router) and not m.is_hash}
        self.by_step = {}
        for step, layers in saved.items():
            rows = {}
            for layer, blob in layers.items():
                if int(layer) in mine:
                    full = checkpoint.decode_rows(blob)
                    b = full.shape[0] // dp
                    mine_BSK = full[dp_rank * b:(dp_rank + 1) * b]
                    rows[int(layer)] = (shard_tokens(mine_BSK, cp.size, cp.rank) if cp.active else mine_BSK).clone()
            self.by_step[int(step)] = rows
