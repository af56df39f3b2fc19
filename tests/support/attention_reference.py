"""A brute-force reference of a whole V4 attention layer (SWA, CSA or HCA) at test sizes.

Every complete compression block of every document is pooled with explicit per-channel softmaxes, and each
query row attends through one ``[T, T + entries]`` masked softmax with the sink in the denominator
(spec 3.1-3.6): no kernel, no layout tensor of the model is reused. The layers come from
``support.model.small_cfg``.
"""

import torch

from v4train.model.rope import apply_rope, rope_angles

CSA, HCA = 1, 2  # layer indices of small_cfg: ratios 4 and 8


def docs_positions(lengths, B=2):
    """Position ids ``[B, sum(lengths)]`` of packed documents of these lengths, restarting at 0 per document."""
    return torch.cat([torch.arange(n) for n in lengths]).repeat(B, 1)


def random_input(B, T, seed=1):
    """A seeded normed-input stand-in ``[B, T, 32]`` (32 = ``small_cfg().dim``)."""
    return torch.randn(B, T, 32, generator=torch.Generator().manual_seed(seed))


def brute_entries(pos_row, m):
    """[(first token, doc start)] of every complete block of every document, in token order."""
    T = len(pos_row)
    starts = [t for t in range(T) if t == 0 or pos_row[t] != pos_row[t - 1] + 1]
    bounds = list(zip(starts, starts[1:] + [T]))
    return [(s + j * m, s) for s, e in bounds for j in range((e - s) // m)]


def reference_entries(comp, x_row, pos_row, m, freqs):
    """Every complete block of every document, pooled with explicit per-channel softmaxes."""
    c = comp.head_dim
    kv_all, z_all = comp.wkv(x_row), comp.wgate(x_row)
    out = []
    for s, d in brute_entries(pos_row.tolist(), m):
        slots = torch.arange(m)
        if comp.overlap:
            kv_cur, z_cur = kv_all[s:s + m, c:], z_all[s:s + m, c:] + comp.ape[:, c:]
            if s - d >= m:
                kv_prev, z_prev = kv_all[s - m:s, :c], z_all[s - m:s, :c] + comp.ape[:, :c]
                kv_cur, z_cur = torch.cat([kv_prev, kv_cur]), torch.cat([z_prev, z_cur])
        else:
            kv_cur, z_cur = kv_all[s + slots], z_all[s + slots] + comp.ape
        pooled = (kv_cur * z_cur.softmax(dim=0)).sum(0)
        cos, sin = rope_angles(pos_row[s].view(1, 1), freqs)
        out.append((s, d, apply_rope(comp.norm(pooled).view(1, 1, c), cos, sin)[0, 0]))
    return out


def reference_layer(attn, x, pos, mode):
    """The whole layer with a [T, T + entries] masked softmax per row (test-size only)."""
    B, T, _ = x.shape
    H, C, W, m = attn.n_heads, attn.head_dim, attn.window, attn.ratio
    cos, sin = rope_angles(pos, attn.rope_freqs)
    qr = attn.q_norm(attn.wq_a(x))
    q = attn.wq_b(qr).unflatten(-1, (H, C))
    q = apply_rope(q * torch.rsqrt(q.square().mean(-1, keepdim=True) + attn.eps), cos, sin)
    kv = apply_rope(attn.kv_norm(attn.wkv(x)), cos, sin)
    out = torch.zeros(B, T, H, C)
    picked = []
    for b in range(B):
        doc = [t - int(pos[b, t]) for t in range(T)]
        entries = reference_entries(attn.compressor, x[b], pos[b], m, attn.rope_freqs) if m else []
        keys = torch.cat([kv[b], torch.stack([e for _, _, e in entries])]) if entries else kv[b]
        allowed = torch.zeros(T, keys.shape[0], dtype=torch.bool)
        if attn.kind == "csa" and mode == "sparse":
            ik = reference_entries(attn.indexer.compressor, x[b], pos[b], m, attn.rope_freqs)
            qi = apply_rope(attn.indexer.wq_b(qr[b:b + 1]).unflatten(-1, (-1, attn.indexer.head_dim)),
                            cos[b:b + 1], sin[b:b + 1])[0]
            w = attn.indexer.weights_proj(x[b]) * attn.indexer.weight_scale
        for t in range(T):
            for j in range(max(0, t - W + 1), t + 1):
                allowed[t, j] = doc[j] == doc[t]
            visible = [i for i, (s, d, _) in enumerate(entries) if d == doc[t] and s + m - 1 <= t]
            if attn.kind == "csa" and mode == "sparse" and visible:
                scores = torch.stack([(w[t] * (qi[t] @ ik[i][2]).relu()).sum() for i in visible])
                top = scores.topk(min(attn.indexer.topk, len(visible))).values
                picked.append((b, t, top, {visible[i]: float(scores[i]) for i in range(len(visible))}))
                continue  # the selection itself is checked against the efficient path below
            for i in visible:
                allowed[t, T + i] = True
        logits = torch.einsum("thc,nc->thn", q[b], keys) * C ** -0.5
        out[b] = masked_softmax_out(logits, allowed, keys, attn.attn_sink)
    return q, kv, out, picked


def masked_softmax_out(logits, allowed, keys, sink):
    e = torch.where(allowed.unsqueeze(1), logits.exp(), 0.0)
    p = e / (e.sum(-1, keepdim=True) + sink.view(1, -1, 1).exp())
    return torch.einsum("thn,nc->thc", p, keys)


def finish_output(attn, o, pos):
    B, T = pos.shape
    cos, sin = rope_angles(pos, attn.rope_freqs)
    o = apply_rope(o, cos, sin, inverse=True).reshape(B, T, attn.o_groups, -1)
    wo_a = attn.wo_a.weight.view(attn.o_groups, attn.o_lora_rank, -1)
    return attn.wo_b(torch.einsum("btgi,gri->btgr", o, wo_a).flatten(2))
