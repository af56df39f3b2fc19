"""Attention core and SWA layers: the single-softmax sparse core against a dense reference (values and
gradients), causality, the window edge, document masking, the sink, RoPE de-rotation (spec 3.1, 10.3)."""

import pytest
import torch

from support.model import WINDOW, make_attention, run
from v4train.model.layout import segment_bounds, window_indices
from v4train.model.rope import apply_rope, rope_angles, rope_frequencies
from v4train.kernels import torch_cores as sparse_core
from v4train.kernels.torch_cores import attention_probabilities, sparse_attention

def _inputs(B=2, S=16, D=32, seed=1):
    return torch.randn(B, S, D, generator=torch.Generator().manual_seed(seed))


def _positions(B, S):
    return torch.arange(S).repeat(B, 1)


# ------------------------------------------------------------------------------------- the core
def dense_core_reference(q, kv, sink, indices, scale):
    """Full masked softmax over all N rows, a row weighted by how often a query's slots name it."""
    B, T, H, _ = q.shape
    N = kv.shape[1]
    count = torch.zeros(B, T, N, dtype=q.dtype)
    valid = indices >= 0
    count.scatter_add_(2, indices.long().clamp(min=0), valid.to(q.dtype))
    logits = torch.einsum("bthd,bnd->bthn", q, kv) * scale
    e = torch.where(count.unsqueeze(2) > 0, logits.exp(), 0.0) * count.unsqueeze(2)
    p = e / (e.sum(-1, keepdim=True) + sink.view(1, 1, H, 1).exp())
    return torch.einsum("bthn,bnd->bthd", p, kv)


def _random_case(seed, B=2, T=70, H=3, D=8, N=90, K=7, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=gen, dtype=dtype)
    kv = torch.randn(B, N, D, generator=gen, dtype=dtype)
    sink = torch.randn(H, generator=gen, dtype=dtype)
    idx = torch.randint(-1, N, (B, T, K), generator=gen)
    idx[0, 5] = -1                      # a row with no valid slot
    idx[1, 3, :3] = idx[1, 3, 3]        # a row naming one entry several times
    return q, kv, sink, idx.to(torch.int32)


@pytest.mark.parametrize("shared_ratio", [0, 10 ** 9])  # every chunk gathered / every chunk on shared rows
def test_sparse_core_matches_dense_reference_values_and_gradients(shared_ratio, monkeypatch):
    monkeypatch.setattr(sparse_core, "_SHARED_RATIO", shared_ratio)
    q, kv, sink, idx = _random_case(0, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (q, kv, sink)]
    ref_leaves = [t.clone().requires_grad_() for t in (q, kv, sink)]
    out = sparse_attention(*leaves[:2], leaves[2], idx, 0.4)
    ref = dense_core_reference(*ref_leaves[:2], ref_leaves[2], idx, 0.4)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    assert out[0, 5].abs().max() == 0  # nothing visible: zeros (the sink alone)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    out.backward(grad)
    ref.backward(grad)
    for got, want in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("shared_ratio", [0, 10 ** 9])
def test_sparse_core_fp32_and_head_summed_probabilities(shared_ratio, monkeypatch):
    monkeypatch.setattr(sparse_core, "_SHARED_RATIO", shared_ratio)
    q, kv, sink, idx = _random_case(1)
    torch.testing.assert_close(sparse_attention(q, kv, sink, idx, 0.3), dense_core_reference(q, kv, sink, idx, 0.3),
                               rtol=1e-5, atol=1e-6)
    # probabilities of slots 2.. summed over heads: recompute by hand
    probs = attention_probabilities(q, kv, sink, idx, 0.3, first_slot=2)
    logits = torch.einsum("bthd,btkd->bthk", q, kv[torch.arange(2).view(2, 1, 1), idx.long().clamp(min=0)]) * 0.3
    logits = logits.masked_fill((idx < 0).unsqueeze(2), float("-inf"))
    denom = logits.exp().sum(-1, keepdim=True) + sink.view(1, 1, -1, 1).exp()
    torch.testing.assert_close(probs, (logits.exp() / denom).sum(2)[..., 2:], rtol=1e-5, atol=1e-6)


def test_sink_limits():
    q, kv, _, idx = _random_case(2, H=2)
    plain = dense_core_reference(q, kv, torch.full((2,), -float("inf")), idx, 0.35)
    plain[0, 5] = 0.0  # the empty row is 0/0 without a sink
    low = sparse_attention(q, kv, torch.full((2,), -1e4), idx, 0.35)
    torch.testing.assert_close(low, plain, rtol=1e-5, atol=1e-6)
    high = sparse_attention(q, kv, torch.full((2,), 1e2), idx, 0.35)
    assert high.abs().max() < 1e-30 and plain.abs().max() > 0.1


