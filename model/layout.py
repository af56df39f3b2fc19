"""Who may attend to what: packed-document segments, window indices and compressed-block layouts.

Every visibility rule of the attention path lives here (spec 3.2, 3.5, 3.6; contracts of ``model/``):

* **Segments (documents).** Token t starts a new segment iff t = 0 or pos[t] - pos[t-1] != 1, where
  ``pos`` are the position ids (the loader restarts them at 0 at each document start). For such
  well-formed ids this is the contract's rule "key j is visible to query t iff
  pos[t] - pos[j] == t - j". A token's *local* index is t - (start of its segment).
* **Window (SWA).** Key j is visible to query t iff t - window < j <= t and j is in t's segment.
* **Compressed entries (spec 0.1 item 12, our choice).** Each segment is compressed on its own:
  blocks of ``ratio`` tokens aligned to the segment start, a trailing remainder shorter than ``ratio``
  dropped (those tokens stay reachable through the window). Entry j of a segment (local block index)
  is visible to query t of the same segment iff (j+1)*ratio <= local(t)+1, OC's rule
  (``get_compress_topk_idxs``), i.e. the block is complete including token t. Entries of other
  segments are never visible. The CSA overlap series of entry j reads block j-1 of the *same*
  segment; for j = 0 it is padded (score -inf, value 0), as OC pads the first block. Each entry's
  RoPE position is the position id of its first token, so RoPE positions restart per document too.

Entries are stored per batch row in ``N = T // ratio`` slots in token order (a row never has more);
unused slots (rows holding several documents) sit at the end and are never visible. Because a
segment's visible entries are a prefix of its own entries, the entries visible to query t form one
contiguous slot range ``[lo[t], hi[t])``. Nothing here is ``[T, T]``.

Shape letters: B batch, T tokens, W window slots, N compressed slots, M tokens per block, K entries.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["segment_bounds", "window_indices", "CompressedLayout", "compressed_layout", "SequenceContext",
           "ATTENTION_MODES"]

ATTENTION_MODES = ("dense", "sparse", "indexer_warmup")


def segment_bounds(position_ids_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(start_BT, end_BT)``: first token index and one-past-last token index of each token's segment."""
    B, T = position_ids_BT.shape
    device = position_ids_BT.device
    new_BT = torch.ones(B, T, dtype=torch.bool, device=device)
    new_BT[:, 1:] = (position_ids_BT[:, 1:] - position_ids_BT[:, :-1]) != 1
    t_BT = torch.arange(T, device=device).expand(B, T)
    start_BT = torch.where(new_BT, t_BT, 0).cummax(dim=1).values
    last_BT = torch.ones(B, T, dtype=torch.bool, device=device)  # token t ends its segment
    last_BT[:, :-1] = new_BT[:, 1:]
    end_BT = torch.where(last_BT, t_BT + 1, T).flip(1).cummin(dim=1).values.flip(1)
    return start_BT, end_BT


def window_indices(seg_start_BT: torch.Tensor, window: int) -> torch.Tensor:
    """``[B, T, W]`` int32 key indices of each query's window (W = min(window, T)), -1 where not visible.

    Slot w of query t holds key t - (W-1) + w, so the query itself is the last slot.
    """
    B, T = seg_start_BT.shape
    W = min(window, T)
    t_T1 = torch.arange(T, device=seg_start_BT.device).unsqueeze(1)
    key_TW = t_T1 - (W - 1) + torch.arange(W, device=seg_start_BT.device)
    key_BTW = key_TW.expand(B, T, W)
    return torch.where(key_BTW >= seg_start_BT.unsqueeze(-1), key_BTW, -1).to(torch.int32)


