"""Context parallelism for V4's hybrid attention: the sequence split over CP ranks, exchanges built for SWA, CSA, HCA.

Split (load-balanced causal, Megatron-core's CP layout): a sequence of T tokens is cut into 2 cp chunks of
T / (2 cp) tokens and CP rank r holds chunks r and 2 cp - 1 - r, in that order, so every rank has the same
share of early (cheap) and late (expensive) causal queries. Rank order is that of Megatron-core's
context-parallel group (``parallel_state.get_context_parallel_group``, order ``tp-cp-ep-dp-pp``).

What a rank needs from the others, per attention layer (spec 3.2-3.6), and nothing else:

* **Halo (SWA and the compressors' boundary state).** Each local chunk needs the H hidden rows (the
  layer's attn_norm output) just before it, from its predecessor rank(s): H = window - 1 for the window,
  2m - 1 for a CSA compressor (its own block and the overlap block), m' - 1 for HCA. They are fetched
  point to point and the window KV and compressor projections of the halo rows are recomputed locally
  (one exchange per layer instead of one per branch; rows of width dim rather than head_dim).
* **Compressed entries (CSA, HCA, the indexer's keys).** An entry belongs to the rank holding the
  last token of its block; owners compute their entries from local and halo rows and the entries are
  all-gathered into the global slot order (``model/layout.py``), so every query sees exactly the
  entries it sees on one rank: attention over all visible entries, and the indexer's scores and top-k
  over all visible entries (the selection equals the single-rank one).
* **Packed documents** keep their boundaries: layouts, windows and visibility are computed from the
  full position ids (``[B, T]`` int64, cheap), which every CP rank holds.
* **Backward**: the gradients of halo rows go back to their owners (point to point) and the gradients
  of gathered entries are summed over the ranks and kept by the owner.

The LM loss and the indexer's KL are sums over each rank's queries, normalised by global counts, so the
sum over CP ranks of the gradients (the trainer's gradient all-reduce over data x context parallel
ranks) equals the single-rank gradient.

Shape letters: B batch, T global tokens, L local tokens (T / cp), E halo-extended local rows, D model
dim, C head dim, N compressed slots (global), n owned slots (padded), W window slots, K attended slots.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist

from v4train.kernels.torch_cores import attention_probabilities
from v4train.model.indexer import indexer_kl, indexer_recall
from v4train.model.layout import CompressedLayout, SequenceContext
from v4train.model.moe import AuxLossInjector
from v4train.model.rope import rope_angles
from v4train.parallel.tensor_parallel import copy_to_region, reduce_from_region

__all__ = ["ContextParallel", "load_balanced_chunks", "shard_tokens", "unshard_tokens", "gather_sequence",
           "sum_over_cp", "CPSequence", "check_cp_seq_len", "context_parallel_attention", "exchange_bytes"]


@dataclasses.dataclass(frozen=True)
class ContextParallel:
    """This rank's context-parallel group: ``size`` ranks, this one ``rank``; ``group`` None when size 1."""

    group: dist.ProcessGroup | None = None
    rank: int = 0
    size: int = 1

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"ContextParallel: rank {self.rank} / size {self.size} is not a valid rank")
        if self.size > 1 and self.group is None:
            raise ValueError(f"ContextParallel: size {self.size} needs a process group")

    @property
    def active(self) -> bool:
        return self.size > 1

    def global_rank(self, cp_rank: int) -> int:
        return dist.get_global_rank(self.group, cp_rank) if self.group is not None else cp_rank


