"""Context parallelism for the hybrid attention: CP = 2 and 4 against one rank, and the exchange's contracts.

The parity tests run one SWA, one CSA (m = 4) and one HCA (m' = 16) layer with a scaled-down window (16)
and top-k (8) on T = 512 tokens of packed documents whose boundaries fall inside chunks and blocks, in
all three attention modes (training forwards, so the indexer's KL loss rides into the backward), on
spawned gloo ranks in Megatron-core's context-parallel group; the reference is the same layer on the
whole sequence in this process. Compared: the outputs, the input gradients (every rank's rows, halo
gradients returned to their owners), the parameter gradients summed over the CP ranks, and the indexer
loss summed over the ranks. The whole model (one stage: SWA, CSA, HCA, MoE, MTP) then trains three SGD
steps at CP = 2 and 4, and combined as (cp, tp) = (2, 2), (cp, pp) = (2, 2) through Megatron's pipeline
schedule and (cp, dp) = (2, 2), against one process: losses to 1e-5 relative, first-step gradients to
1e-4 of each tensor's largest entry; the sequence-wise MoE balance loss is on (its expert counts are
summed over the CP ranks). The same layouts, EP and the memory modes together with CP run through the trainer
(``tests/orchestrator/test_orchestrator_cp.py``). The ranks run through ``support.spawn.run_in_world``.

Shape letters: B batch, T tokens, L local tokens, D model dim.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from support.model import small_cfg
from support.spawn import run_in_world
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


def _cp(pctx) -> ContextParallel:
    return ContextParallel(pctx.cp_group, pctx.cp_rank, pctx.cp)


def _layer_rank(pctx) -> dict:
    cpg = _cp(pctx)
    x, g, pos = _inputs()
    result = {"cp_ranks": dist.get_process_group_ranks(pctx.cp_group), "runs": {}}
    for layer_idx in LAYERS:
        for mode in MODES:
            attn = _layer(layer_idx)
            x_local = shard_tokens(x, cpg.size, cpg.rank).requires_grad_(True)
            seq = CPSequence(pos, cpg, attention_mode=mode, aux_loss_scale=0.5)
            y_local = context_parallel_attention(attn, x_local, seq)
            (y_local * shard_tokens(g, cpg.size, cpg.rank)).sum().backward()
            grads = {}
            for name, p in attn.named_parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad, group=cpg.group)
                    grads[name] = p.grad
            loss = torch.tensor(sum(float(v) for v in attn.aux_log["indexer_loss"]))
            dist.all_reduce(loss, group=cpg.group)
            result["runs"][(layer_idx, mode)] = {"y": y_local.detach(), "dx": x_local.grad, "grads": grads,
                                                 "indexer_loss": float(loss)}
    return result


def _close(got, want, rtol, what):
    err = (got - want).abs().max().item()
    scale = want.abs().max().item()
    assert err <= rtol * max(scale, 1e-6), f"{what}: max abs error {err:.3e} against max {scale:.3e}"


@pytest.mark.parametrize("cp", [2, 4])
def test_cp_matches_one_rank_in_every_mode_with_packed_documents(cp):
    results = run_in_world(_layer_rank, (), cp, {"cp": cp}, deadline_s=600, what=f"cp={cp} attention parity")
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


def test_cp_attends_every_visible_entry_through_slot_ranges(monkeypatch):
    """Where a query attends all its visible compressed entries (HCA in every mode, CSA in dense mode) the CP
    path passes the core one slot range per query, as the single-rank layer does, and never builds the
    ``[B, L, N]`` index list (``CompressedLayout.dense_indices``); its output is the layer's, bit for bit.
    The CP = 2 and 4 results against one rank are the parity tests above."""
    from v4train.model.layout import CompressedLayout

    def no_index_list(self):
        raise AssertionError(f"dense index list built for ratio {self.ratio}")

    x, g, pos = _inputs()
    for layer_idx, mode in [(1, "dense"), *((2, m) for m in MODES)]:
        attn = _layer(layer_idx)
        x_ref = x.clone().requires_grad_(True)
        want = attn(x_ref, SequenceContext(pos, pos, attention_mode=mode))
        (want * g).sum().backward()
        want_grads = {n: p.grad.clone() for n, p in attn.named_parameters() if p.grad is not None}
        attn.zero_grad(set_to_none=True)
        x_cp = x.clone().requires_grad_(True)
        with monkeypatch.context() as patch:
            patch.setattr(CompressedLayout, "dense_indices", no_index_list)
            got = context_parallel_attention(attn, x_cp, CPSequence(pos, ContextParallel(), attention_mode=mode))
            (got * g).sum().backward()
        assert torch.equal(got, want), (layer_idx, mode)
        # the gradients within rounding: the CP path computes the compressor's entries on the rows of its
        # owned slots and scatters them, so its weight-gradient sums run in another order
        _close(x_cp.grad, x_ref.grad, 1e-6, f"layer {layer_idx} {mode} input gradient")
        for name, grad in want_grads.items():
            _close(dict(attn.named_parameters())[name].grad, grad, 1e-6, f"layer {layer_idx} {mode} grad {name}")


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


def _crafted_rank(pctx) -> dict:
    """CP = 2 on 64 tokens (chunks of 16: rank 0 holds tokens 0-15 and 48-63, rank 1 tokens 16-47), one
    CSA ratio of 4: the indexer keys of entries 0-3 (tokens 0-15, owned by rank 0) score highest for
    every query, so rank 1's queries must pick entries it does not own."""
    from v4train.kernels import reference
    from v4train.model.indexer import Indexer

    cpg = _cp(pctx)
    n_tok, ratio, topk = 64, 4, 4
    pos = torch.arange(n_tok)[None]
    seq = CPSequence(pos, cpg, attention_mode="sparse")
    u = torch.ones(8)
    k_global = torch.stack([u * (5.0 if j < 4 else 1.0 + 0.01 * j) for j in range(n_tok // ratio)])[None]
    q = u.expand(1, n_tok, 2, 8).clone()
    w = torch.ones(1, n_tok, 2)
    entries = seq.entries(ratio, 2 * ratio - 1)
    mine = entries.slots[cpg.rank]
    own = torch.cat((k_global.reshape(-1, 8), torch.zeros(1, 8)))[mine].view(1, -1, 8)
    gathered = seq.gather_entries(own, entries)
    indexer = Indexer(small_cfg(index_topk=topk, index_n_heads=2, index_head_dim=8), ratio)
    picks = indexer.select(q[:, seq.tokens], gathered, w[:, seq.tokens], seq.local_layout(ratio))
    single = indexer.select(q, k_global, w, SequenceContext(pos, pos, attention_mode="sparse").layout(ratio))
    # what a rank would pick from only the entries it owns (its slots' range, here contiguous)
    owned = mine[mine < entries.n_slots]
    lay = seq.local_layout(ratio)
    lo = torch.maximum(lay.lo_BT, owned.min().expand_as(lay.lo_BT))
    hi = torch.minimum(lay.hi_BT, (owned.max() + 1).expand_as(lay.hi_BT))
    local_only = reference.indexer_topk(q[:, seq.tokens], k_global, w[:, seq.tokens], ratio, topk,
                                        visible_start=lo, visible_end=torch.maximum(hi, lo)).indices.long()
    return {"gathered": gathered, "picks": picks, "single": single[:, seq.tokens], "local_only": local_only,
            "owned": owned, "tokens": seq.tokens}


def test_topk_over_all_visible_entries_differs_from_local_only_entries():
    res = run_in_world(_crafted_rank, (), 2, {"cp": 2}, deadline_s=300, what="crafted cp top-k")
    assert torch.equal(res[0]["gathered"], res[1]["gathered"])   # every rank holds every entry
    rank1 = res[1]
    assert rank1["owned"].tolist() == list(range(4, 12))           # blocks ending in tokens 16-47
    assert torch.equal(rank1["picks"], rank1["single"])             # the selection is the single-rank one
    late = rank1["tokens"] >= 31                                     # queries that see more than 4 entries
    assert (rank1["picks"][0, late] == torch.tensor([0, 1, 2, 3])).all()    # all owned by rank 0
    assert not torch.equal(rank1["picks"][0, late], rank1["local_only"][0, late])
    assert torch.equal(res[0]["picks"], res[0]["single"])


# ---------------------------------------------------------------- the whole model (one pipeline stage)

STAGE_T, STAGE_STEPS, STAGE_LR = 512, 3, 0.05


def _stage_cfg():
    # a large sequence-wise balance loss weight, so that its whole-sequence statistics matter
    return small_cfg(vocab_size=64, window=16, compress_ratios=(0, 4, 16, 4, 0), index_topk=8, n_routed_experts=4,
                     n_activated_experts=2, moe_inter_dim=32, balance_loss_weight=0.1)


def _stage_batch():
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 64, (1, STAGE_T), generator=gen)
    pos = torch.cat((torch.arange(170), torch.arange(291), torch.arange(STAGE_T - 461)))[None]
    labels = torch.roll(ids, -1, dims=1)
    labels[0, [169, 460, STAGE_T - 1]] = -100  # no target across a document end
    return ids, pos, labels


def _train_stage(stage, mode, ids, pos, labels, n_valid, reduce_grads):
    """STAGE_STEPS SGD steps; returns the losses (sum over this rank's tokens / n_valid) and the first
    step's gradients (after ``reduce_grads``)."""
    stage.attention_mode = mode
    opt = torch.optim.SGD(stage.parameters(), lr=STAGE_LR)
    losses, first = [], None
    for _ in range(STAGE_STEPS):
        opt.zero_grad(set_to_none=True)
        loss = stage(ids, pos, labels).sum() / n_valid
        loss.backward()
        losses.append(loss.detach())
        reduce_grads(stage)
        if first is None:
            first = {n: p.grad.clone() for n, p in stage.named_parameters() if p.grad is not None}
        opt.step()
        stage.pop_aux_metrics()
    return losses, first


def _new_stage(cp=None):
    from v4train.model.transformer import V4Stage

    stage = V4Stage(_stage_cfg(), pp_rank=0, pp_size=1, cp=cp)
    stage.init_weights(3)
    return stage.train()


def _stage_rank(pctx, train_batch, reduce_grads) -> dict:
    """Three SGD steps per mode of this rank's stage (``parallel.groups`` layout ``pctx``) on its CP share of
    ``train_batch(pctx)`` (ids, pos, labels of its data-parallel replica; n_valid: the replica's valid
    targets): the losses summed over the data x context parallel ranks and divided by dp, the first
    step's gradients after ``reduce_grads(stage, pctx)``, TP shards gathered whole."""
    from v4train.model.transformer import V4Stage
    from v4train.parallel.tensor_parallel import TensorParallel, gather_full

    cpg = _cp(pctx)
    tp = TensorParallel(pctx.tp_group, pctx.tp_rank, pctx.tp) if pctx.tp > 1 else TensorParallel()
    ids, pos, labels, n_valid = train_batch(pctx)
    out = {"cp_ranks": dist.get_process_group_ranks(cpg.group),
           "tp_ranks": dist.get_process_group_ranks(tp.group) if tp.active else [pctx.rank],
           "dp_cp_ranks": dist.get_process_group_ranks(pctx.dp_cp_group)}
    for mode in MODES:
        stage = V4Stage(_stage_cfg(), pp_rank=0, pp_size=1, tp=tp, cp=cpg)
        stage.init_weights(3)
        local = (shard_tokens(t, cpg.size, cpg.rank) for t in (ids, pos, labels))
        losses, grads = _train_stage(stage.train(), mode, *local, n_valid, lambda s: reduce_grads(s, pctx))
        total = torch.stack(losses)
        dist.all_reduce(total, group=pctx.dp_cp_group)
        params = dict(stage.named_parameters())
        out[mode] = {"losses": total / pctx.dp,
                     "grads": {n: gather_full(g, params[n], tp) if tp.active else g for n, g in grads.items()}}
    return out


def _one_sequence(_pctx):
    ids, pos, labels = _stage_batch()
    return ids, pos, labels, int((labels != -100).sum())


def _sum_over_cp(stage, pctx):
    for p in stage.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=pctx.cp_group)


def _assert_stage_parity(got: dict, batch, what: str) -> None:
    """``got`` (:func:`_stage_rank`'s) against one process training the whole ``batch`` (ids, pos, labels):
    losses to 1e-5 relative, first-step gradients to 1e-4 of each tensor's largest entry."""
    ids, pos, labels = batch
    n_valid = int((labels != -100).sum())
    for mode in MODES:
        losses, grads = _train_stage(_new_stage(), mode, ids, pos, labels, n_valid, lambda stage: None)
        want = torch.stack(losses)
        assert torch.allclose(got[mode]["losses"], want, rtol=1e-5, atol=0), (what, mode, got[mode]["losses"], want)
        assert set(got[mode]["grads"]) == set(grads), (what, mode)
        for name, grad in grads.items():
            _close(got[mode]["grads"][name], grad, 1e-4, f"{what} {mode} grad {name}")


# cp = 4 and the combined layouts each take 25-40 s on 2 cores (over 600 s on a loaded one): in the slow
# suite (make test-slow), bounded by their spawn deadline (900 s) rather than the default test timeout
SLOW = [pytest.mark.slow, pytest.mark.timeout(1200)]


@pytest.mark.parametrize("cp", [2, pytest.param(4, marks=SLOW)])
def test_cp_stage_matches_one_rank_for_three_steps(cp):
    """The whole model (SWA, CSA, HCA layers, MoE, MTP) on packed documents, three SGD steps per mode: the
    losses (summed over CP ranks) and the first step's gradients (summed over CP ranks) of one rank."""
    got = run_in_world(_stage_rank, (_one_sequence, _sum_over_cp), cp, {"cp": cp}, deadline_s=900,
                       what=f"cp={cp} stage parity")
    _assert_stage_parity(got[0], _stage_batch(), f"cp={cp}")


def _sum_over_cp_and_experts_over_tp(stage, pctx):
    for name, p in stage.named_parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=pctx.cp_group)
            if ".ffn.experts." in name:  # the routed experts saw this TP rank's share of the tokens
                dist.all_reduce(p.grad, group=pctx.tp_group)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_cp2_with_tp2_matches_one_rank_for_three_steps():
    """(cp, tp) = (2, 2) on 4 ranks: Megatron's order puts TP fastest, so TP pairs are [0,1], [2,3] and
    CP pairs [0,2], [1,3]."""
    got = run_in_world(_stage_rank, (_one_sequence, _sum_over_cp_and_experts_over_tp), 4, {"cp": 2, "tp": 2},
                       deadline_s=900, what="cp=2 x tp=2 stage parity")
    assert got[0]["cp_ranks"] == [0, 2] and got[0]["tp_ranks"] == [0, 1]
    _assert_stage_parity(got[0], _stage_batch(), "cp=2 tp=2")


