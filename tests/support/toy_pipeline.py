"""A toy pipeline model, its data and a plain single-process reference, for the schedule parity tests.

The toy stage model (embedding, residual LayerNorm/Linear blocks, head + per-token cross-entropy; layers
keyed by global index, boundary ``x_SBH``) initialises every parameter from its name, so any split into
stages builds the values of the single-stage reference. Shape letters: B batch, S sequence, H hidden (the
stage boundary width), V vocabulary.
"""

from __future__ import annotations

import datetime
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from v4train.parallel.groups import ParallelContext

V, H, S, NUM_LAYERS = 16, 8, 4, 4
GLOBAL_BATCH, MICROBATCHES, STEPS = 8, 4, 2
LR, WEIGHT_DECAY, EPS, MAX_NORM = 1e-2, 0.1, 1e-8, 0.5
RTOL = 1e-6


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(H)
        self.proj = nn.Linear(H, H)

    def forward(self, x_SBH: torch.Tensor) -> torch.Tensor:
        return x_SBH + torch.tanh(self.proj(self.norm(x_SBH)))


class ToyStage(nn.Module):
    """Stage ``pp_rank`` of ``pp_size`` of the toy model; parameters are initialised from their
    names, so every split builds the same values as the single-stage reference."""

    def __init__(self, pp_rank: int, pp_size: int) -> None:
        super().__init__()
        per_stage = NUM_LAYERS // pp_size
        self.embed = nn.Embedding(V, H) if pp_rank == 0 else None
        self.layers = nn.ModuleDict(
            {str(i): _Block() for i in range(pp_rank * per_stage, (pp_rank + 1) * per_stage)}
        )
        self.head = nn.Linear(H, V) if pp_rank == pp_size - 1 else None
        self.input_SBH = None
        with torch.no_grad():
            for name, param in self.named_parameters():
                gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)

    def set_input_tensor(self, x_SBH: torch.Tensor | None) -> None:
        self.input_SBH = x_SBH

    def forward(self, tokens_BS: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
        x_SBH = self.embed(tokens_BS).transpose(0, 1) if self.embed is not None else self.input_SBH
        for block in self.layers.values():
            x_SBH = block(x_SBH)
        if self.head is None:
            return x_SBH
        logits_BSV = self.head(x_SBH).transpose(0, 1)
        loss_N = F.cross_entropy(logits_BSV.reshape(-1, V), labels_BS.reshape(-1), reduction="none")
        return loss_N.view(labels_BS.shape)


def global_batches() -> tuple[torch.Tensor, torch.Tensor]:
    """tokens and labels, each [STEPS, GLOBAL_BATCH, S]."""
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, V, (STEPS, GLOBAL_BATCH, S + 1), generator=gen)
    return ids[..., :-1], ids[..., 1:]


def microbatches(step: int, pctx: ParallelContext, num_microbatches: int) -> list[tuple]:
    """This DP rank's contiguous slice of the global batch, cut into microbatches."""
    tokens, labels = global_batches()
    per_rank = GLOBAL_BATCH // pctx.dp
    rows = slice(pctx.dp_rank * per_rank, (pctx.dp_rank + 1) * per_rank)
    return list(
        zip(tokens[step, rows].chunk(num_microbatches), labels[step, rows].chunk(num_microbatches))
    )


def forward_step(data_iterator, model):
    """The ``forward_step_func`` of Megatron's schedules for the toy model."""
    tokens_BS, labels_BS = next(data_iterator)
    output = model(tokens_BS, labels_BS)

    def loss_func(loss_BS):
        loss = loss_BS.mean()
        # Deliberately shares storage with `loss`: forward_backward must protect it from
        # Megatron's in-place division by num_microbatches.
        return loss, {"loss": loss.detach()}

    return output, loss_func


def refusal(fn) -> str:
    """The ValueError message ``fn()`` raises, or ``"no error"``."""
    try:
        fn()
    except ValueError as err:
        return str(err)
    return "no error"


def join(port: int, rank: int, world_size: int) -> None:
    """Join a gloo world of ``world_size`` ranks at ``127.0.0.1:port`` (60 s collective timeout)."""
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )


def single_process_reference() -> dict:
    """Plain single-process training: full batch, torch AdamW and torch clip_grad_norm_."""
    model = ToyStage(0, 1)
    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for _, p in named if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
            {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0},
        ],
        lr=LR, betas=(0.9, 0.95), eps=EPS,
    )
    tokens, labels = global_batches()
    losses, norms = [], []
    for step in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        loss = model(tokens[step], labels[step]).mean()
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM).item())
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        eval_loss = model(tokens[0], labels[0]).mean().item()
    assert min(norms) > MAX_NORM, "clipping must be active for the parity test to cover it"
    return {
        "losses": losses, "norms": norms, "eval_loss": eval_loss,
        "params": {name: p.detach().clone() for name, p in named},
    }


def assert_layout_matches(results: list[dict], reference: dict, pp: int, dp: int) -> None:
    """Every rank's parameters, norms and losses of a (pp, dp) run equal the single-process reference (RTOL),
    and data-parallel replicas are bit-identical."""
    assert sorted((r["pp_rank"], r["dp_rank"]) for r in results) == [
        (p, d) for p in range(pp) for d in range(dp)
    ]
    names = set().union(*(r["params"] for r in results))
    assert names == set(reference["params"])
    for r in results:
        for name, value in r["params"].items():
            torch.testing.assert_close(value, reference["params"][name], rtol=RTOL, atol=1e-7)
        assert r["norms"] == pytest.approx(reference["norms"], rel=RTOL)
        assert r["grads_after_eval"] == []
        if r["pp_rank"] == pp - 1:
            assert r["losses"] == pytest.approx(reference["losses"], rel=RTOL)
            assert r["eval_loss"] == pytest.approx(reference["eval_loss"], rel=RTOL)
        else:
            assert r["losses"] == [] and r["eval_loss"] is None
    for a in results:  # data-parallel replicas stay bit-identical
        for b in results:
            if a["pp_rank"] == b["pp_rank"]:
                assert all(torch.equal(a["params"][n], b["params"][n]) for n in a["params"])
