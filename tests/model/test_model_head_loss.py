"""The fused, chunked head + cross-entropy equals the unfused head and cross-entropy (loss and gradients),
for a uniform loss gradient (the mean the trainer takes) and any other one, under TP = 1 and TP = 2
(against Megatron's vocab_parallel_cross_entropy), and keeps no ``[tokens, vocab]`` tensor for the backward."""

from __future__ import annotations

import datetime
import faulthandler

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from support.spawn import free_ports, spawn_ranks
from v4train.model.head_loss import fused_head_loss
from v4train.parallel import groups
from v4train.parallel.tensor_parallel import TensorParallel, vocab_cross_entropy

HANG_S = 120
B, S, D, V = 2, 23, 16, 40


def _inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(B, S, D, generator=gen)
    w = torch.randn(V, D, generator=gen) * 0.5
    labels = torch.randint(0, V, (B, S), generator=gen)
    labels[0, :3] = -100
    labels[1, -1] = -100
    upstream = {"mean": None, "weighted": torch.rand(B, S, generator=gen)}
    return h, w, labels, upstream


def _value_and_grads(loss_fn, h, w, labels, upstream):
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss_BS = loss_fn(h, w, labels)
    (loss_BS.mean() if upstream is None else (loss_BS * upstream).sum()).backward()
    return loss_BS.detach(), h.grad, w.grad


@pytest.mark.parametrize("upstream", ["mean", "weighted"])
@pytest.mark.parametrize("chunk", [5, 1000])
def test_fused_equals_unfused_head_and_cross_entropy(upstream, chunk):
    h, w, labels, grads = _inputs()

    def unfused(h, w, labels):
        return F.cross_entropy((h @ w.t()).flatten(0, 1), labels.flatten(), reduction="none").view(B, S)

    got = _value_and_grads(lambda h, w, y: fused_head_loss(h, w, y, TensorParallel(), chunk_tokens=chunk),
                           h, w, labels, grads[upstream])
    want = _value_and_grads(unfused, h, w, labels, grads[upstream])
    for name, a, b in zip(("loss", "dh", "dW"), got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    assert (got[0][labels == -100] == 0).all()


def test_fused_keeps_no_tokens_by_vocabulary_tensor():
    h, w, labels, _ = _inputs()
    h, w = h.requires_grad_(), w.requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        fused_head_loss(h, w, labels, TensorParallel(), chunk_tokens=8)
    assert saved and max(saved) < B * S * V / 2, saved


def test_fused_refuses_mismatched_shapes():
    h, w, labels, _ = _inputs()
    with pytest.raises(ValueError, match="head weight"):
        fused_head_loss(h, w[:, :-1], labels, TensorParallel())


def _rank(rank: int, port: int, out_dir: str) -> None:
    faulthandler.dump_traceback_later(HANG_S, exit=True)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=HANG_S))
    pctx = groups.initialize(tp=2, pp=1, ep=1, dp=1)
    tp = TensorParallel(pctx.tp_group, pctx.tp_rank, pctx.tp)
    h, w, labels, grads = _inputs()
    shard = w.chunk(2)[rank]  # this rank's vocabulary rows
    out = {}
    for upstream in grads:
        got = _value_and_grads(lambda h, w, y: fused_head_loss(h, w, y, tp, chunk_tokens=7),
                               h, shard, labels, grads[upstream])
        # Megatron's vocab-parallel cross-entropy on this rank's logits; the input gradient is partial
        # (this rank's rows) there, summed over the ranks here as the head's f operator does
        want = list(_value_and_grads(lambda h, w, y: vocab_cross_entropy(h @ w.t(), y, tp),
                                     h, shard, labels, grads[upstream]))
        dist.all_reduce(want[1])
        out[upstream] = (got, tuple(want))
    groups.destroy()
    dist.destroy_process_group()
    torch.save(out, f"{out_dir}/rank{rank}.pt")
    faulthandler.cancel_dump_traceback_later()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU/gloo suite")
def test_tp2_fused_equals_megatron_vocab_parallel_cross_entropy(tmp_path):
    spawn_ranks(_rank, (free_ports(1)[0], str(tmp_path)), 2, HANG_S + 30, "head-loss TP ranks")
    for rank in range(2):
        for upstream, (got, want) in torch.load(tmp_path / f"rank{rank}.pt").items():
            for name, a, b in zip(("loss", "dh", "dW shard"), got, want, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6,
                                           msg=lambda m, r=rank, u=upstream, n=name: f"rank {r} {u} {n}: {m}")


def test_fused_forms_no_gradient_under_no_grad():
    h, w, labels, _ = _inputs()
    h.requires_grad_()
    with torch.no_grad():
        loss = fused_head_loss(h, w, labels, TensorParallel(), chunk_tokens=8)
    want = F.cross_entropy((h @ w.t()).flatten(0, 1), labels.flatten(), reduction="none").view(B, S)
    torch.testing.assert_close(loss, want.detach(), rtol=1e-5, atol=1e-6)
    assert loss.grad_fn is None


@pytest.mark.parametrize("upstream", ["mean", "weighted"])
def test_bf16_inputs_under_autocast_compute_in_fp32(upstream):
    """bf16 h and head weight inside ``torch.autocast``: the fused head keeps its fp32 arithmetic (spec 0.1
    item 8, logits in fp32), so it equals the fp32 unfused head on the same bf16 values, loss and gradients
    (returned in bf16), the backward run inside the autocast region too."""
    h, w, labels, grads = _inputs()
    h16, w16 = h.bfloat16(), w.bfloat16()

    def unfused(h, w, labels):
        return F.cross_entropy((h.float() @ w.float().t()).flatten(0, 1), labels.flatten(), reduction="none").view(B, S)

    want = _value_and_grads(unfused, h16, w16, labels, grads[upstream])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _value_and_grads(lambda h, w, y: fused_head_loss(h, w, y, TensorParallel(), chunk_tokens=5),
                               h16, w16, labels, grads[upstream])
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.bfloat16
    for g, x in zip(got, want):
        torch.testing.assert_close(g, x, rtol=1e-5, atol=1e-5)