def _pp_cp_rank(pctx) -> dict:
    """(cp, pp) = (2, 2) on 4 ranks through Megatron's pipeline schedule: the mHC streams of this rank's
    tokens ([L, B, N*D], L = T / cp) cross the stage boundary; CP pairs [0,1], [2,3], PP pairs [0,2], [1,3]."""
    from v4train.model.transformer import V4Stage
    from v4train.parallel.schedules import forward_backward

    cpg = _cp(pctx)
    ids, pos, labels = _stage_batch()
    n_valid = int((labels != -100).sum())
    batch = [tuple(shard_tokens(t, 2, cpg.rank) for t in (ids, pos, labels))]
    cfg = _stage_cfg()

    def forward_step(data_iterator, model):
        ids_BL, pos_BL, labels_BL = next(data_iterator)
        output = model(ids_BL, pos_BL, labels_BL if model.is_last_stage else None)
        return output, lambda loss_BL: (loss_BL.sum() / n_valid, {"loss": (loss_BL.sum() / n_valid).detach()})

    out = {"cp_ranks": dist.get_process_group_ranks(cpg.group), "pp_rank": pctx.pp_rank}
    for mode in MODES:
        stage = V4Stage(cfg, pp_rank=pctx.pp_rank, pp_size=2, cp=cpg)
        stage.init_weights(3)
        stage.train().attention_mode = mode
        opt = torch.optim.SGD(stage.parameters(), lr=STAGE_LR)
        losses, first = [], None
        for _ in range(STAGE_STEPS):
            opt.zero_grad(set_to_none=True)
            logged = forward_backward(forward_step, iter(batch), stage, num_microbatches=1,
                                      seq_length=STAGE_T // 2, micro_batch_size=1,
                                      hidden_size=cfg.hc_mult * cfg.dim, pctx=pctx)
            _sum_over_cp(stage, pctx)
            for p in stage.shared_embedding_parameters():  # the embedding copies of the first and last stage
                dist.all_reduce(p.grad, group=pctx.embedding_group)
            if logged:
                loss = logged[0]["loss"].clone()
                dist.all_reduce(loss, group=cpg.group)
                losses.append(loss)
            if first is None:
                first = {n: p.grad.clone() for n, p in stage.named_parameters() if p.grad is not None}
            opt.step()
            stage.pop_aux_metrics()
        out[mode] = {"losses": torch.stack(losses) if losses else None, "grads": first}
    return out


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_cp2_with_pp2_matches_one_rank_for_three_steps():
    got = run_in_world(_pp_cp_rank, (), 4, {"cp": 2, "pp": 2}, deadline_s=900, what="cp=2 x pp=2 stage parity")
    assert got[0]["cp_ranks"] == [0, 1] and [g["pp_rank"] for g in got] == [0, 0, 1, 1]
    last = got[2]
    for mode in MODES:  # the last stage's losses; the first and the last stage's gradients
        last[mode]["grads"] = {**got[0][mode]["grads"], **got[2][mode]["grads"]}
    _assert_stage_parity(last, _stage_batch(), "cp=2 pp=2")


