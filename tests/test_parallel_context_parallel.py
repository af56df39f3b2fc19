"""Context parallelism for the hybrid attention: CP = 2 and 4 against one rank, and the exchange's contracts.

The parity tests run one SWA, one CSA (m = 4) and one HCA (m' = 16) layer with a scaled-down window (16)
and top-k (8) on T = 512 tokens of packed documents whose boundaries fall inside chunks and blocks, in
all three attention modes (training forwards, so the indexer's KL loss rides into the backward), on
spawned gloo ranks in Megatron-core's context-parallel group; the reference is the same layer on the
whole sequence in this process. Compared: the outputs, the input gradients (every rank's rows, halo
gradients returned to their owners), the parameter gradients summed over the CP ranks, and the indexer
loss summed over the ranks.

Shape letters: B batch, T tokens, L local tokens, D model dim.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

from _model_helpers import small_cfg
from _spawn import free_ports, spawn_ranks
from v4train.model.attention import Attention
from v4train.model.layout import SequenceContext
from v4train.parallel.context_parallel import (ContextParallel, CPSequence, check_cp_seq_len,
                                               context_parallel_attention, load_balanced_chunks, shard_tokens,
                                               unshard_tokens)

T, B = 512, 2
MODES = ("dense", "indexer_warmup", "sparse")
LAYERS = (0, 1, 2)  # SWA, CSA (m = 4), HCA (m' = 16)


def _cfg():
    return small_cfg(window=16, compress_ratios=(0, 4, 16, 4, 0), index_topk=8, index_n_heads=2, index_head_dim=8)


def _layer(layer_idx: int) -> Attention:
    attn = Attention(_cfg(), layer_idx=layer_idx)
    gen = torch.Generator().manual_seed(10 + layer_idx)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return attn.train()


def _inputs():
    """x, the output cotangent, and packed position ids (documents straddle chunk and block edges)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, _cfg().dim, generator=gen)
    g = torch.randn(B, T, _cfg().dim, generator=gen)
    pos = torch.cat((torch.arange(203), torch.arange(T - 203)))[None].repeat(B, 1)
    pos[1] = torch.cat((torch.arange(37), torch.arange(301), torch.arange(T - 338)))
    return x, g, pos


def _reference(layer_idx: int, mode: str) -> dict:
    attn = _layer(layer_idx)
    x, g, pos = _inputs()
    x.requires_grad_(True)
    y = attn(x, SequenceContext(pos, pos, attention_mode=mode, aux_loss_scale=0.5))
    (y * g).sum().backward()
    return {"y": y.detach(), "dx": x.grad, "indexer_loss": sum(float(v) for v in attn.aux_log["indexer_loss"]),
            "grads": {n: p.grad.clone() for n, p in attn.named_parameters() if p.grad is not None}}


def _rank_main(rank: int, cp: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    from v4train.parallel import groups

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=cp)
    try:
        pctx = groups.initialize(tp=1, pp=1, ep=1, dp=1, cp=cp)
        ranks = dist.get_process_group_ranks(pctx.cp_group)
        cpg = ContextParallel(pctx.cp_group, pctx.cp_rank, pctx.cp)
        x, g, pos = _inputs()
        result = {"cp_ranks": ranks, "runs": {}}
        for layer_idx in LAYERS:
            for mode in MODES:
                attn = _layer(layer_idx)
                x_local = shard_tokens(x, cp, cpg.rank).requires_grad_(True)
                seq = CPSequence(pos, cpg, attention_mode=mode, aux_loss_scale=0.5)
                y_local = context_parallel_attention(attn, x_local, seq)
                (y_local * shard_tokens(g, cp, cpg.rank)).sum().backward()
                grads = {}
                for name, p in attn.named_parameters():
                    if p.grad is not None:
                        dist.all_reduce(p.grad, group=cpg.group)
                        grads[name] = p.grad
                loss = torch.tensor(sum(float(v) for v in attn.aux_log["indexer_loss"]))
                dist.all_reduce(loss, group=cpg.group)
                result["runs"][(layer_idx, mode)] = {"y": y_local.detach(), "dx": x_local.grad, "grads": grads,
                                                     "indexer_loss": float(loss)}
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        groups.destroy()
        dist.destroy_process_group()


def _close(got, want, rtol, what):
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= rtol * max(scale, 1e-6), f"{what}: max abs error {err:.3e} against max {scale:.3e}"


@pytest.mark.parametrize("cp", [2, 4])
def test_cp_matches_one_rank_in_every_mode_with_packed_documents(cp):
    with tempfile.TemporaryDirectory() as tmp:
        spawn_ranks(_rank_main, (cp, free_ports(1)[0], tmp), cp, deadline_s=600, what=f"cp={cp} attention parity")
        results = [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(cp)]
    assert results[0]["cp_ranks"] == list(range(cp))  # Megatron's CP group: every rank of this world
    for layer_idx in LAYERS:
        for mode in MODES:
            want = _reference(layer_idx, mode)
            runs = [res["runs"][(layer_idx, mode)] for res in results]
            what = f"cp={cp} layer {layer_idx} {mode}"
            _close(unshard_tokens([r["y"] for r in runs]), want["y"], 1e-5, f"{what} output")
            _close(unshard_tokens([r["dx"] for r in runs]), want["dx"], 1e-4, f"{what} input gradient")
            assert set(runs[0]["grads"]) == set(want["grads"]), what
            for name, grad in want["grads"].items():
                _close(runs[0]["grads"][name], grad, 1e-4, f"{what} grad {name}")
            assert runs[0]["indexer_loss"] == pytest.approx(want["indexer_loss"], rel=1e-5, abs=1e-7), what
            if layer_idx == 1 and mode != "dense":
                assert want["indexer_loss"] > 0  # the KL really ran


def test_cp_of_one_is_the_layer():
    """With one CP rank (no group) the CP forward is the layer's forward, bit for bit in dense mode."""
    x, g, pos = _inputs()
    for layer_idx in LAYERS:
        attn = _layer(layer_idx)
        want = attn(x, SequenceContext(pos, pos, attention_mode="dense"))
        got = context_parallel_attention(attn, x, CPSequence(pos, ContextParallel(), attention_mode="dense"))
        assert torch.equal(got, want), layer_idx


def test_load_balanced_split_and_its_inverse():
    assert load_balanced_chunks(16, 2, 0) == [(0, 4), (12, 16)]
    assert load_balanced_chunks(16, 2, 1) == [(4, 8), (8, 12)]
    x = torch.arange(2 * 24).view(2, 24)
    parts = [shard_tokens(x, 3, r) for r in range(3)]
    assert parts[1][0].tolist() == [4, 5, 6, 7, 16, 17, 18, 19]
    assert torch.equal(unshard_tokens(parts), x)
    # every rank does the same causal work: the sum of its query positions is the same
    assert len({int(p[0].sum()) for p in parts}) == 1


def test_cp_refuses_a_sequence_without_whole_blocks_per_chunk():
    check_cp_seq_len(512, 4, (0, 4, 16))
    with pytest.raises(ValueError, match=r"seq_len=500 with parallel.cp=4.*multiple of 128"):
        check_cp_seq_len(500, 4, (0, 4, 16))
    with pytest.raises(ValueError, match=r"curriculum.stages.1.seq_len=96 with parallel.cp=2"):
        check_cp_seq_len(96, 2, (0, 4, 32), field="curriculum.stages.1.seq_len")
