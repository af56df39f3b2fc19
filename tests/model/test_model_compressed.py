"""CSA / HCA layers and the Lightning Indexer: block layout per document, compressor pooling (incl. the
first block's padding), the visibility rule (j+1)*m <= t+1, causality, a brute-force full masked
attention reference in both modes, indexer top-k range and KL target (spec 3.2-3.4, 0.1, 10.3)."""

import pytest
import torch

from v4train.kernels import torch_cores as sparse_core
from v4train.model.indexer import indexer_kl, indexer_scores
from v4train.model.layout import SequenceContext, compressed_layout, segment_bounds
from v4train.model.rope import apply_rope, rope_angles
from v4train import kernels
from support.attention_reference import (
    CSA, HCA, brute_entries, docs_positions, finish_output, masked_softmax_out, random_input, reference_entries,
    reference_layer,
)
from support.model import make_attention, run


# --------------------------------------------------------------------------------------- layout
@pytest.mark.parametrize("m", [4, 8])
def test_layout_aligns_blocks_to_documents_and_follows_the_visibility_rule(m):
    pos = torch.stack([docs_positions([13, 7, 20], 1)[0], docs_positions([40], 1)[0]])
    start, end = segment_bounds(pos)
    lay = compressed_layout(pos, start, end, m)
    assert lay.n_slots == 40 // m
    for b in range(2):
        entries = brute_entries(pos[b].tolist(), m)
        n = len(entries)
        assert lay.starts_BN[b, :n].tolist() == [s for s, _ in entries]
        assert (lay.starts_BN[b, n:] == 40).all() and lay.valid_BN[b].sum() == n
        assert lay.positions_BN[b, :n].tolist() == [int(pos[b, s]) for s, _ in entries]  # RoPE restarts per doc
        assert lay.has_prev_BN[b, :n].tolist() == [s - d >= m for s, d in entries]
        for t in range(40):
            doc = int(start[b, t])
            local = t - doc
            visible = [i for i, (s, d) in enumerate(entries) if d == doc and ((s - d) // m + 1) * m <= local + 1]
            got = list(range(int(lay.lo_BT[b, t]), int(lay.hi_BT[b, t])))
            assert got == visible, (b, t)
            dense = lay.dense_indices()[b, t]
            assert dense[dense >= 0].tolist() == visible
    # a 13-token document at m = 4 keeps 3 blocks; its last token only reaches the window
    if m == 4:
        assert lay.starts_BN[0, :4].tolist() == [0, 4, 8, 13]


def test_fewer_tokens_than_a_block_means_no_compressed_entries():
    attn = make_attention(HCA)  # m' = 8
    x, pos = random_input(2, 6), docs_positions([6])
    lay = SequenceContext(pos, pos, attention_mode="dense").layout(8)
    assert lay.n_slots == 0 and lay.dense_indices().shape == (2, 6, 0)
    _, _, o, _ = reference_layer(attn, x, pos, "dense")  # no entries: the window alone
    torch.testing.assert_close(run(attn, x, pos), finish_output(attn, o, pos), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ compressor
def _compressor_inputs(attn, x, pos):
    ctx = SequenceContext(pos, pos, attention_mode="dense")
    lay = ctx.layout(attn.ratio)
    cos, sin = rope_angles(lay.positions_BN, attn.rope_freqs)
    return lay, attn.compressor(x, lay, cos, sin)


def test_hca_entry_pools_exactly_its_own_block():
    attn = make_attention(HCA)
    x, pos = random_input(1, 24), docs_positions([24], 1)
    lay, entries = _compressor_inputs(attn, x, pos)
    comp = attn.compressor
    j, m = 1, 8
    tokens = x[0, j * m:(j + 1) * m]
    kv, z = comp.wkv(tokens), comp.wgate(tokens) + comp.ape
    pooled = (kv * z.softmax(dim=0)).sum(0)
    cos, sin = rope_angles(torch.tensor([[j * m]]), attn.rope_freqs)
    expected = apply_rope(comp.norm(pooled).view(1, 1, -1), cos, sin)[0, 0]
    torch.testing.assert_close(entries[0, j], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layer, reach", [(HCA, (0, 1)), (CSA, (-1, 1))])
def test_entry_depends_on_its_block_and_for_csa_the_previous_one(layer, reach):
    attn = make_attention(layer)
    m = attn.ratio
    x, pos = random_input(1, 4 * m), docs_positions([4 * m], 1)
    _, base = _compressor_inputs(attn, x, pos)
    for s in range(4 * m):
        x2 = x.clone()
        x2[0, s] += 1.0
        _, moved = _compressor_inputs(attn, x2, pos)
        changed = [j for j in range(4) if not torch.equal(moved[0, j], base[0, j])]
        block = s // m
        expected = [j for j in range(4) if block - reach[1] < j <= block - reach[0]]
        assert changed == expected, (s, changed)


def test_csa_first_block_pads_the_overlap_series():
    # entry 0 of a document uses only its own block's current (a) series: the b-part is -inf / 0
    attn = make_attention(CSA)
    comp = attn.compressor
    c = comp.head_dim
    x, pos = random_input(1, 16), docs_positions([16], 1)
    _, entries = _compressor_inputs(attn, x, pos)
    tokens = x[0, :4]
    kv_a, z_a = comp.wkv(tokens)[:, c:], comp.wgate(tokens)[:, c:] + comp.ape[:, c:]
    cos, sin = rope_angles(torch.zeros(1, 1, dtype=torch.long), attn.rope_freqs)
    expected = apply_rope(comp.norm((kv_a * z_a.softmax(0)).sum(0)).view(1, 1, -1), cos, sin)[0, 0]
    torch.testing.assert_close(entries[0, 0], expected, rtol=1e-5, atol=1e-6)
    # and a second document's first entry does not reach back into the first document
    pos2 = docs_positions([6, 10], 1)
    _, e2 = _compressor_inputs(attn, x, pos2)
    x3 = x.clone()
    x3[0, 4:6] += 3.0  # the tail of document 1, directly before document 2's first block
    _, e3 = _compressor_inputs(attn, x3, pos2)
    assert torch.equal(e2[0, 1], e3[0, 1])  # document 2, entry 0 (slot 1; document 1 has one block)


# ------------------------------------------------------------------------------- visibility, causality
@pytest.mark.parametrize("layer, mode", [(HCA, "dense"), (CSA, "dense")])
def test_visibility_rule_through_the_layer_with_a_one_token_window(layer, mode):
    # window 1: query t sees itself plus the visible compressed entries only, so token s < t can move
    # output t iff s lies in a block j with (j+1)*m <= t+1 (or, for CSA, in block j-1 of such a j)
    attn = make_attention(layer, window=1)
    m, T = attn.ratio, 4 * attn.ratio
    x, pos = random_input(1, T), docs_positions([T], 1)
    base = run(attn, x, pos, mode)
    for s in range(0, T - 1, max(1, m // 4)):
        x2 = x.clone()
        x2[0, s] += 2.0
        moved = run(attn, x2, pos, mode)
        for t in range(s + 1, T):
            visible_blocks = range((t + 1) // m)
            overlap = {j - 1 for j in visible_blocks if j > 0} if attn.kind == "csa" else set()
            reach = set(visible_blocks) | overlap
            assert (not torch.equal(moved[0, t], base[0, t])) == (s // m in reach), (s, t)


@pytest.mark.parametrize("layer, mode", [(CSA, "dense"), (CSA, "sparse"), (CSA, "indexer_warmup"), (HCA, "dense")])
def test_compressed_layers_are_causal(layer, mode):
    attn = make_attention(layer)
    attn.train()
    x, pos = random_input(2, 40), docs_positions([17, 23])
    y = run(attn, x, pos, mode)
    for t0 in (7, 9, 15, 17, 24, 32):  # 7, 15, 24 (= 17 + 7), 32 (= 17 + 15): one token past a block end
        x2 = x.clone()
        x2[:, t0:] += torch.randn(2, 40 - t0, 32)
        y2 = run(attn, x2, pos, mode)
        torch.testing.assert_close(y2[:, :t0], y[:, :t0], rtol=0, atol=1e-6)
        assert not torch.allclose(y2[:, t0:], y[:, t0:])


@pytest.mark.parametrize("layer, mode", [(CSA, "dense"), (CSA, "sparse"), (HCA, "dense")])
def test_documents_are_compressed_and_attended_on_their_own(layer, mode):
    attn = make_attention(layer)
    x, pos = random_input(2, 40), docs_positions([17, 23])
    y = run(attn, x, pos, mode)
    x2 = x.clone()
    x2[:, :17] += torch.randn(2, 17, 32)
    torch.testing.assert_close(run(attn, x2, pos, mode)[:, 17:], y[:, 17:], rtol=0, atol=1e-6)


@pytest.mark.parametrize("shared_ratio", [0, 10 ** 9])
@pytest.mark.parametrize("layer", [0, CSA, HCA])
def test_efficient_layer_equals_brute_force_reference_in_dense_mode(layer, shared_ratio, monkeypatch):
    monkeypatch.setattr(sparse_core, "_SHARED_RATIO", shared_ratio)  # both ways of computing a chunk
    attn = make_attention(layer)
    x, pos = random_input(2, 37), torch.stack([docs_positions([11, 26], 1)[0], docs_positions([37], 1)[0]])
    with torch.no_grad():
        got = run(attn, x, pos, "dense")
        _, _, o, _ = reference_layer(attn, x, pos, "dense")
        torch.testing.assert_close(got, finish_output(attn, o, pos), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shared_ratio", [0, 10 ** 9])
def test_efficient_layer_equals_brute_force_reference_in_sparse_mode(shared_ratio, monkeypatch):
    monkeypatch.setattr(sparse_core, "_SHARED_RATIO", shared_ratio)
    attn = make_attention(CSA, index_topk=3)
    x, pos = random_input(2, 37), torch.stack([docs_positions([11, 26], 1)[0], docs_positions([37], 1)[0]])
    ctx = SequenceContext(pos, pos, attention_mode="sparse")
    with torch.no_grad():
        got = attn(x, ctx)
        # the efficient selection, checked against brute-force scores (values, so ties cannot matter)
        lay = ctx.layout(4)
        cos, sin = rope_angles(pos, attn.rope_freqs)
        cos_n, sin_n = rope_angles(lay.positions_BN, attn.rope_freqs)
        qr = attn.q_norm(attn.wq_a(x))
        slots = attn.indexer.select(*attn.indexer.project(x, qr, (cos, sin), lay, (cos_n, sin_n)), lay)
        q, kv, _, picked = reference_layer(attn, x, pos, "sparse")
        for b, t, top, score_of in picked:
            chosen = [int(s) for s in slots[b, t] if s >= 0]
            assert len(chosen) == len(top) and len(set(chosen)) == len(chosen)
            got_scores = sorted((score_of[s] for s in chosen), reverse=True)  # KeyError if invisible
            torch.testing.assert_close(torch.tensor(got_scores), top, rtol=1e-5, atol=1e-6)
        # the attention over window + the chosen entries, written out densely
        out = torch.zeros_like(q)
        for b in range(2):
            entries = reference_entries(attn.compressor, x[b], pos[b], 4, attn.rope_freqs)
            keys = torch.cat([kv[b], torch.stack([e for _, _, e in entries])])
            doc = [t - int(pos[b, t]) for t in range(37)]
            allowed = torch.zeros(37, keys.shape[0], dtype=torch.bool)
            for t in range(37):
                for j in range(max(0, t - attn.window + 1), t + 1):
                    allowed[t, j] = doc[j] == doc[t]
                for s in slots[b, t]:
                    if s >= 0:
                        allowed[t, 37 + int(s)] = True
            logits = torch.einsum("thc,nc->thn", q[b], keys) * attn.head_dim ** -0.5
            out[b] = masked_softmax_out(logits, allowed, keys, attn.attn_sink)
        torch.testing.assert_close(got, finish_output(attn, out, pos), rtol=1e-5, atol=1e-5)


def test_sparse_equals_dense_when_top_k_covers_every_visible_entry():
    attn = make_attention(CSA, index_topk=64)
    x, pos = random_input(2, 40), docs_positions([17, 23])
    with torch.no_grad():
        torch.testing.assert_close(run(attn, x, pos, "sparse"), run(attn, x, pos, "dense"), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------ indexer
def test_indexer_topk_stays_in_the_visible_range_and_matches_brute_force():
    gen = torch.Generator().manual_seed(7)
    B, T, H, D, N = 2, 50, 3, 8, 12
    q, k = torch.randn(B, T, H, D, generator=gen), torch.randn(B, N, D, generator=gen)
    w = torch.rand(B, T, H, generator=gen)
    lo = torch.randint(0, 4, (B, T), generator=gen)
    hi = (lo + torch.randint(0, 9, (B, T), generator=gen)).clamp(max=N)
    picks = kernels.indexer_topk(q, k, w, 1, 5, visible_start=lo, visible_end=hi).indices
    assert picks.shape == (B, T, 5)
    scores = torch.einsum("bthd,bnd->bthn", q, k).relu().mul(w.unsqueeze(-1)).sum(2)
    for b in range(B):
        for t in range(T):
            chosen = [int(s) for s in picks[b, t] if s >= 0]
            assert all(lo[b, t] <= s < hi[b, t] for s in chosen)
            n_visible = int(hi[b, t] - lo[b, t])
            assert len(chosen) == min(5, n_visible) and len(set(chosen)) == len(chosen)
            want = scores[b, t, lo[b, t]:hi[b, t]].topk(min(5, n_visible)).values
            torch.testing.assert_close(scores[b, t, chosen].sort(descending=True).values, want)
    narrow = kernels.indexer_topk(q, k[:, :2], w, 1, 5, visible_start=lo.clamp(max=2), visible_end=hi.clamp(max=2))
    assert narrow.indices.shape == (B, T, 2)  # k = min(topk, N)


def test_indexer_kl_target_sums_to_one_and_the_loss_is_a_kl():
    gen = torch.Generator().manual_seed(8)
    slots = torch.tensor([[[0, 1, 2, -1], [3, -1, -1, -1], [-1, -1, -1, -1]]])
    mass = torch.rand(1, 3, 4, generator=gen)
    score = torch.randn(1, 3, 4, generator=gen).masked_fill(slots < 0, float("-inf")).requires_grad_()
    loss = indexer_kl(score, mass, slots)
    # by hand: p = mass / sum over valid slots (sums to 1), KL(p || softmax(score)) per row, mean over rows 0-1
    rows = []
    for r, n in ((0, 3), (1, 1)):
        p = mass[0, r, :n] / mass[0, r, :n].sum()
        assert float(p.sum()) == pytest.approx(1.0)
        rows.append((p * (p.log() - score[0, r, :n].log_softmax(0))).sum())
    torch.testing.assert_close(loss, torch.stack(rows).mean())
    loss.backward()
    assert torch.isfinite(score.grad).all() and score.grad[0, 1, 0] == 0  # one slot: KL is 0 whatever the score
    # equal distributions: zero loss
    same = indexer_kl(mass.log().masked_fill(slots < 0, float("-inf")), mass, slots)
    assert abs(float(same)) < 1e-6


def test_indexer_scores_at_slots_match_the_formula():
    gen = torch.Generator().manual_seed(9)
    q, k = torch.randn(1, 4, 2, 8, generator=gen), torch.randn(1, 5, 8, generator=gen)
    w = torch.randn(1, 4, 2, generator=gen)
    slots = torch.tensor([[[4, 0], [1, -1], [2, 3], [-1, -1]]])
    s = indexer_scores(q, k, w, slots)
    assert s[0, 1, 1] == float("-inf") and s[0, 3].isinf().all()
    torch.testing.assert_close(s[0, 2, 1], (w[0, 2] * (q[0, 2] @ k[0, 3]).relu()).sum())


@pytest.mark.parametrize("mode", ["sparse", "indexer_warmup"])
def test_indexer_learns_only_from_its_kl_and_the_rest_only_from_the_output(mode):
    attn = make_attention(CSA)
    attn.train()
    x, pos = random_input(2, 40), docs_positions([17, 23])
    ctx = SequenceContext(pos, pos, attention_mode=mode, aux_loss_scale=0.5)
    y = attn(x, ctx)
    kl = attn.aux_log["indexer_loss"][-1]
    assert kl > 0
    if mode == "indexer_warmup":
        assert 0 < float(attn.aux_log["indexer_recall"][-1]) <= 1
    # d(y)/d(indexer) is zero except through the injected KL: backprop y * 0 -> only the KL's 0.5 remains
    (y * 0).sum().backward()
    for name, p in attn.named_parameters():
        if name.startswith("indexer."):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None or p.grad.abs().sum() == 0, name


def test_indexer_scores_gradients_match_autograd_of_the_formula():
    gen = torch.Generator().manual_seed(10)
    q = torch.randn(2, 6, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    k = torch.randn(2, 5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 6, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    slots = torch.randint(-1, 5, (2, 6, 3), generator=gen)
    g = torch.randn(2, 6, 3, generator=gen, dtype=torch.float64).masked_fill(slots < 0, 0.0)

    def formula(q, k, w):
        kg = k[torch.arange(2).view(2, 1, 1), slots.clamp(min=0)]
        return (w.unsqueeze(-1) * torch.einsum("bthe,btke->bthk", q, kg).relu()).sum(2)

    got = torch.autograd.grad(indexer_scores(q, k, w, slots).masked_fill(slots < 0, 0.0), (q, k, w), g)
    want = torch.autograd.grad(formula(q, k, w), (q, k, w), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.to(b.dtype), b, rtol=1e-6, atol=1e-6)
