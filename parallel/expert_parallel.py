"""Expert parallelism: the routed experts of one MoE layer spread over the ranks of an EP group.

:class:`ExpertParallelExperts` implements the ``RoutedExperts`` protocol of :mod:`model.moe` with the
same math and dropless semantics as ``LocalExperts`` (no capacity, no token is dropped or padded), but
rank ``r`` of ``ep`` holds only the experts ``[r*E/ep, (r+1)*E/ep)``. Tokens travel to the rank owning
their expert and back with variable-size all-to-alls. Flow of Megatron-core 0.16.1's
``MoEAlltoAllTokenDispatcher`` (``megatron/core/transformer/moe/token_dispatcher.py``: preprocess,
dispatch_preprocess, token_dispatch, dispatch_postprocess, token_combine, combine_postprocess) and the
expert parallelism of the DeepSeek-V3 technical report (section 3.2: 64-way EP over 8 nodes; 3.2.2: the
cross-node all-to-all dispatch and combine). One difference: Megatron's ``preprocess`` all-gathers every rank's ``[E]``
counts over the TP*EP group; here the counts go through one all-to-all (each rank receives only what it
needs) and the global load, a metric, through a separate ``[L]`` all-gather.

Shape letters: T tokens on this rank, K activated experts per token, D model dim, E routed experts,
L = E/ep local experts, P = T*K (token, expert) pairs sent by this rank, R rows received by this rank.

One forward, in order (every step runs on every rank of the EP group, so the collectives match):

1. permute: the P pairs are stably sorted by global expert id; since expert ``e`` lives on rank
   ``e // L``, this also groups them by destination rank, then by local expert.
2. count exchange (non-differentiable): one ``all_to_all_single`` of the int64 counts ``[ep*L]``;
   afterwards each rank knows ``recv[s, l]`` = rows source rank ``s`` sends to its local expert ``l``.
   The input split sizes (rows per destination) and output split sizes (rows per source) follow;
   they are variable and may be zero.
3. dispatch (differentiable): all-to-all of the token rows ``[P, D]`` and of their routing weights
   ``[P]`` (fp32) with those splits; ``R`` rows arrive grouped by source rank, then local expert.
4. load metric: one ``all_gather_single`` of the local per-expert row counts ``[L]`` gives the
   global tokens-per-expert ``[E]`` (:meth:`ExpertParallelExperts.last_load`).
5. experts: the received rows are re-sorted expert-major (stable: source order kept within an expert);
   each local expert runs once on its contiguous slice, also on an empty one; the routing weight
   multiplies inside the expert, before w2 (``SwiGLU``).
6. combine (differentiable): the inverse re-sort, then the reverse all-to-all (splits swapped) brings
   the ``[P, D]`` outputs home, and ``index_add`` sums each token's K contributions as LocalExperts does.

Differentiable exchanges use ``torch.distributed.nn.functional.all_to_all_single`` (its backward is the
reverse all-to-all; torch marks it deprecated with a FutureWarning in favour of the functional
collectives). Megatron-core's ``tensor_parallel.mappings.all_to_all`` was tried first: on a CPU/gloo
host it fails even with Python-list splits, because its unequal-split branch allocates the output with
``device=torch.cuda.current_device()`` (mappings.py:442 in megatron-core 0.16.1: "Torch not compiled
with CUDA enabled"), which ``parallel.megatron_compat`` does not patch.

Gradients: the backward all-to-alls carry every token's gradient to the rank owning its expert, so after
``backward()`` each rank's expert parameters hold the gradient of ALL tokens of the EP group routed to
them (as ``LocalExperts`` would over the EP group's concatenated tokens). The ranks that hold the same
experts form the expert-data-parallel group (size tp*dp/ep with expert-tensor-parallel 1); the trainer
then SUMS expert gradients over that group and scales them like the dense gradients (1/dp for a
per-rank mean loss, Megatron DDP's ``expert_gradient_scaling_factor``), whereas dense parameters are
averaged over the data-parallel group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn


__all__ = ["ExpertParallelExperts", "local_expert_ids"]


def local_expert_ids(n_experts: int, ep_rank: int, ep_size: int) -> range:
    """Global ids of the experts EP rank ``ep_rank`` of ``ep_size`` holds: a contiguous block of E/ep.
    Raises ValueError naming ``ep`` when ep_size < 1 or does not divide n_experts."""
    if ep_size < 1 or n_experts % ep_size:
        raise ValueError(f"ExpertParallelExperts: ep={ep_size} must be >= 1 and divide n_routed_experts="
                         f"{n_experts}; choose ep among the divisors of {n_experts}")
    n_local = n_experts // ep_size
    return range(ep_rank * n_local, (ep_rank + 1) * n_local)


class ExpertParallelExperts(nn.Module):
    """This rank's share of the routed experts of one MoE layer, with all-to-all token dispatch.

    ``forward(x_TD, weights_TK, indices_TK) -> y_TD`` computes ``sum_k weights[t, k] E_{indices[t, k]}(x_t)``
    exactly like ``LocalExperts`` (the module docstring gives the exchange order). Every rank of the EP
    group must call ``forward`` (and ``backward``) the same number of times, also with T = 0 tokens.

    Attributes:
        experts: the ``nn.ModuleDict`` of the L local experts keyed by GLOBAL expert id, so
            ``experts.5.w1.weight`` has the same state-dict name in every layout (and in ``LocalExperts``)
            and a checkpoint reshards by name.
        local_experts: ``range`` of the global ids held here, ``[ep_rank*L, (ep_rank+1)*L)``.

    Args:
        experts: the local experts, built by the model (``parallel/`` never imports ``model/``): a
            ModuleDict keyed ``str(e)`` for e in :func:`local_expert_ids`, each called as
            ``expert(x [N, D], weight [N, 1]) -> [N, D]`` with the routing weight applied inside.
        n_experts: E, the routed experts of the layer; ``k``: K, activated experts per token.
        ep_group: the expert-parallel process group (size ``ep_size``); None only with ``ep_size == 1``,
            where nothing is exchanged.
        ep_rank: this rank's index in ``ep_group``.
        ep_size: the expert-parallel size ep.
    Raises:
        ValueError: naming ``ep`` when ep_size < 1, ep_size does not divide E, ep_rank is outside
            [0, ep_size), ep_group is None with ep_size > 1, or ep_group's size or this process's rank
            in it disagree with ep_size / ep_rank; naming ``experts`` when its keys are not this rank's ids.
    """

    def __init__(self, experts: nn.ModuleDict, *, n_experts: int, k: int, ep_group: dist.ProcessGroup | None,
                 ep_rank: int, ep_size: int):
        super().__init__()
        if ep_size < 1 or n_experts % ep_size:
            raise ValueError(f"ExpertParallelExperts: ep={ep_size} must be >= 1 and divide n_routed_experts="
                             f"{n_experts}; choose ep among the divisors of {n_experts}")
        if not 0 <= ep_rank < ep_size:
            raise ValueError(f"ExpertParallelExperts: ep_rank={ep_rank} is outside [0, ep={ep_size})")
        if ep_group is None and ep_size > 1:
            raise ValueError(f"ExpertParallelExperts: ep={ep_size} > 1 needs an ep_group")
        if ep_group is not None and (dist.get_world_size(ep_group), dist.get_rank(ep_group)) != (ep_size, ep_rank):
            raise ValueError(f"ExpertParallelExperts: ep_group has size {dist.get_world_size(ep_group)} and this "
                             f"process is its rank {dist.get_rank(ep_group)}, but ep={ep_size}, "
                             f"ep_rank={ep_rank} were given")
        self.k = k
        self.n_experts = n_experts
        self.ep_group, self.ep_rank, self.ep_size = ep_group, ep_rank, ep_size
        self.n_local = n_experts // ep_size
        self.local_experts = local_expert_ids(n_experts, ep_rank, ep_size)
        if list(experts.keys()) != [str(e) for e in self.local_experts]:
            raise ValueError(f"ExpertParallelExperts: experts are keyed {list(experts.keys())}, EP rank {ep_rank} "
                             f"of {ep_size} holds experts {list(self.local_experts)}")
        self.experts = experts
        # non-persistent: a metric, not state; moves with .to(device) like the parameters
        self.register_buffer("_load_E", torch.zeros(n_experts, dtype=torch.int64), persistent=False)

    def last_load(self) -> torch.Tensor:
        """Global tokens per expert of the last forward: ``[E]`` int64, (token, expert) pairs routed to
        each expert summed over every rank of the EP group (identical on all of them); zeros before the
        first forward. Local, no collective (the all-gather ran in ``forward``)."""
        return self._load_E.clone()

    def forward(self, x_TD: torch.Tensor, weights_TK: torch.Tensor, indices_TK: torch.Tensor) -> torch.Tensor:
        """Routed-expert output ``[T, D]`` (dtype of x) for ``x_TD [T, D]``, ``weights_TK [T, K]`` (fp32
        routing weights, route_scale included) and ``indices_TK [T, K]`` int64 global expert ids in [0, E).

        Collective over the EP group (count all-to-all, load all-gather, two dispatch and one combine
        all-to-all; their backward runs the reverse all-to-alls). Whether x and the weights require
        grad must agree across the group: a dispatch all-to-all has a backward only for an input that
        needs a gradient. Raises whatever torch.distributed raises on a failed or timed-out collective.
        """
        ep, n_local = self.ep_size, self.n_local
        # 1. permute: group the P = T*K pairs by expert, hence by destination rank; stable keeps token order
        flat_expert = indices_TK.flatten()
        order_P = flat_expert.argsort(stable=True)
        token_of_pair_P = order_P // self.k
        x_PD = x_TD.index_select(0, token_of_pair_P)
        w_P = weights_TK.flatten().index_select(0, order_P)
        # 2. counts first: the row splits of the token exchange are not known before it
        send_counts = torch.bincount(flat_expert, minlength=self.n_experts)
        recv_counts = self._exchange_counts(send_counts)
        input_splits = send_counts.view(ep, n_local).sum(dim=1).tolist()
        output_splits = recv_counts.view(ep, n_local).sum(dim=1).tolist()
        # 3. dispatch rows and weights (R rows arrive source-major, then local expert)
        x_RD = self._all_to_all(x_PD, output_splits, input_splits)
        w_R = self._all_to_all(w_P, output_splits, input_splits)
        # 4. load metric
        rows_per_local_expert = recv_counts.view(ep, n_local).sum(dim=0)
        self._gather_load(rows_per_local_expert)
        # 5. experts: re-sort expert-major so each local expert sees one contiguous slice
        local_expert_R = torch.arange(n_local, device=x_TD.device).repeat(ep).repeat_interleave(recv_counts)
        sort_R = local_expert_R.argsort(stable=True)
        x_sorted_RD = x_RD.index_select(0, sort_R)
        w_sorted_R1 = w_R.index_select(0, sort_R).unsqueeze(-1)
        counts = rows_per_local_expert.tolist()
        # Experts with no row still run on an empty slice so every parameter gets a (zero) gradient on
        # every rank and the expert-data-parallel gradient buckets line up (as in LocalExperts).
        y_sorted_RD = torch.cat([
            self.experts[str(e)](x_chunk, w_chunk)
            for e, x_chunk, w_chunk in zip(self.local_experts, x_sorted_RD.split(counts), w_sorted_R1.split(counts))
        ])
        # 6. combine: undo the re-sort, send the rows home (splits swapped), sum each token's K outputs
        unsort_R = torch.empty_like(sort_R)
        unsort_R[sort_R] = torch.arange(sort_R.numel(), device=sort_R.device)
        y_PD = self._all_to_all(y_sorted_RD.index_select(0, unsort_R), input_splits, output_splits)
        return torch.zeros_like(x_TD).index_add_(0, token_of_pair_P, y_PD.to(x_TD.dtype))

    def _exchange_counts(self, send_counts_E: torch.Tensor) -> torch.Tensor:
        """``[ep*L]`` int64 rows this rank sends to each global expert -> ``[ep*L]`` rows each source rank
        sends to each local expert (index ``s*L + l``). Equal splits of L: one all_to_all_single."""
        if self.ep_size == 1:
            return send_counts_E
        recv_counts = torch.empty_like(send_counts_E)
        dist.all_to_all_single(recv_counts, send_counts_E, group=self.ep_group)
        return recv_counts

    def _all_to_all(self, rows: torch.Tensor, output_splits: list[int], input_splits: list[int]) -> torch.Tensor:
        """Differentiable variable-split all-to-all along dim 0 (``rows [N, ...]`` -> ``[sum(output_splits), ...]``);
        its backward is the all-to-all with the splits swapped."""
        if self.ep_size == 1:
            return rows
        out = rows.new_empty((sum(output_splits), *rows.shape[1:]))
        return dist_fn.all_to_all_single(out, rows.contiguous(), output_splits, input_splits, group=self.ep_group)

    @torch.no_grad()
    def _gather_load(self, rows_per_local_expert_L: torch.Tensor) -> None:
        """Store the global ``[E]`` load: rank r's ``[L]`` counts fill ids ``[r*L, (r+1)*L)``."""
        if self.ep_size == 1:
            self._load_E.copy_(rows_per_local_expert_L)
        else:
            dist.all_gather_single(self._load_E, rows_per_local_expert_L.contiguous(), group=self.ep_group)
