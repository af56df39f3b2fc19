"""Lightning Indexer top-k: reference semantics, and the Triton kernels under the interpreter.

The reference is checked against a brute-force loop (visibility (s+1)*ratio <= t+1, k = min(topk, NC),
ties to the lower index, -1 padding); the Triton path is checked against the reference: identical
picks wherever the reference's KK-th and (KK+1)-th visible scores differ by more than the fp32
rounding of the score sums, and the picked scores within 1e-5 (fp32) / 2e-2 (bf16 inputs) relative.
``TRITON_INTERPRET=1`` is set by a module fixture; see tests/kernels/test_kernels_attention.py for why.

Shape letters: B batch, T tokens, HI indexer heads, DI indexer head dim, NC compressed entries,
KK picks per token.
"""

from __future__ import annotations

import pytest
import torch

from v4train import kernels
from v4train.kernels import reference

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _inputs(B, T, HI, DI, NC, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, HI, DI, generator=g).to(dtype)
    k = torch.randn(B, NC, DI, generator=g).to(dtype)
    w = torch.randn(B, T, HI, generator=g)
    return q, k, w


def _brute_force(q, k, w, ratio, topk, start=None, end=None):
    """Per-row loop over the definition (spec 3.3): the picks as sorted lists, scores in fp64."""
    B, T, HI, _ = q.shape
    NC = k.shape[1]
    out = []
    for b in range(B):
        for t in range(T):
            lo = 0 if start is None else int(start[b, t])
            hi = min((t + 1) // ratio, NC) if end is None else int(end[b, t])
            scored = []
            for s in range(lo, hi):
                assert (s + 1) * ratio <= t + 1 or end is not None
                val = sum(float(w[b, t, h]) * max(0.0, float(q[b, t, h].double() @ k[b, s].double()))
                          for h in range(HI))
                scored.append((-val, s))
            out.append(sorted(s for _, s in sorted(scored)[:min(topk, NC)]))
    return out


# ---------------------------------------------------------------- reference (pure torch, no interpreter)

@pytest.mark.parametrize("ratio,topk", [(4, 3), (2, 100), (1, 5)])
def test_reference_matches_brute_force(ratio, topk):
    q, k, w = _inputs(2, 17, 3, 8, 17 // ratio, torch.float32, seed=ratio)
    got = reference.indexer_topk(q, k, w, ratio, topk)
    KK = min(topk, 17 // ratio)
    assert got.indices.shape == (2, 17, KK) and got.indices.dtype == torch.int32
    rows = got.indices.view(-1, KK).tolist()
    for row, want in zip(rows, _brute_force(q, k, w, ratio, topk)):
        assert [s for s in row if s >= 0] == want
        assert row[len(want):] == [-1] * (KK - len(want))      # -1 only after the picks


def test_reference_ties_go_to_lower_index():
    """All-zero scores (every q.k negative): the first KK visible entries, in order."""
    q, k, w = _inputs(1, 12, 2, 4, 12, torch.float32, seed=0)
    k = k.abs()
    q = -q.abs()
    got = reference.indexer_topk(q, k, w, 1, 5)
    assert got.indices[0, 11].tolist() == [0, 1, 2, 3, 4]
    assert got.indices[0, 2].tolist() == [0, 1, 2, -1, -1]
    assert (got.scores[0, 11] == 0).all()


def test_document_bounds():
    """Two packed documents of 7 and 9 tokens, ratio 2: 3 + 4 entries, each document sees only its own."""
    pos = torch.cat((torch.arange(7), torch.arange(9)))[None]
    start, end = reference.document_bounds(pos, 2)
    assert start[0].tolist() == [0] * 7 + [3] * 9
    assert end[0].tolist() == [0, 1, 1, 2, 2, 3, 3] + [3, 4, 4, 5, 5, 6, 6, 7, 7]
    s0, e0 = reference.causal_bounds(1, 16, 8, 2)
    s1, e1 = reference.document_bounds(torch.arange(16)[None], 2)
    assert torch.equal(s0, s1) and torch.equal(e0, e1)


def test_reference_rejects_bad_arguments():
    q, k, w = _inputs(1, 4, 2, 8, 2, torch.float32, seed=0)
    with pytest.raises(ValueError, match="ratio and topk"):
        reference.indexer_topk(q, k, w, 0, 4)
    with pytest.raises(ValueError, match="shape mismatch"):
        reference.indexer_topk(q, k[:, :, :4], w, 2, 4)
    with pytest.raises(ValueError, match="dtype"):
        reference.indexer_topk(q, k.double(), w, 2, 4)


# ---------------------------------------------------------------- Triton under the interpreter

@pytest.fixture()
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield


def _compare(q, k, w, ratio, topk, **bounds):
    got = kernels.indexer_topk(q, k, w, ratio, topk, **bounds)
    ref = reference.indexer_topk(q, k, w, ratio, topk, **bounds)
    assert got.indices.shape == ref.indices.shape and got.indices.dtype == torch.int32
    assert got.scores.dtype == torch.float32
    assert torch.equal(got.indices >= 0, ref.indices >= 0), "different numbers of picks"
    fin = ref.indices >= 0
    assert fin.any(), "the case picks nothing, so it compares nothing"
    bound = TOL[q.dtype] * max(1.0, ref.scores[fin].abs().max().item())
    assert (got.scores[fin] - ref.scores[fin]).abs().max().item() <= bound
    assert torch.isneginf(got.scores[~fin]).all()
    # identical picks except on rows whose KK-th / (KK+1)-th scores are closer than the sum rounding
    margin = _kth_margin(q, k, w, ratio, ref.indices.shape[-1], bounds)
    sure = margin > 1e-5 * max(1.0, ref.scores[fin].abs().max().item())
    assert torch.equal(got.indices[sure], ref.indices[sure])
    assert sure.float().mean() >= 0.5
    return got


def _kth_margin(q, k, w, ratio, KK, bounds):
    """Per row: gap between the KK-th and (KK+1)-th visible score in fp64; inf when at most KK are
    visible or when both are exactly 0 (all heads ReLU'd away: both implementations get exact zeros)."""
    B, T = q.shape[:2]
    NC = k.shape[1]
    start, end = reference.resolve_bounds(B, T, NC, ratio, bounds.get("visible_start"),
                                          bounds.get("visible_end"), q.device)
    score = torch.einsum("bthd,bsd->bths", q.double(), k.double()).relu().mul(w.double()[..., None]).sum(2)
    s = torch.arange(NC)
    vis = (s >= start[..., None]) & (s < end[..., None])
    ranked = score.masked_fill(~vis, float("-inf")).sort(-1, descending=True).values
    if KK >= NC:
        return torch.full((B, T), float("inf"), dtype=torch.float64)
    gap = ranked[..., KK - 1] - ranked[..., KK]
    exact = (vis.sum(-1) <= KK) | ((ranked[..., KK - 1] == 0) & (ranked[..., KK] == 0))
    return torch.where(exact, torch.full_like(gap, float("inf")), gap)


@pytest.mark.parametrize("B,T,HI,DI,ratio,topk,dtype", [
    (1, 45, 4, 32, 4, 3, torch.float32),     # T not a multiple of BLOCK_T (16 for 4 heads)
    (2, 70, 4, 32, 4, 8, torch.float32),
    (2, 37, 2, 16, 1, 9, torch.float32),     # ratio 1 (every token an entry), 2 heads
    (1, 50, 8, 64, 2, 6, torch.bfloat16),
    (1, 33, 64, 128, 4, 4, torch.bfloat16),  # V4 indexer heads and dims
])
def test_triton_matches_reference(interpreter, B, T, HI, DI, ratio, topk, dtype):
    _compare(*_inputs(B, T, HI, DI, T // ratio, dtype, seed=T), ratio, topk)


def test_topk_larger_than_visible(interpreter):
    """topk > NC: KK = NC picks; early tokens see fewer entries and pad with -1."""
    q, k, w = _inputs(1, 26, 4, 16, 6, torch.float32, seed=4)
    got = _compare(q, k, w, 4, 50)
    assert got.indices.shape[-1] == 6
    assert (got.indices[0, :3] == -1).all() and got.indices[0, 25].tolist() == list(range(6))


def test_zero_score_ties(interpreter):
    """Exact ties (ReLU zeroes every head for half the rows) resolve to the lower index, as the reference."""
    q, k, w = _inputs(1, 40, 4, 16, 20, torch.float32, seed=6)
    q[:, ::2] = -q[:, ::2].abs()
    k = k.abs()
    got = kernels.indexer_topk(q, k, w, 2, 5)
    ref = reference.indexer_topk(q, k, w, 2, 5)
    assert torch.equal(got.indices[:, ::2], ref.indices[:, ::2])
    assert got.indices[0, 38].tolist() == [0, 1, 2, 3, 4]


def test_document_bounds_and_chunks(interpreter, monkeypatch):
    """Packed documents through explicit bounds, with the score scratch forced into several row chunks."""
    pos = torch.cat((torch.arange(20), torch.arange(27), torch.arange(14)))[None].expand(2, -1)
    start, end = reference.document_bounds(pos, 4)
    NC = int(end.max())
    q, k, w = _inputs(2, pos.shape[1], 4, 32, NC, torch.float32, seed=8)
    monkeypatch.setattr(kernels.triton_module("triton_indexer"), "SCRATCH_ELEMS", 2 * NC * 13)
    _compare(q, k, w, 4, 3, visible_start=start, visible_end=end)


def test_radix_select_on_long_rows(interpreter):
    """Rows longer than the 1024-wide select chunk, many picks: exercises all radix passes and carries."""
    q, k, w = _inputs(1, 3, 2, 16, 2500, torch.float32, seed=10)
    start = torch.zeros(1, 3, dtype=torch.int32)
    end = torch.tensor([[2500, 1500, 1025]], dtype=torch.int32)
    _compare(q, k, w, 1, 700, visible_start=start, visible_end=end)
