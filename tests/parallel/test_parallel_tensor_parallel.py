"""Tensor parallelism inside the V4 modules: a TP=2 stage equals the single-process stage.

Two gloo ranks build the small V4 model (SWA, CSA with the Lightning Indexer, HCA, MTP, MoE with a shared
expert, hash and learned routing) with ``TensorParallel`` of size 2 and compare, in every attention mode,
the per-token loss (MTP and auxiliary losses in the backward) and every parameter gradient (the shards
gathered into whole tensors) with a one-process stage built from the same seed. A watchdog turns a hang
into a failure.
"""

from __future__ import annotations

import datetime
import faulthandler

import pytest
import torch
import torch.distributed as dist

from support.spawn import free_ports, spawn_ranks
from v4train.model import V4Stage
from v4train.model.attention import Attention
from v4train.model.config import ModelConfig
from v4train.parallel import groups
from v4train.parallel.tensor_parallel import TensorParallel, gather_full

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU/gloo suite")
HANG_S = 240
MODES = ("dense", "indexer_warmup", "sparse")


def _cfg() -> ModelConfig:
    return ModelConfig.preset("nano", vocab_size=64, dim=32, n_heads=4, head_dim=16, rope_head_dim=8,
                              q_lora_rank=16, o_groups=2, o_lora_rank=16, window=4, index_n_heads=2,
                              index_head_dim=8, index_topk=3, compress_ratios=(0, 4, 8, 4, 0), moe_inter_dim=32)


def _batch():
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 64, (2, 24), generator=gen)
    pos = torch.arange(24).repeat(2, 1)
    pos[1, 10:] -= 10  # a second document starts at position 10 of row 1
    labels = torch.roll(ids, -1, dims=1)
    labels[:, -1] = -100
    return ids, pos, labels


def _loss_and_grads(stage: V4Stage, mode: str, tp: TensorParallel):
    stage.zero_grad(set_to_none=True)
    stage.attention_mode = mode
    ids, pos, labels = _batch()
    loss_BS = stage(ids, pos, labels)
    loss_BS.mean().backward()
    grads = {}
    for name, p in stage.named_parameters():
        if p.grad is None:
            continue
        grad = p.grad.clone()
        if tp.active and ".ffn.experts." in name:
            # routed experts saw this rank's share of the tokens: the trainer sums them over the
            # expert-data-parallel group, which here is the TP pair
            dist.all_reduce(grad, group=tp.group)
        grads[name] = gather_full(grad, p, tp)
    return loss_BS.detach(), grads


def _rank(rank: int, port: int, out_dir: str) -> None:
    faulthandler.dump_traceback_later(HANG_S, exit=True)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=HANG_S))
    pctx = groups.initialize(tp=2, pp=1, ep=1, dp=1)
    tp = TensorParallel(pctx.tp_group, pctx.tp_rank, pctx.tp)
    torch.manual_seed(0)
    stage = V4Stage(_cfg(), pp_rank=0, pp_size=1, tp=tp)
    stage.init_weights(3)
    reference = V4Stage(_cfg(), pp_rank=0, pp_size=1)
    reference.init_weights(3)
    result = {}
    for mode in MODES:
        loss, grads = _loss_and_grads(stage, mode, tp)
        ref_loss, ref_grads = _loss_and_grads(reference, mode, TensorParallel())
        # relative to each tensor's largest entry, floored at 1e-3 of the largest gradient entry of the
        # model: a few mHC scalars have gradients near 1e-7 (cancelling sums) where fp32 reduction
        # order alone moves the relative error to 1e-3
        floor = 1e-3 * max(g.abs().max().item() for g in ref_grads.values())
        worst = max((((grads[n] - g).abs().max() / g.abs().max().clamp(min=floor)).item(), n)
                    for n, g in ref_grads.items() if n in grads)
        result[mode] = {
            "loss_err": ((loss - ref_loss).abs().max() / ref_loss.abs().max()).item(),
            "grad_err": worst,
            "missing": sorted(set(ref_grads) ^ set(grads)),
        }
    shapes = {n: tuple(p.shape) for n, p in stage.named_parameters()}
    groups.destroy()
    dist.destroy_process_group()
    torch.save((result, shapes), f"{out_dir}/rank{rank}.pt")
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def tp2_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("tp2")
    spawn_ranks(_rank, (free_ports(1)[0], str(out_dir)), 2, HANG_S + 30, "tensor-parallel ranks")
    return {rank: torch.load(out_dir / f"rank{rank}.pt") for rank in range(2)}


@pytest.mark.parametrize("mode", MODES)
def test_tp2_stage_matches_single_process(tp2_results, mode):
    for rank, (result, _) in tp2_results.items():
        r = result[mode]
        assert not r["missing"], f"rank {rank}: gradients present on one side only: {r['missing']}"
        assert r["loss_err"] < 1e-5, f"rank {rank} {mode}: loss differs by {r['loss_err']:.2e} (relative)"
        err, name = r["grad_err"]
        assert err < 1e-4, f"rank {rank} {mode}: the gradient of {name} differs by {err:.2e} (relative)"


def test_tp2_splits_heads_groups_and_vocabulary(tp2_results):
    _, shapes = tp2_results[0]
    cfg = _cfg()
    assert shapes["layers.1.attn.wq_b.weight"] == (cfg.n_heads * cfg.head_dim // 2, cfg.q_lora_rank)
    assert shapes["layers.1.attn.attn_sink"] == (cfg.n_heads // 2,)
    group_width = cfg.n_heads * cfg.head_dim // cfg.o_groups
    assert shapes["layers.1.attn.wo_a.weight"] == (cfg.o_groups * cfg.o_lora_rank // 2, group_width)
    assert shapes["layers.1.attn.wo_b.weight"] == (cfg.dim, cfg.o_groups * cfg.o_lora_rank // 2)
    assert shapes["layers.1.attn.indexer.weights_proj.weight"] == (cfg.index_n_heads // 2, cfg.dim)
    assert shapes["embed.weight"] == (cfg.vocab_size // 2, cfg.dim)
    assert shapes["head.weight"] == (cfg.vocab_size // 2, cfg.dim)
    assert shapes["layers.1.ffn.shared_experts.w2.weight"] == (cfg.dim, cfg.moe_inter_dim // 2)
    assert shapes["layers.1.attn.wkv.weight"] == (cfg.head_dim, cfg.dim)  # the shared KV head is replicated


def test_tp_refuses_indivisible_heads():
    tp = TensorParallel(group=object(), rank=0, size=3)  # refused before any layer touches the group
    with pytest.raises(ValueError, match="n_heads .4. is not divisible by the tensor-parallel size tp=3"):
        Attention(_cfg(), 1, tp)