def _two_sequences():
    """Two packed sequences with the same documents' lengths (so every per-sequence mean has the same
    count of terms as the two-sequence mean: LM and MTP targets, indexer queries) and different tokens."""
    ids, pos, labels = _stage_batch()
    ids2 = torch.randint(0, 64, (1, STAGE_T), generator=torch.Generator().manual_seed(6))
    labels2 = torch.where(labels == -100, -100, torch.roll(ids2, -1, dims=1))
    return torch.cat((ids, ids2)), pos.repeat(2, 1), torch.cat((labels, labels2))


def _replica_sequence(pctx):
    """Data-parallel replica r takes sequence r of :func:`_two_sequences`."""
    ids, pos, labels = (t[pctx.dp_rank:pctx.dp_rank + 1] for t in _two_sequences())
    return ids, pos, labels, int((labels != -100).sum())


def _dp_mean_over_dp_cp(stage, pctx):
    """The trainer's data-parallel mean under CP: summed over Megatron's data x context parallel group, / dp."""
    for p in stage.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=pctx.dp_cp_group)
            p.grad.div_(pctx.dp)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_cp2_with_dp2_matches_one_rank_for_three_steps():
    """(cp, dp) = (2, 2) on 4 ranks: each data-parallel replica takes one of two sequences, split over its
    CP pair; the loss is its replica's mean."""
    got = run_in_world(_stage_rank, (_replica_sequence, _dp_mean_over_dp_cp), 4, {"cp": 2, "dp": 2},
                       deadline_s=900, what="cp=2 x dp=2 stage parity")
    assert got[0]["dp_cp_ranks"] == [0, 1, 2, 3]
    _assert_stage_parity(got[0], _two_sequences(), "cp=2 dp=2")