def check_cp_seq_len(seq_len: int, cp: int, ratios: tuple[int, ...], field: str = "seq_len") -> None:
    """ValueError naming ``field`` and ``parallel.cp`` unless ``seq_len`` splits into 2 cp chunks of whole
    compression blocks (every chunk a multiple of each compress ratio)."""
    if cp < 1:
        raise ValueError(f"parallel.cp={cp} must be >= 1")
    block = math.lcm(*[r for r in ratios if r] or [1])
    if seq_len % (2 * cp * block):
        raise ValueError(f"{field}={seq_len} with parallel.cp={cp}: the load-balanced split needs 2*cp = {2 * cp} "
                         f"chunks of whole compression blocks ({block} tokens, the compress ratios' lcm), i.e. "
                         f"{field} a multiple of {2 * cp * block}")


def load_balanced_chunks(seq_len: int, cp: int, rank: int) -> list[tuple[int, int]]:
    """``[(start, stop), (start, stop)]`` global token ranges of CP rank ``rank``: chunks rank and 2 cp - 1 - rank."""
    n = seq_len // (2 * cp)
    if n * 2 * cp != seq_len:
        raise ValueError(f"seq_len={seq_len} is not divisible by 2*cp = {2 * cp}")
    if cp == 1:
        return [(0, seq_len)]
    return [(rank * n, (rank + 1) * n), ((2 * cp - 1 - rank) * n, (2 * cp - rank) * n)]


def _local_tokens(seq_len: int, cp: int, rank: int) -> torch.Tensor:
    return torch.cat([torch.arange(a, b) for a, b in load_balanced_chunks(seq_len, cp, rank)])


def shard_tokens(x_BT: torch.Tensor, cp: int, rank: int, dim: int = 1) -> torch.Tensor:
    """This rank's tokens of ``x`` along ``dim`` (global order -> load-balanced local order)."""
    return x_BT.index_select(dim, _local_tokens(x_BT.shape[dim], cp, rank).to(x_BT.device))