@dataclass
class CompressedLayout:
    """Compressed-entry slots of one ratio for a batch (see the module docstring).

    starts_BN: first token of each entry (T for an unused slot); has_prev_BN: the entry's block has a
    predecessor block in its segment (CSA overlap); positions_BN: RoPE position of each entry (position
    id of its first token, 0 for unused slots); lo_BT, hi_BT: the slot range visible to each query.
    """

    ratio: int
    starts_BN: torch.Tensor
    valid_BN: torch.Tensor
    has_prev_BN: torch.Tensor
    positions_BN: torch.Tensor
    lo_BT: torch.Tensor
    hi_BT: torch.Tensor
    _dense: torch.Tensor | None = field(default=None, repr=False)

    @property
    def n_slots(self) -> int:
        return self.starts_BN.shape[1]

    def dense_indices(self) -> torch.Tensor:
        """``[B, T, K]`` int32 slot indices of *every* visible entry per query (-1 padded), with
        K = the widest visible range in the batch (0 when nothing is visible). Cached."""
        if self._dense is None:
            width = int((self.hi_BT - self.lo_BT).max()) if self.lo_BT.numel() else 0
            lo_BT1, hi_BT1 = self.lo_BT.to(torch.int32).unsqueeze(-1), self.hi_BT.to(torch.int32).unsqueeze(-1)
            slot_BTK = lo_BT1 + torch.arange(width, dtype=torch.int32, device=self.lo_BT.device)
            self._dense = slot_BTK.masked_fill_(slot_BTK >= hi_BT1, -1)
        return self._dense


def compressed_layout(position_ids_BT: torch.Tensor, seg_start_BT: torch.Tensor, seg_end_BT: torch.Tensor,
                      ratio: int) -> CompressedLayout:
    """The per-document block layout of ``ratio`` for a batch (module docstring, "Compressed entries")."""
    B, T = position_ids_BT.shape
    device = position_ids_BT.device
    t_BT = torch.arange(T, device=device).expand(B, T)
    local_BT = t_BT - seg_start_BT
    is_start_BT = (local_BT % ratio == 0) & (t_BT + ratio <= seg_end_BT)
    N = T // ratio
    # slot of each block start = its rank among the row's block starts; others go to a dump column
    slot_BT = torch.where(is_start_BT, is_start_BT.long().cumsum(1) - 1, N)
    starts_BN = torch.full((B, N + 1), T, dtype=torch.long, device=device)
    starts_BN.scatter_(1, slot_BT, torch.where(is_start_BT, t_BT, T))
    starts_BN = starts_BN[:, :N].contiguous()
    valid_BN = starts_BN < T
    first_BN = starts_BN.clamp(max=T - 1)
    has_prev_BN = valid_BN & (local_BT.gather(1, first_BN) >= ratio)
    positions_BN = torch.where(valid_BN, position_ids_BT.gather(1, first_BN), 0)
    if N == 0:
        lo_BT = hi_BT = torch.zeros(B, T, dtype=torch.long, device=device)
    else:
        lo_BT = torch.searchsorted(starts_BN, seg_start_BT.contiguous(), right=False)
        hi_BT = torch.searchsorted(starts_BN, (t_BT - ratio + 1).contiguous(), right=True)
        hi_BT = torch.maximum(hi_BT, lo_BT)
    return CompressedLayout(ratio, starts_BN, valid_BN, has_prev_BN, positions_BN, lo_BT, hi_BT)


class SequenceContext:
    """Per-forward inputs shared by every block of a stage, with the layouts computed once and cached.

    position_ids / input_ids ``[B, T]`` int64; ``attention_mode`` one of ATTENTION_MODES (required:
    there is no default mode, ValueError otherwise); ``context_parallel``: under context parallelism
    the sequence's :class:`parallel.context_parallel.CPSequence` (the attention layers then run its
    exchanges; position_ids / input_ids are this rank's tokens), else None;
    ``aux_loss_scale`` the gradient scale of injected auxiliary losses (1/num_microbatches).
    """

    def __init__(self, position_ids_BT: torch.Tensor, input_ids_BT: torch.Tensor, *,
                 attention_mode: str, aux_loss_scale: float = 1.0):
        if attention_mode not in ATTENTION_MODES:
            raise ValueError(f"attention_mode {attention_mode!r}: choose one of {', '.join(ATTENTION_MODES)}")
        self.position_ids, self.input_ids = position_ids_BT, input_ids_BT
        self.attention_mode, self.aux_loss_scale = attention_mode, aux_loss_scale
        self.context_parallel = None
        self.seg_start, self.seg_end = segment_bounds(position_ids_BT)
        self._windows: dict[int, torch.Tensor] = {}
        self._layouts: dict[int, CompressedLayout] = {}

    def window_indices(self, window: int) -> torch.Tensor:
        if window not in self._windows:
            self._windows[window] = window_indices(self.seg_start, window)
        return self._windows[window]

    def layout(self, ratio: int) -> CompressedLayout:
        if ratio not in self._layouts:
            self._layouts[ratio] = compressed_layout(self.position_ids, self.seg_start, self.seg_end, ratio)
        return self._layouts[ratio]
