"""Deterministic top-k: exact ties in the indexer's scores go to the lower compressed index in every path.

Crafted inputs make the ties exact whatever the summation order: integer-valued q, k and w (every
product and partial sum is an integer far below 2^24, so fp32 is exact), all-zero ReLU rows (every
head's q.k negative, so each score is +0.0 or -0.0), and repeated key rows. The expected picks come
from a per-row sort on (-score, index) in int64, an implementation that shares nothing with the paths
under test: the reference (also forced into many row chunks), the CPU dispatch, the Triton kernels
under ``TRITON_INTERPRET=1``, the model's :meth:`Indexer.select` through both, and the recall metric.

Shape letters: B batch, T tokens, HI indexer heads, DI indexer head dim, NC compressed entries, KK picks.
"""

from __future__ import annotations

import pytest
import torch

from v4train import kernels
from v4train.kernels import reference
from v4train.model.indexer import Indexer, indexer_recall
from v4train.model.layout import SequenceContext
from support.model import small_cfg


def _integer_inputs(B, T, HI, DI, NC, seed):
    """q, k, w with small integer values and deliberately repeated key rows (exact equal scores)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-2, 3, (B, T, HI, DI), generator=g).float()
    k = torch.randint(-2, 3, (B, NC, DI), generator=g).float()
    k[:, 1::3] = k[:, 0:1]                       # every third entry from 1 on repeats entry 0
    k[:, 2::5] = k[:, 2:3]
    w = torch.randint(-2, 3, (B, T, HI), generator=g).float()
    k[:, NC // 2:] = k[:, NC // 2:].abs() + 1     # the second half of the keys: positive
    q[:, ::4] = -1.0                              # every 4th token: q.k < 0 (ReLU 0) on that half
    return q, k, w


def _expected(q, k, w, start, end, topk):
    """[B, T, KK] int32 picks by sorting (-score, index) per row in exact int64 arithmetic."""
    B, T, HI, _ = q.shape
    NC = k.shape[1]
    KK = min(topk, NC)
    score = torch.einsum("bthd,bsd->bths", q.long(), k.long()).clamp(min=0).mul(w.long()[..., None]).sum(2)
    out = torch.full((B, T, KK), -1, dtype=torch.int32)
    for b in range(B):
        for t in range(T):
            lo, hi = int(start[b, t]), int(end[b, t])
            ranked = sorted(range(lo, hi), key=lambda s: (-int(score[b, t, s]), s))[:KK]
            out[b, t, :len(ranked)] = torch.tensor(sorted(ranked), dtype=torch.int32)
    return out


def _bounds(B, T, NC, ratio, packed):
    if not packed:
        return reference.causal_bounds(B, T, NC, ratio)
    pos = torch.cat((torch.arange(T // 3), torch.arange(T - T // 3)))[None].expand(B, T)
    return reference.document_bounds(pos, ratio)


CASES = [  # (B, T, HI, DI, ratio, topk, packed)
    (2, 48, 4, 8, 4, 3, False),
    (1, 60, 2, 16, 2, 7, True),
    (1, 33, 3, 4, 1, 5, False),
]


@pytest.mark.parametrize("B,T,HI,DI,ratio,topk,packed", CASES)
def test_every_path_picks_the_lowest_tied_indices(monkeypatch, B, T, HI, DI, ratio, topk, packed):
    NC = T // ratio
    q, k, w = _integer_inputs(B, T, HI, DI, NC, seed=T)
    start, end = _bounds(B, T, NC, ratio, packed)
    want = _expected(q, k, w, start, end, topk)
    # the crafted rows really tie at the cut: on at least a tenth of the rows with more visible
    # entries than picks, the KK-th score also occurs among the entries left out
    score = torch.einsum("bthd,bsd->bths", q, k).relu().mul(w[..., None]).sum(2)
    s_S = torch.arange(NC)
    vis = (s_S >= start[..., None]) & (s_S < end[..., None])
    kth = score.gather(-1, want.long().clamp(min=0))[..., -1:]
    left_out = vis.clone()
    left_out.scatter_(-1, want.long().clamp(min=0), False)
    wider = (end - start) > want.shape[-1]
    tied = ((score == kth) & left_out).any(-1) & wider
    assert tied.sum() >= 0.1 * wider.sum() > 0

    got = {"reference": reference.indexer_topk(q, k, w, ratio, topk, visible_start=start, visible_end=end),
           "cpu dispatch": kernels.indexer_topk(q, k, w, ratio, topk, visible_start=start, visible_end=end)}
    monkeypatch.setattr(reference, "_CHUNK_ROWS", 5)
    got["reference, 5-row chunks"] = reference.indexer_topk(q, k, w, ratio, topk, visible_start=start,
                                                            visible_end=end)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    got["triton (interpreter)"] = kernels.indexer_topk(q, k, w, ratio, topk, visible_start=start, visible_end=end)
    for path, picks in got.items():
        assert torch.equal(picks.indices, want), path


def test_all_zero_scores_take_the_first_entries(monkeypatch):
    """Every head's ReLU is 0 (signed zeros from negative weights included): the first KK visible entries."""
    B, T, HI, DI, NC = 1, 40, 4, 8, 20
    q = -torch.ones(B, T, HI, DI)
    k = torch.rand(B, NC, DI, generator=torch.Generator().manual_seed(0)) + 0.5
    w = torch.randn(B, T, HI, generator=torch.Generator().manual_seed(1))
    w[:, ::2] = -w[:, ::2].abs()                  # w * 0 = -0.0: rows whose every term is a negative zero
    want = torch.full((B, T, 5), -1, dtype=torch.int32)
    for t in range(T):
        n = min((t + 1) // 2, 5)
        want[0, t, :n] = torch.arange(n, dtype=torch.int32)
    ref = reference.indexer_topk(q, k, w, 2, 5)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    tri = kernels.indexer_topk(q, k, w, 2, 5)
    assert torch.equal(ref.indices, want) and torch.equal(tri.indices, want)


def test_long_tied_rows_across_select_chunks(monkeypatch):
    """Rows wider than the Triton select kernel's 1024-wide chunk, all scores 0: the first KK in order."""
    q = -torch.ones(1, 2, 2, 4)
    k = torch.ones(1, 2100, 4)
    w = torch.ones(1, 2, 2)
    start = torch.tensor([[0, 300]], dtype=torch.int32)
    end = torch.tensor([[2100, 1900]], dtype=torch.int32)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    got = kernels.indexer_topk(q, k, w, 1, 1500, visible_start=start, visible_end=end)
    assert got.indices[0, 0].tolist() == list(range(1500))
    assert got.indices[0, 1].tolist() == list(range(300, 1800))
    assert torch.equal(got.indices, reference.indexer_topk(q, k, w, 1, 1500, visible_start=start,
                                                           visible_end=end).indices)


@pytest.mark.parametrize("interpret", ["0", "1"])
def test_model_indexer_select_breaks_ties_low(monkeypatch, interpret):
    """:meth:`Indexer.select` on packed documents (layout bounds) picks what the exact sort picks."""
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    cfg = small_cfg()
    indexer = Indexer(cfg, 4)
    T = 64
    pos = torch.cat((torch.arange(22), torch.arange(T - 22)))[None]
    layout = SequenceContext(pos, pos, attention_mode="sparse").layout(4)
    q, k, w = _integer_inputs(1, T, cfg.index_n_heads, cfg.index_head_dim, layout.n_slots, seed=3)
    got = indexer.select(q, k, w, layout)
    want = _expected(q, k, w, layout.lo_BT, layout.hi_BT, cfg.index_topk)
    assert torch.equal(got, want.long())


def test_recall_metric_uses_the_same_tie_rule():
    """The recall metric keeps the mass of the lowest tied slots, exactly what sparse mode attends to."""
    score = torch.zeros(1, 2, 6)
    score[0, 1, 4] = 1.0                          # row 1: slot 4 first, then ties at 0 among the rest
    slots = torch.tensor([[[3, 4, 5, 6, 7, -1], [0, 1, 2, 3, 4, 5]]])
    score[0, 0, 5] = float("-inf")
    mass = torch.tensor([[[0.5, 0.2, 0.1, 0.1, 0.1, 0.0], [0.1, 0.1, 0.2, 0.2, 0.2, 0.2]]])
    # row 0 keeps slots 0, 1 (mass 0.7 of 1.0); row 1 keeps slot 4 and slot 0 (0.3 of 1.0)
    got = indexer_recall(score, mass, slots, topk=2)
    assert torch.allclose(got, torch.tensor((0.7 + 0.3) / 2))