def unshard_tokens(parts: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`shard_tokens`: the ranks' local tensors (rank order) -> global token order."""
    cp = len(parts)
    seq_len = sum(p.shape[dim] for p in parts)
    order = torch.cat([_local_tokens(seq_len, cp, r) for r in range(cp)])
    out = torch.empty_like(torch.cat(parts, dim))
    return out.index_copy_(dim, order.to(out.device), torch.cat(parts, dim))


@torch.no_grad()
def gather_sequence(x_BL: torch.Tensor, cp: ContextParallel) -> torch.Tensor:
    """The whole sequence ``[B, T]`` of a per-token integer tensor (position ids, labels) from every CP
    rank's ``[B, L]`` (all-gather, global token order; no gradient). Identity without CP."""
    if not cp.active:
        return x_BL
    parts = [torch.empty_like(x_BL) for _ in range(cp.size)]
    dist.all_gather(parts, x_BL.contiguous(), group=cp.group)
    return unshard_tokens(parts)


@torch.no_grad()
def sum_over_cp(x: torch.Tensor, cp: ContextParallel) -> torch.Tensor:
    """``x`` summed over the CP ranks (a count or a normaliser; no gradient). Identity without CP."""
    x = x.detach().clone()
    if cp.active:
        dist.all_reduce(x, group=cp.group)
    return x


@dataclasses.dataclass(frozen=True)
class _Halo:
    """Rows of the extended buffer of every rank for one halo width (identical on every rank).

    ext[r]: global token of each extended row of rank r (chunk by chunk: halo, then the chunk's tokens);
    local_rows[r]: the extended rows holding rank r's own tokens, in local order.
    """

    ext: list[torch.Tensor]
    local_rows: list[torch.Tensor]
    owner: torch.Tensor        # [T] rank holding each global token
    owner_index: torch.Tensor  # [T] its local index there


def _halo_plan(seq_len: int, cp: int, width: int) -> _Halo:
    owner = torch.empty(seq_len, dtype=torch.long)
    owner_index = torch.empty(seq_len, dtype=torch.long)
    ext, local_rows = [], []
    for r in range(cp):
        toks = _local_tokens(seq_len, cp, r)
        owner[toks], owner_index[toks] = r, torch.arange(len(toks))
        rows, mine, n = [], [], 0
        for a, b in load_balanced_chunks(seq_len, cp, r):
            h = min(width, a)
            rows.append(torch.arange(a - h, b))
            mine.append(torch.arange(n + h, n + h + b - a))
            n += h + b - a
        ext.append(torch.cat(rows))
        local_rows.append(torch.cat(mine))
    return _Halo(ext, local_rows, owner, owner_index)


class _HaloExchange(torch.autograd.Function):
    """``x_local [B, L, D] -> x_ext [B, E, D]``: local rows plus the halo rows fetched from their owners.

    Forward: each rank sends the rows others need to them (point to point); backward: the gradients of
    the received rows go back to their owners and are added to the owners' local gradients."""

    @staticmethod
    def forward(ctx, x_BLD, cp: ContextParallel, plan: _Halo):
        ctx.cp, ctx.plan = cp, plan
        B, _, D = x_BLD.shape
        ext_BED = x_BLD.new_empty(B, len(plan.ext[cp.rank]), D)
        ext_BED[:, plan.local_rows[cp.rank]] = x_BLD
        _exchange(cp, plan, lambda sent_rows: x_BLD[:, sent_rows].contiguous(),
                  lambda recv_rows, buf: ext_BED.__setitem__((slice(None), recv_rows), buf),
                  B, D, x_BLD.dtype, x_BLD.device, reverse=False)
        return ext_BED

    @staticmethod
    def backward(ctx, grad_BED):
        cp, plan = ctx.cp, ctx.plan
        B, _, D = grad_BED.shape
        grad_BLD = grad_BED[:, plan.local_rows[cp.rank]].clone()
        _exchange(cp, plan, lambda recv_rows: grad_BED[:, recv_rows].contiguous(),
                  lambda sent_rows, buf: grad_BLD.index_add_(1, sent_rows.to(buf.device), buf),
                  B, D, grad_BED.dtype, grad_BED.device, reverse=True)
        return grad_BLD, None, None


def _transfers(cp: ContextParallel, plan: _Halo):
    """Per (sender, receiver) pair: (sender's local rows, receiver's extended rows), the halo only."""
    out = {}
    for r in range(cp.size):
        halo = torch.ones(len(plan.ext[r]), dtype=torch.bool)
        halo[plan.local_rows[r]] = False
        rows = halo.nonzero().squeeze(1)
        toks = plan.ext[r][rows]
        for q in range(cp.size):
            sel = plan.owner[toks] == q
            if sel.any():
                out[(q, r)] = (plan.owner_index[toks[sel]], rows[sel])
    return out


def _exchange(cp, plan, pack, unpack, B, D, dtype, device, reverse: bool) -> None:
    """Point-to-point halo transfers; ``reverse`` runs them receiver -> sender (the backward). Rows a
    rank needs from itself (its other chunk) are copied without communication."""
    ops, pending = [], []
    for (src, dst), (sent_rows, recv_rows) in _transfers(cp, plan).items():
        if reverse:
            src, dst = dst, src
        send_idx, recv_idx = (recv_rows, sent_rows) if reverse else (sent_rows, recv_rows)
        if src == dst == cp.rank:
            unpack(recv_idx, pack(send_idx))
        elif src == cp.rank:
            ops.append(dist.P2POp(dist.isend, pack(send_idx), cp.global_rank(dst), cp.group))
        elif dst == cp.rank:
            buf = torch.empty(B, len(recv_idx), D, dtype=dtype, device=device)
            ops.append(dist.P2POp(dist.irecv, buf, cp.global_rank(src), cp.group))
            pending.append((recv_idx, buf))
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    for recv_idx, buf in pending:
        unpack(recv_idx, buf)


class _GatherEntries(torch.autograd.Function):
    """Owned entries ``[B, n, C]`` of every rank -> all entries ``[B, N, C]`` in global slot order.

    Backward: the full gradient is summed over the ranks (all-reduce) and each owner keeps its rows."""

    @staticmethod
    def forward(ctx, own_BnC, cp: ContextParallel, slots: list[torch.Tensor], n_slots: int):
        ctx.cp, ctx.slots = cp, slots
        B, n, C = own_BnC.shape
        parts = [torch.empty_like(own_BnC) for _ in range(cp.size)]
        dist.all_gather(parts, own_BnC.contiguous(), group=cp.group)
        out_BNC = own_BnC.new_zeros(B * n_slots + 1, C)  # the last row absorbs padding
        for part, flat in zip(parts, slots, strict=True):
            out_BNC.index_copy_(0, flat, part.reshape(-1, C))
        return out_BNC[:-1].view(B, n_slots, C)

    @staticmethod
    def backward(ctx, grad_BNC):
        cp = ctx.cp
        B, N, C = grad_BNC.shape
        grad = torch.cat((grad_BNC.reshape(-1, C), grad_BNC.new_zeros(1, C))).contiguous()
        dist.all_reduce(grad, group=cp.group)
        flat = ctx.slots[cp.rank]
        return grad.index_select(0, flat).view(B, -1, C), None, None, None


@dataclasses.dataclass(frozen=True)
class _Entries:
    """Ownership of one ratio's compressed slots: ``layout`` (this rank's owned slots in extended-row
    coordinates, padded to n), ``slots[q]`` the flat global index ``b * N + j`` of rank q's owned slots
    (padding -> ``B * N``), ``n_slots`` N."""

    layout: CompressedLayout
    slots: list[torch.Tensor]
    n_slots: int


class CPSequence:
    """One forward's context-parallel view of a batch: the global :class:`SequenceContext` (full position
    ids) plus this rank's tokens, halos and entry ownership (built once, cached per width / ratio).

    Args:
        position_ids_BT: ``[B, T]`` int64, the *full* sequence's position ids (every CP rank holds them).
        cp: the context-parallel group.
        attention_mode, aux_loss_scale: as :class:`model.layout.SequenceContext`.
    Raises:
        ValueError: T not divisible by 2 cp.
    """

    def __init__(self, position_ids_BT: torch.Tensor, cp: ContextParallel, *, attention_mode: str,
                 aux_loss_scale: float = 1.0):
        self.cp = cp
        self.ctx = SequenceContext(position_ids_BT, position_ids_BT, attention_mode=attention_mode,
                                   aux_loss_scale=aux_loss_scale)
        self.seq_len = position_ids_BT.shape[1]
        self.tokens = _local_tokens(self.seq_len, cp.size, cp.rank).to(position_ids_BT.device)
        self.position_ids = position_ids_BT[:, self.tokens]
        self._halos: dict[int, _Halo] = {}
        self._entries: dict[tuple[int, int], _Entries] = {}

    @property
    def attention_mode(self) -> str:
        return self.ctx.attention_mode

    def halo(self, width: int) -> _Halo:
        if width not in self._halos:
            self._halos[width] = _halo_plan(self.seq_len, self.cp.size, width)
        return self._halos[width]

    def extend(self, x_BLD: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_ext [B, E, D], tokens_E)``: local rows with the ``width`` rows before each chunk."""
        plan = self.halo(width)
        ext_BED = _HaloExchange.apply(x_BLD, self.cp, plan) if self.cp.active else x_BLD
        return ext_BED, plan.ext[self.cp.rank].to(x_BLD.device)

    def entries(self, ratio: int, width: int) -> _Entries:
        """Ownership of the ``ratio`` slots for halo ``width``: each valid slot belongs to the rank
        holding its block's last token."""
        key = (ratio, width)
        if key not in self._entries:
            self._entries[key] = self._ownership(ratio, self.halo(width))
        return self._entries[key]

    def _ownership(self, ratio: int, plan: _Halo) -> _Entries:
        lay = self.ctx.layout(ratio)
        B, N = lay.starts_BN.shape
        device = lay.starts_BN.device
        last_BN = (lay.starts_BN + ratio - 1).clamp(max=self.seq_len - 1)
        owner_BN = torch.where(lay.valid_BN, plan.owner.to(device)[last_BN], -1)
        counts = [int((owner_BN == q).sum(1).max()) if N else 0 for q in range(self.cp.size)]
        n = max(counts + [0])
        slots, mine = [], None
        for q in range(self.cp.size):
            flat = torch.full((B, n), B * N, dtype=torch.long, device=device)
            for b in range(B):
                js = (owner_BN[b] == q).nonzero().squeeze(1)
                flat[b, :len(js)] = b * N + js
            slots.append(flat.reshape(-1))
            if q == self.cp.rank:
                mine = flat
        # this rank's owned slots in extended-row coordinates (padding: slot 0's values, never used)
        j_Bn = torch.where(mine < B * N, mine % max(N, 1), 0)
        # the extended row of each local token (a token can also sit in the other chunk's halo: the
        # block's rows are the contiguous run ending at its last token, in the owner chunk's segment)
        local_rows = plan.local_rows[self.cp.rank].to(device)
        row_of_token = torch.full((self.seq_len,), -1, dtype=torch.long, device=device)
        row_of_token[plan.ext[self.cp.rank].to(device)[local_rows]] = local_rows
        starts_Bn = lay.starts_BN.gather(1, j_Bn).clamp(max=self.seq_len - 1)
        ends_Bn = (starts_Bn + ratio - 1).clamp(max=self.seq_len - 1)
        start_rows_Bn = row_of_token[ends_Bn] - (ends_Bn - starts_Bn)
        valid_Bn = mine < B * N
        own = CompressedLayout(
            ratio, torch.where(valid_Bn, start_rows_Bn, 0), valid_Bn,
            lay.has_prev_BN.gather(1, j_Bn) & valid_Bn, torch.where(valid_Bn, lay.positions_BN.gather(1, j_Bn), 0),
            lay.lo_BT[:, self.tokens], lay.hi_BT[:, self.tokens])
        return _Entries(own, slots, N)

    def gather_entries(self, own_BnC: torch.Tensor, entries: _Entries) -> torch.Tensor:
        """Every rank's owned entries -> ``[B, N, C]`` in the global slot order (differentiable)."""
        if not self.cp.active:
            B = own_BnC.shape[0]
            out = own_BnC.new_zeros(B * entries.n_slots + 1, own_BnC.shape[-1])
            out = out.index_copy(0, entries.slots[0], own_BnC.reshape(-1, own_BnC.shape[-1]))
            return out[:-1].view(B, entries.n_slots, -1)
        return _GatherEntries.apply(own_BnC, self.cp, entries.slots, entries.n_slots)

    def local_layout(self, ratio: int) -> CompressedLayout:
        """The global layout with the visible ranges ``[lo, hi)`` of this rank's queries only."""
        lay = self.ctx.layout(ratio)
        return dataclasses.replace(lay, lo_BT=lay.lo_BT[:, self.tokens], hi_BT=lay.hi_BT[:, self.tokens], _dense=None)

    def window_rows(self, window: int, width: int) -> torch.Tensor:
        """``[B, L, W]`` int32 extended rows of each local query's window keys (-1 where not visible)."""
        key_BLW = self.ctx.window_indices(window)[:, self.tokens].long()
        plan = self.halo(width)
        q_rows_L = plan.local_rows[self.cp.rank].to(key_BLW.device)
        rows_BLW = q_rows_L.view(1, -1, 1) - (self.tokens.view(1, -1, 1) - key_BLW)
        return torch.where(key_BLW >= 0, rows_BLW, -1).to(torch.int32)

    def global_count(self, n: torch.Tensor) -> torch.Tensor:
        """Sum of a per-rank count over the CP group (fp32, no gradient)."""
        return sum_over_cp(n.to(torch.float32), self.cp)


def _halo_width(attn) -> int:
    """Rows before a chunk this layer needs: its window, and its compressors' blocks (CSA: two)."""
    width = attn.window - 1
    if attn.ratio:
        width = max(width, (2 if attn.kind == "csa" else 1) * attn.ratio - 1)
    return width


def context_parallel_attention(attn, x_BLD: torch.Tensor, seq: CPSequence) -> torch.Tensor:
    """The forward of ``attn`` (a :class:`model.attention.Attention`) on this rank's tokens ``[B, L, D]``.

    The same steps as ``Attention.forward`` (shared through the layer's own methods), with the halo and
    the global compressed entries from the exchanges above. Under tensor parallelism the layer's TP
    mappings apply as in ``Attention.forward``: the replicated entries enter the head-split core through
    *f*, ``wo_b`` sums over the TP ranks, the indexer's per-head sums are reduced over them.
    """
    from v4train.model.attention import _HeadNormRope  # noqa: PLC0415 - the layer's own query step

    width = _halo_width(attn)
    rope_L = rope_angles(seq.position_ids, attn.rope_freqs)
    qr_BLL = attn._query_latent(x_BLD)
    q_BLHC = attn.wq_b(qr_BLL).unflatten(-1, (attn.n_heads, attn.head_dim))
    q_BLHC = _HeadNormRope.apply(q_BLHC, *rope_L, attn.eps)
    x_BED, tokens_E = seq.extend(x_BLD, width)
    pos_BE = seq.ctx.position_ids[:, tokens_E]
    rope_E = rope_angles(pos_BE, attn.rope_freqs)
    kv_BEC = attn._window_kv(x_BED, *rope_E)
    idx_BLW = seq.window_rows(attn.window, width)
    E = kv_BEC.shape[1]
    trained, ranges, idx_BLK = None, None, idx_BLW
    if attn.ratio == 0:
        kv_BXC = kv_BEC
    else:
        entries = seq.entries(attn.ratio, width)
        own = entries.layout
        rope_n = rope_angles(own.positions_BN, attn.rope_freqs)
        comp_BNC = seq.gather_entries(attn.compressor(x_BED, own, *rope_n), entries)
        kv_BXC = torch.cat((kv_BEC, comp_BNC), dim=1)
        layout = seq.local_layout(attn.ratio)
        mode = seq.attention_mode
        sparse = attn.kind == "csa" and mode == "sparse"
        train_indexer = attn.kind == "csa" and mode != "dense" and attn.training and torch.is_grad_enabled()
        if not (sparse or train_indexer):
            # every visible entry, as one slot range per query (the single-rank layer's path): an index
            # list would be [L, N] int32, N = T / m global entries, for every local query
            ranges = (layout.lo_BT, layout.hi_BT, E)
        else:
            # the indexer's KL reads every visible slot outside sparse mode: the list is built only here
            slots_BLK = None if sparse else layout.dense_indices()
            qr_I = qr_BLL.detach()
            k_I = seq.gather_entries(attn.indexer.compressor(x_BED.detach(), own, *rope_n), entries)
            w_I = attn.indexer.weights_proj(x_BLD.detach()).float() * attn.indexer.weight_scale
            if sparse:
                with torch.no_grad():
                    slots_BLK = attn.indexer.select(attn.indexer.query(qr_I, rope_L), k_I, w_I, layout)
            if train_indexer:
                trained = (qr_I, k_I, w_I, slots_BLK)
            shifted_BLK = torch.where(slots_BLK >= 0, slots_BLK.to(torch.int32) + E, -1).to(torch.int32)
            idx_BLK = torch.cat((idx_BLW, shifted_BLK), dim=-1)
    kv_BXC = copy_to_region(kv_BXC, attn.tp)  # replicated entries, read by this TP rank's heads only
    o_BLHC = attn._core(q_BLHC, kv_BXC, idx_BLK, ranges)
    if attn.tp.active:  # a row-parallel wo_b sums over the TP ranks
        y_BLD = attn.wo_b(attn._grouped_projection(o_BLHC, *rope_L))
    else:
        y_BLD = attn._output_projection(o_BLHC, *rope_L)
    if trained is not None:
        loss = _indexer_loss(attn, seq, q_BLHC, kv_BXC, idx_BLK, idx_BLW.shape[-1], trained, rope_L)
        y_BLD = AuxLossInjector.apply(y_BLD, loss, seq.ctx.aux_loss_scale)
    return y_BLD


def _indexer_loss(attn, seq: CPSequence, q_BLHC, kv_BXC, idx_BLK, n_window, trained, rope_L) -> torch.Tensor:
    """This rank's share of the indexer KL: its queries' KL sum over the global number of queries with mass,
    so the shares add up (over CP ranks) to the single-rank mean."""
    qr_I, k_I, w_I, slots_BLK = trained
    # both head sums are partial on a TP rank: summed over the TP ranks (the mass without gradient)
    mass_BLK = reduce_from_region(
        attention_probabilities(q_BLHC.detach(), kv_BXC.detach(), attn.attn_sink.detach(), idx_BLK,
                                attn.head_dim ** -0.5, first_slot=n_window), attn.tp)
    score_BLK = reduce_from_region(
        attn._indexer_scores(qr_I, copy_to_region(k_I, attn.tp), w_I, slots_BLK, *rope_L), attn.tp)
    rows = (mass_BLK.masked_fill(slots_BLK < 0, 0.0).sum(-1) > 0).sum()
    total = seq.global_count(rows)
    share = rows.to(torch.float32) / total.clamp(min=1.0)
    loss = indexer_kl(score_BLK, mass_BLK, slots_BLK) * share
    if attn.recomputing:  # a recompute's re-run logs nothing (model/recompute.py)
        return loss
    attn.aux_log["indexer_loss"].append(loss.detach())
    if seq.attention_mode == "indexer_warmup":
        recall = indexer_recall(score_BLK.detach(), mass_BLK, slots_BLK, attn.indexer.topk)
        attn.aux_log["indexer_recall"].append(recall * share)
    return loss


def exchange_bytes(cfg, seq_len: int, cp: int, batch: int = 1, bytes_per_value: int = 4) -> dict[str, float]:
    """Bytes one CP rank moves per step (forward and backward) in the attention exchanges, and what ring
    attention (every rank's K and V passed around the ring: cp - 1 hops of a local [T / cp, C] K and V
    per layer, and the same for their gradients) would move for the same sequence.

    Halo: 2 local chunks x ``halo`` rows x dim, received in the forward and sent back in the backward;
    entries: all-gather of the compressed entries (main, and the indexer's keys for CSA) in the forward,
    all-reduce of their gradient (2 (cp-1)/cp of the buffer per rank, ring) in the backward.
    """
    if cp == 1:
        return {"cp_exchange": 0.0, "ring_attention": 0.0}
    total, ring = 0.0, 0.0
    chunk = seq_len // (2 * cp)
    for layer_idx in range(cfg.n_layers):
        ratio = cfg.compress_ratios[layer_idx]
        width = cfg.window - 1
        if ratio:
            width = max(width, (2 if ratio == 4 else 1) * ratio - 1)
        total += 2 * 2 * min(width, chunk) * cfg.dim            # halo rows in, gradients out
        if ratio:
            widths = cfg.head_dim + (cfg.index_head_dim if ratio == 4 else 0)
            n = seq_len // ratio
            total += (cp - 1) / cp * n * widths                  # all-gather
            total += 2 * (cp - 1) / cp * n * widths              # gradient all-reduce
        ring += 2 * (cp - 1) * (seq_len // cp) * cfg.head_dim * 2   # K and V (shared head: one C row each)
    return {"cp_exchange": total * batch * bytes_per_value, "ring_attention": ring * batch * bytes_per_value}