def test_core_rejects_bad_shapes():
    q, kv, sink, idx = _random_case(3)
    with pytest.raises(ValueError, match="sparse_attention: shapes"):
        sparse_attention(q, kv, sink, idx[:, :5], 0.3)


# ------------------------------------------------------------------------------------- windows
def test_window_indices_follow_the_document_rule():
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 0, 1]])
    start, end = segment_bounds(pos)
    assert start.tolist() == [[0, 0, 0, 3, 3, 3, 3, 3, 8, 8]] and end.tolist() == [[3, 3, 3, 8, 8, 8, 8, 8, 10, 10]]
    idx = window_indices(start, 3)
    for t in range(10):
        want = [j if (j >= 0 and pos[0, t] - pos[0, j] == t - j) else -1 for j in range(t - 2, t + 1)]
        assert idx[0, t].tolist() == want, t


def test_swa_causality_future_tokens_do_not_leak():
    attn, x = make_attention(), _inputs()
    pos = _positions(2, 16)
    y = run(attn, x, pos)
    x2 = x.clone()
    x2[:, 9:] += torch.randn(2, 7, 32)
    y2 = run(attn, x2, pos)
    assert torch.equal(y[:, :9], y2[:, :9])
    assert not torch.allclose(y[:, 9:], y2[:, 9:])


def test_window_includes_self_and_window_minus_one_predecessors():
    attn, x = make_attention(), _inputs()
    pos = _positions(2, 16)
    t = 10
    y = run(attn, x, pos)
    outside = x.clone()
    outside[:, t - WINDOW] += 5.0  # one step beyond the window of query t
    assert torch.equal(run(attn, outside, pos)[:, t], y[:, t])
    inside = x.clone()
    inside[:, t - WINDOW + 1] += 5.0  # the oldest entry still in the window
    assert not torch.allclose(run(attn, inside, pos)[:, t], y[:, t])


def test_documents_do_not_see_each_other():
    attn, x = make_attention(), _inputs()
    pos = torch.cat([torch.arange(6), torch.arange(10)]).repeat(2, 1)  # documents [0, 6) and [6, 16)
    y = run(attn, x, pos)
    x2 = x.clone()
    x2[:, :6] += torch.randn(2, 6, 32)
    assert torch.equal(run(attn, x2, pos)[:, 6:], y[:, 6:])
    single = _positions(2, 16)  # the same edit does reach token 6 when it is in the same document
    assert not torch.allclose(run(attn, x2, single)[:, 6], run(attn, x, single)[:, 6])


# ------------------------------------------------------------------------------------- RoPE
def test_derotation_makes_attention_to_a_fixed_entry_invariant_to_a_global_shift():
    gen = torch.Generator().manual_seed(5)
    q, kv = torch.randn(1, 8, 2, 16, generator=gen), torch.randn(1, 8, 16, generator=gen)
    freqs = rope_frequencies(8, 10000.0)
    sink = torch.zeros(2)
    idx = window_indices(torch.zeros(1, 8, dtype=torch.long), WINDOW)

    def once(shift, derotate=True):
        cos, sin = rope_angles(_positions(1, 8) + shift, freqs)
        o = sparse_attention(apply_rope(q, cos, sin), apply_rope(kv, cos, sin), sink, idx, 0.25)
        return apply_rope(o, cos, sin, inverse=True) if derotate else o

    torch.testing.assert_close(once(37), once(0), rtol=0, atol=1e-5)
    assert not torch.allclose(once(37, derotate=False), once(0, derotate=False), atol=1e-2)


@pytest.mark.parametrize("layer_idx, mode", [(0, "dense"), (1, "dense"), (1, "sparse"), (2, "dense")])
def test_whole_layer_is_invariant_to_a_global_position_shift(layer_idx, mode):
    # SWA, CSA (dense and top-k) and HCA: compressed entries carry RoPE at their block start, so a
    # global shift of every position changes nothing after the output de-rotation
    attn, x = make_attention(layer_idx), _inputs(S=24)
    base = run(attn, x, _positions(2, 24), mode)
    torch.testing.assert_close(run(attn, x, _positions(2, 24) + 37, mode), base, rtol=0, atol=2e-5)


@pytest.mark.parametrize("layer_idx, mode",
                         [(0, "dense"), (1, "dense"), (1, "sparse"), (1, "indexer_warmup"), (2, "dense")])
def test_gradients_reach_every_attention_parameter(layer_idx, mode):
    attn, x = make_attention(layer_idx), _inputs(S=24)
    attn.train()
    run(attn, x, _positions(2, 24), mode).square().sum().backward()
    for name, p in attn.named_parameters():
        if ".indexer." in f".{name}" and mode == "dense":
            assert p.grad is None, name  # the indexer idles in dense mode
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
