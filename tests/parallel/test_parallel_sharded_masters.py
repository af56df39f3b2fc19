"""parallel.sharded_masters: under bf16 the distributed optimizer's ranks keep only the fp32 masters they update.

Two gloo ranks step a nano stage with the V4 optimizer (Muon + AdamW, both distributed) under ``MixedPrecision``
with sharded masters, beside the replicated optimizer with whole masters on the same gradients: the bf16 copies
and the gathered masters equal the replicated run's bit for bit, and each rank keeps about half the masters."""

from __future__ import annotations

import datetime
import faulthandler

import pytest
import torch
import torch.distributed as dist

from support.model import whole_stage
from support.spawn import free_ports, spawn_ranks
from v4train.model import ModelConfig
from v4train.parallel.mixed_precision import MixedPrecision, computes_in_bf16
from v4train.parallel.optim import build_optimizer
from v4train.parallel.sharded_masters import placeholder

WORLD = 2
RANK_HANG_S = 240
SETTINGS = dict(algorithm="muon", lr=1e-2, weight_decay=0.1, eps=1e-8)


def test_torch_accepts_a_full_gradient_on_a_placeholder_and_refuses_writes_into_it():
    """The library behaviour the placeholder relies on: fails if torch changes it."""
    p = torch.nn.Parameter(torch.randn(5, 7))
    p.data = placeholder(p.shape)
    assert p.untyped_storage().nbytes() == 4 and p.dtype == torch.float32 and p.shape == (5, 7)
    p.grad = torch.ones(5, 7)
    assert torch.isnan(p.detach().clone()).all()
    with pytest.raises(RuntimeError, match="more than one element"):
        p.detach().copy_(torch.zeros(5, 7))


def _stage():
    cfg = ModelConfig.preset("nano", vocab_size=256, dim=64, q_lora_rank=32, o_lora_rank=32, moe_inter_dim=64,
                             window=8)
    return whole_stage(cfg, "sparse", 1234)


def _rank(rank: int, port: int, out_dir: str) -> None:
    faulthandler.dump_traceback_later(RANK_HANG_S, exit=True)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        plain, sharded = _stage(), _stage()
        ref_opt = build_optimizer(plain.named_parameters(), **SETTINGS)
        named = list(sharded.named_parameters())
        groups = [(dist.group.WORLD, [p for n, p in named if ".experts." not in n]),
                  (dist.group.WORLD, [p for n, p in named if ".experts." in n])]
        opt = build_optimizer(named, **SETTINGS, muon_shard_groups=groups, adamw_shard_groups=groups)
        ref_mp, mp = MixedPrecision(plain, "bf16"), MixedPrecision(sharded, "bf16", opt.optimizers)
        for step in range(2):
            gen = torch.Generator().manual_seed(step)  # the same (already reduced) gradients on both ranks
            for (_, p), (_, q) in zip(plain.named_parameters(), named, strict=True):
                p.grad = torch.randn(p.shape, generator=gen)
                q.grad = p.grad.clone()
            ref_opt.step()
            opt.step()
        with ref_mp.compute(), mp.compute():
            copies = {n: (p.detach().clone(), q.detach().clone())
                      for (n, p), (_, q) in zip(plain.named_parameters(), named, strict=True)}
        with mp.whole_masters():
            masters = {n: (p.detach().clone(), q.detach().clone())
                       for (n, p), (_, q) in zip(plain.named_parameters(), named, strict=True)}
        bf16_numel = sum(p.numel() for n, p in plain.named_parameters() if computes_in_bf16(n))
        torch.save({"copies": copies, "masters": masters, "master_bytes": mp.sharded.master_bytes(),
                    "bf16_numel": bf16_numel, "outside": {n: q.untyped_storage().nbytes() for n, q in named}},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
        faulthandler.cancel_dump_traceback_later()


@pytest.mark.timeout(300)
def test_sharded_masters_equal_the_replicated_masters_bitwise(tmp_path):
    spawn_ranks(_rank, (free_ports(1)[0], str(tmp_path)), WORLD, 240, "sharded masters")
    out = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    total = 0
    for r, o in enumerate(out):
        for name, (want, got) in o["copies"].items():
            assert got.dtype == want.dtype and torch.equal(got, want), (r, name)
        for name, (want, got) in o["masters"].items():
            assert got.dtype == torch.float32 and torch.equal(got, want), (r, name)
        for name, nbytes in o["outside"].items():  # between steps a bf16-computed weight holds no fp32 values
            assert nbytes == (4 if computes_in_bf16(name) else o["masters"][name][0].numel() * 4), (r, name)
        total += o["master_bytes"]
        # Muon matrices are owned whole: a rank's share is near, not exactly, half
        assert 0.3 <= o["master_bytes"] / (4 * o["bf16_numel"]) <= 0.7, (r, o["master_bytes"])
    assert total == 4 * out[0]["bf16_numel"]  # every master on exactly one rank
