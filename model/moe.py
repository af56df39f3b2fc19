"""DeepSeekMoE with sqrt-softplus routing, hash layers, aux-loss-free bias and clamped SwiGLU (spec 5.1, 5.2).

Forward of one MoE layer, split as Megatron's ``moe_layer.py`` (route / dispatch / experts / combine) so that
expert parallelism replaces only the middle piece (``parallel/expert_parallel.py``):

  route    ``Router``: s = sqrt(softplus(x e^T)) in fp32; indices = top-K(s + bias) for learned layers or
           ``tid2eid[token]`` for the first n_hash_layers; weights = s[indices] / sum * route_scale.
  experts  a ``RoutedExperts`` implementation: ``LocalExperts`` holds every expert in this process and
           runs a dropless loop over experts (permute, per-expert SwiGLU, un-permute with index_add).
  combine  routed output + shared expert (no clamp).

Balancing: the selection bias ``gate.bias`` (fp32 buffer, in the state dict, not trained by gradients)
moves by ``b_i += speed * sign(mean_load - load_i)`` in :func:`update_expert_bias`, from token counts
accumulated during training forwards. The sequence-wise balance loss (V3 formula, spec 5.2) enters the
backward through :class:`AuxLossInjector` attached to the MoE output. Hash layers have no bias and no
balance loss (their selection does not depend on the router), but their gate is trained through the weights.
For logging, every layer also counts its tokens per expert and its router entropy in training forwards
(:func:`pop_moe_stats`: dead experts, max load, entropy).

Shape letters: B batch, S sequence, T tokens (B*S), D model dim, E routed experts, K activated experts,
F expert hidden dim, V vocab.
"""

from __future__ import annotations

import zlib
from typing import NamedTuple, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from v4train.model.config import ModelConfig
from v4train.model.quant import qat_expert_weight
from v4train.parallel.expert_parallel import ExpertParallelExperts, local_expert_ids
from v4train.parallel.tensor_parallel import TensorParallel, column_linear, gather_tokens, row_linear, scatter_tokens

__all__ = [
    "Router", "RouterOutput", "SwiGLU", "RoutedExperts", "LocalExperts", "MoE", "AuxLossInjector",
    "build_hash_table", "sequence_balance_loss", "update_expert_bias", "pop_moe_stats", "discard_expert_counts",
    "RoutingTape", "set_routing_tape", "expert_parallel_experts",
]

_HASH_CHUNK_ROWS = 8192  # rows of the hash table drawn per call, bounds memory for a 129K vocab


class RouterOutput(NamedTuple):
    """weights ``[T, K]`` fp32 (route_scale included), indices ``[T, K]`` int64, scores ``[T, E]`` fp32."""

    weights: torch.Tensor
    indices: torch.Tensor
    scores: torch.Tensor


def build_hash_table(vocab_size: int, n_experts: int, k: int, layer_idx: int) -> torch.Tensor:
    """Token -> K distinct experts ``[V, K]`` int32 for hash layer ``layer_idx`` (spec 5.1).

    V4's hash function is undisclosed; this draws a uniformly random K-subset per token from a
    generator seeded by crc32 of the layer index, so every rank and layout builds the same table.
    """
    gen = torch.Generator().manual_seed(zlib.crc32(f"v4train/tid2eid/layer{layer_idx}".encode()))
    chunks = []
    for start in range(0, vocab_size, _HASH_CHUNK_ROWS):
        rows = min(_HASH_CHUNK_ROWS, vocab_size - start)
        chunks.append(torch.rand(rows, n_experts, generator=gen).argsort(dim=-1)[:, :k])
    return torch.cat(chunks).to(torch.int32)


class Router(nn.Module):
    """The gate of one MoE layer: ``weight [E, D]``; buffers ``bias [E]`` fp32 (learned layers) or
    ``tid2eid [V, K]`` int32 (hash layers); non-persistent ``expert_counts [E]`` int64."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.tape: RoutingTape | None = None  # anticipatory routing (spec 8.1), set by set_routing_tape
        self.routing_replay = None  # a model.recompute.RegionReplay while inside a recomputed region
        self.n_experts, self.k = cfg.n_routed_experts, cfg.n_activated_experts
        self.route_scale, self.bias_update_speed = cfg.route_scale, cfg.bias_update_speed
        self.is_hash = layer_idx < cfg.n_hash_layers
        self.weight = nn.Parameter(torch.zeros(cfg.n_routed_experts, cfg.dim, dtype=torch.float32))
        if self.is_hash:
            table = build_hash_table(cfg.vocab_size, cfg.n_routed_experts, cfg.n_activated_experts, layer_idx)
            self.register_buffer("tid2eid", table)
        else:
            self.register_buffer("bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
            self.register_buffer("expert_counts", torch.zeros(cfg.n_routed_experts, dtype=torch.int64),
                                 persistent=False)

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor) -> RouterOutput:
        """Route T tokens; token_ids_T (int64) is read only by hash layers. Inside a recomputed region
        (``routing_replay`` set, :mod:`model.recompute`) the re-run replays the first forward's indices."""
        scores_TE = F.softplus(x_TD.float() @ self.weight.float().t()).sqrt()

        def decide() -> torch.Tensor:
            return self._select(scores_TE, token_ids_T)

        indices_TK = decide() if self.routing_replay is None else self.routing_replay.indices(decide)
        weights_TK = scores_TE.gather(1, indices_TK)
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True) * self.route_scale
        return RouterOutput(weights_TK, indices_TK, scores_TE)

    def _select(self, scores_TE: torch.Tensor, token_ids_T: torch.Tensor) -> torch.Tensor:
        """The ``[T, K]`` int64 expert indices: hash table, anticipatory-routing tape, or biased top-k."""
        if self.is_hash:
            return self.tid2eid[token_ids_T].long()
        if self.tape is not None and self.tape.mode == "replay" and self.tape.recorded(self.layer_idx):
            # anticipatory routing: the indices were chosen earlier with older parameters; the weights
            # still come from the current scores (TK fix_routing_mask semantics); a tape restored from a
            # checkpoint holds them on the CPU
            return self.tape.pop(self.layer_idx, scores_TE.shape[0]).to(scores_TE.device)
        # the bias shifts the selection only; it never enters the weights
        indices_TK = (scores_TE.detach() + self.bias).topk(self.k, dim=-1).indices
        if self.tape is not None:
            self.tape.push(self.layer_idx, indices_TK)
        return indices_TK


class RoutingTape:
    """Per-layer FIFO of routed top-k indices for anticipatory routing (spec 8.1).

    In ``capture`` mode every learned router appends the indices it selects (one ``[T, K]`` int64 tensor
    per forward, i.e. per micro-batch); in ``replay`` mode it consumes them in the same order instead of
    selecting. Hash layers are not recorded (their routing does not depend on parameters).
    """

    def __init__(self, mode: str, indices: dict[int, list[torch.Tensor]] | None = None):
        if mode not in ("capture", "replay"):
            raise ValueError(f"RoutingTape mode {mode!r}: choose capture or replay")
        self.mode = mode
        self.indices: dict[int, list[torch.Tensor]] = indices if indices is not None else {}

    def recorded(self, layer: int) -> bool:
        """Whether the capture ran ``layer`` at all. A layer it did not run (the MTP block, which runs
        only in training forwards) routes normally during the replay."""
        return layer in self.indices

    def push(self, layer: int, indices_TK: torch.Tensor) -> None:
        self.indices.setdefault(layer, []).append(indices_TK.detach().clone())

    def pop(self, layer: int, tokens: int) -> torch.Tensor:
        """The next recorded ``[T, K]`` indices of ``layer``; raises RuntimeError on a missing or
        mismatched entry (a replay must see the same micro-batches as its capture)."""
        queue = self.indices.get(layer)
        if not queue:
            raise RuntimeError(f"anticipatory routing: no recorded indices left for layer {layer}")
        indices_TK = queue.pop(0)
        if indices_TK.shape[0] != tokens:
            raise RuntimeError(f"anticipatory routing: layer {layer} recorded {indices_TK.shape[0]} tokens, "
                               f"replay has {tokens}")
        return indices_TK


def set_routing_tape(stage: nn.Module, tape: RoutingTape | None) -> None:
    """Attach ``tape`` to every learned router of ``stage`` (None: route normally)."""
    for module in stage.modules():
        if isinstance(module, Router) and not module.is_hash:
            module.tape = tape


class SwiGLU(nn.Module):
    """Expert FFN ``w2(silu(w1 x) * w3 x)`` : ``[..., D] -> [..., D]``, computed in fp32 (OC ``Expert``).

    With ``limit > 0`` (routed experts) the gate is clamped above at limit and the up projection to
    [-limit, limit], so the gradient is zero where clamped (spec 8.2). ``weight_T1`` (the routing weight)
    multiplies the activation before w2 (spec 0.1 item 11). With an active ``tp`` (the shared expert) the
    hidden units are split over the TP ranks (w1, w3 column-parallel, w2 row-parallel; the input must be
    ``[B, S, D]``, Megatron's layers are 3-D), exact because SwiGLU is elementwise in the hidden units.
    """

    def __init__(self, dim: int, inter_dim: int, limit: float, tp: TensorParallel = TensorParallel(),
                 qat: bool = False):
        super().__init__()
        self.limit, self.qat = limit, qat
        self.w1 = column_linear(dim, inter_dim, tp, what="n_shared_experts*moe_inter_dim")
        self.w2 = row_linear(inter_dim, dim, tp, what="n_shared_experts*moe_inter_dim")
        self.w3 = column_linear(dim, inter_dim, tp, what="n_shared_experts*moe_inter_dim")

    def forward(self, x_TD: torch.Tensor, weight_T1: torch.Tensor | None = None) -> torch.Tensor:
        gate_TF, up_TF = self._project(self.w1, x_TD).float(), self._project(self.w3, x_TD).float()
        if self.limit > 0:
            gate_TF = gate_TF.clamp(max=self.limit)
            up_TF = up_TF.clamp(-self.limit, self.limit)
        h_TF = F.silu(gate_TF) * up_TF
        if weight_T1 is not None:
            h_TF = h_TF * weight_T1
        return self._project(self.w2, h_TF.to(x_TD.dtype))

    def _project(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """``layer(x)``; under QAT the routed experts compute with their FP4 -> FP8 weights (model/quant.py)."""
        return F.linear(x, qat_expert_weight(layer.weight)) if self.qat else layer(x)


class RoutedExperts(Protocol):
    """What the MoE layer needs from its routed experts: ``sum_k weights[t, k] E_{indices[t, k]}(x_t)``.

    ``LocalExperts`` runs every expert in-process; an expert-parallel version dispatches tokens to the
    ranks owning their experts and combines the results, with the same signature.
    """

    def __call__(self, x_TD: torch.Tensor, weights_TK: torch.Tensor, indices_TK: torch.Tensor) -> torch.Tensor: ...


class LocalExperts(nn.Module):
    """All routed experts of a layer in one process, keyed by global expert id ("0".."E-1") so the
    state-dict names survive an expert-parallel split. Dropless: no capacity, no token is skipped."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.k = cfg.n_activated_experts
        self.experts = nn.ModuleDict({
            str(e): SwiGLU(cfg.dim, cfg.moe_inter_dim, cfg.swiglu_limit, qat=cfg.qat)
            for e in range(cfg.n_routed_experts)
        })

    def forward(self, x_TD: torch.Tensor, weights_TK: torch.Tensor, indices_TK: torch.Tensor) -> torch.Tensor:
        # permute: group the T*K (token, expert) pairs by expert; a stable sort keeps token order
        flat_expert = indices_TK.flatten()
        order = flat_expert.argsort(stable=True)
        token_of_pair = order // self.k
        counts = torch.bincount(flat_expert, minlength=len(self.experts)).tolist()
        x_pairs = x_TD.index_select(0, token_of_pair)
        w_pairs = weights_TK.flatten().index_select(0, order).unsqueeze(-1)
        # experts: one call per expert on its contiguous slice (the only Python loop). Experts with no
        # token still run on an empty slice so every parameter gets a (zero) gradient on every rank and
        # data-parallel gradient buckets line up.
        y_pairs = torch.cat([
            self.experts[str(e)](x_chunk, w_chunk)
            for e, (x_chunk, w_chunk) in enumerate(zip(x_pairs.split(counts), w_pairs.split(counts)))
        ])
        # un-permute: sum each token's K weighted expert outputs, in fp32 (spec 0.1 item 8)
        sum_TD = torch.zeros_like(x_TD, dtype=torch.float32).index_add_(0, token_of_pair, y_pairs.float())
        return sum_TD.to(x_TD.dtype)


def expert_parallel_experts(cfg: ModelConfig, *, ep_group: dist.ProcessGroup | None, ep_rank: int,
                            ep_size: int) -> ExpertParallelExperts:
    """This EP rank's E/ep routed experts (clamped SwiGLU, global ids as keys) behind the all-to-all
    dispatch of :class:`parallel.expert_parallel.ExpertParallelExperts`; ValueError naming ``ep`` when
    ep_size does not divide n_routed_experts."""
    ids = local_expert_ids(cfg.n_routed_experts, ep_rank, ep_size)
    experts = nn.ModuleDict({str(e): SwiGLU(cfg.dim, cfg.moe_inter_dim, cfg.swiglu_limit, qat=cfg.qat) for e in ids})
    return ExpertParallelExperts(experts, n_experts=cfg.n_routed_experts, k=cfg.n_activated_experts,
                                 ep_group=ep_group, ep_rank=ep_rank, ep_size=ep_size)


class AuxLossInjector(torch.autograd.Function):
    """Identity on ``output`` whose backward also sends ``scale`` as d(loss)/d(aux_loss).

    So the auxiliary loss trains the router without being added to the returned loss (Megatron's
    ``MoEAuxLossAutoScaler``). ``scale`` is the caller's ``aux_loss_scale`` (1/num_microbatches).
    """

    @staticmethod
    def forward(ctx, output: torch.Tensor, aux_loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(aux_loss)
        ctx.scale = scale
        return output.view_as(output)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (aux_loss,) = ctx.saved_tensors
        return grad_output, torch.full_like(aux_loss, ctx.scale), None


def sequence_balance_loss(scores_BSE: torch.Tensor, indices_BSK: torch.Tensor, cp=None) -> torch.Tensor:
    """Sequence-wise balance loss ``sum_i f_i P_i`` averaged over the B sequences (spec 5.2, V3 formula).

    f_i = E/(K S) * #tokens of the sequence selecting i (no gradient); P_i = mean_t s_{i,t} / sum_j s_{j,t}.
    A perfectly balanced router gives 1. Unweighted (the caller multiplies by balance_loss_weight).
    Under context parallelism (``cp``, a :class:`parallel.context_parallel.ContextParallel`; S is this
    rank's share of each sequence) the counts are summed over the CP ranks and P_i is this rank's part of
    the whole sequence's mean, so the ranks' losses add up to the whole sequences' loss.
    """
    B, S, E = scores_BSE.shape
    K = indices_BSK.shape[-1]
    selected_BE = torch.zeros(B, E, dtype=scores_BSE.dtype, device=scores_BSE.device)
    flat_indices = indices_BSK.reshape(B, S * K)
    selected_BE.scatter_add_(1, flat_indices, torch.ones_like(flat_indices, dtype=scores_BSE.dtype))
    p_BE = (scores_BSE / scores_BSE.sum(dim=-1, keepdim=True)).mean(dim=1)
    if cp is not None and cp.active:
        dist.all_reduce(selected_BE, group=cp.group)
        S, p_BE = S * cp.size, p_BE / cp.size
    f_BE = selected_BE * (E / (K * S))
    return (f_BE * p_BE).sum(dim=-1).mean()


class MoE(nn.Module):
    """One MoE FFN: ``gate`` (Router), ``experts`` (LocalExperts), ``shared_experts`` (unclamped SwiGLU
    of width n_shared_experts * moe_inter_dim, absent when 0). ``[B, S, D] -> [B, S, D]``.

    Tensor parallelism: the router runs on every token on every TP rank (replicated: the sequence-wise
    balance loss and the expert counts need whole sequences); the routed experts see this rank's 1/tp of
    the tokens (:func:`parallel.tensor_parallel.scatter_tokens`, Megatron's sequence-parallel region
    around the experts only) and the results are gathered back; the shared expert splits its hidden
    units. ``experts`` defaults to :class:`LocalExperts`; the trainer passes an expert-parallel one.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int, tp: TensorParallel = TensorParallel(),
                 experts: RoutedExperts | None = None):
        super().__init__()
        self.tp = tp
        self.balance_loss_weight = cfg.balance_loss_weight
        self.gate = Router(cfg, layer_idx)
        self.experts: RoutedExperts = experts if experts is not None else LocalExperts(cfg)
        self.shared_experts = (
            SwiGLU(cfg.dim, cfg.n_shared_experts * cfg.moe_inter_dim, limit=0.0, tp=tp)
            if cfg.n_shared_experts else None
        )
        self.aux_log: list[torch.Tensor] = []  # detached weighted balance losses, drained by V4Stage
        # logging only (pop_moe_stats): tokens per expert and mean router entropy of training forwards
        self.register_buffer("load_counts", torch.zeros(cfg.n_routed_experts, dtype=torch.int64), persistent=False)
        self.entropy_log: list[torch.Tensor] = []
        self.recomputing = False  # True during a recompute's re-run (model/recompute.py): log nothing

    def forward(self, x_BSD: torch.Tensor, token_ids_BS: torch.Tensor, aux_loss_scale: float = 1.0,
                cp=None) -> torch.Tensor:
        """x_BSD: the ffn_norm output; token_ids_BS: int64 input ids (hash routing).

        In a training forward (``self.training`` and grad enabled) of a learned layer, adds the token
        counts to ``gate.expert_counts`` and attaches the balance loss scaled by ``aux_loss_scale``
        (over whole sequences split across the context-parallel ranks ``cp``, when given).
        """
        B, S, D = x_BSD.shape
        x_TD = x_BSD.reshape(B * S, D)
        route = self.gate(x_TD, token_ids_BS.reshape(-1))
        rows = slice(None)
        if self.tp.active:
            n = self.tp.split(B * S, "tokens per micro-batch (micro_batch_size x seq_len)")
            rows = slice(self.tp.rank * n, (self.tp.rank + 1) * n)
        y_TD = gather_tokens(self.experts(scatter_tokens(x_TD, self.tp), scatter_tokens(route.weights, self.tp),
                                          route.indices[rows]), self.tp)
        y_BSD = y_TD.view(B, S, D)
        if self.shared_experts is not None:  # the routed and shared outputs add in fp32 (spec 0.1 item 8)
            y_BSD = (y_BSD.float() + self.shared_experts(x_BSD).float()).to(x_BSD.dtype)
        if self.training and torch.is_grad_enabled() and not self.recomputing:
            self._log_routing(route)
        if self.training and torch.is_grad_enabled() and not self.gate.is_hash:
            if self.balance_loss_weight > 0:
                aux = self.balance_loss_weight * sequence_balance_loss(
                    route.scores.view(B, S, -1), route.indices.view(B, S, -1), cp)
                if not self.recomputing:
                    self.aux_log.append(aux.detach())
                y_BSD = AuxLossInjector.apply(y_BSD, aux, aux_loss_scale)
        return y_BSD

    @torch.no_grad()
    def _log_routing(self, route: RouterOutput) -> None:
        counts_E = torch.bincount(route.indices.flatten(), minlength=self.gate.n_experts)
        if not self.gate.is_hash:
            self.gate.expert_counts += counts_E
        self.load_counts += counts_E
        p_TE = route.scores / route.scores.sum(dim=-1, keepdim=True)
        self.entropy_log.append(-(p_TE * p_TE.clamp(min=1e-30).log()).sum(dim=-1).mean())


def pop_moe_stats(stage: nn.Module, *, per_layer: bool = False) -> dict[str, float]:
    """Routing statistics of the training forwards since the last call, over every MoE layer of ``stage``
    (hash layers included), then cleared. Local to this rank (not reduced over data parallelism).

    ``moe_dead_experts``: experts that received no token, summed over layers; ``moe_max_load``: the
    largest max_i load_i / mean_load over layers (1 = perfect balance); ``moe_router_entropy``: the mean
    over layers and tokens of the entropy (nats) of the normalised router scores s_i / sum_j s_j
    (ln E = uniform). With ``per_layer`` also ``moe_dead_experts/<layer>`` and ``moe_max_load/<layer>``,
    keyed by the module name. Empty when no training forward ran.
    """
    out: dict[str, float] = {}
    dead, max_load, entropy = [], [], []
    for name, module in stage.named_modules():
        if not isinstance(module, MoE) or not module.entropy_log:
            continue
        load_E = module.load_counts.to(torch.float32)
        dead.append(int((module.load_counts == 0).sum()))
        max_load.append(float(load_E.max() / load_E.mean().clamp(min=1e-30)))
        entropy.append(float(torch.stack(module.entropy_log).mean()))
        if per_layer:
            out[f"moe_dead_experts/{name}"] = float(dead[-1])
            out[f"moe_max_load/{name}"] = max_load[-1]
        module.load_counts.zero_()
        module.entropy_log.clear()
    if not dead:
        return {}
    out.update(moe_dead_experts=float(sum(dead)), moe_max_load=max(max_load),
               moe_router_entropy=sum(entropy) / len(entropy))
    return out


def update_expert_bias(stage: nn.Module, group: dist.ProcessGroup | None) -> dict[str, float]:
    """Aux-loss-free balancing step for every learned router in ``stage`` (spec 5.2).

    Sums the counts over ``group`` (one all-reduce of all layers together; skipped when group is None
    or torch.distributed is not initialised), applies ``b_i += speed * sign(mean_load - load_i)`` and
    zeroes the counts. Returns ``{"moe_max_violation": mean over layers of max_i load_i / mean_load - 1}``
    (empty when the stage has no learned router or no token was counted).
    """
    routers = [m for m in stage.modules() if isinstance(m, Router) and not m.is_hash]
    if not routers:
        return {}
    counts_LE = torch.stack([r.expert_counts for r in routers])
    if group is not None and dist.is_available() and dist.is_initialized():
        dist.all_reduce(counts_LE, op=dist.ReduceOp.SUM, group=group)
    load_LE = counts_LE.to(torch.float32)
    mean_L1 = load_LE.mean(dim=-1, keepdim=True)
    with torch.no_grad():
        for router, load_E, mean_1 in zip(routers, load_LE, mean_L1):
            router.bias += router.bias_update_speed * torch.sign(mean_1 - load_E)
            router.expert_counts.zero_()
    counted = mean_L1.squeeze(-1) > 0
    if not counted.any():
        return {}
    violation = load_LE[counted].amax(dim=-1) / mean_L1[counted].squeeze(-1) - 1
    return {"moe_max_violation": float(violation.mean())}


def discard_expert_counts(stage: nn.Module) -> None:
    """Zero the per-expert token counts of every router in ``stage`` without touching the biases.

    Used when an optimizer step is skipped (a non-finite gradient): that step's routing must not move the
    aux-loss-free balancing bias.
    """
    for router in stage.modules():
        if isinstance(router, Router) and not router.is_hash:
            router.expert_counts.zero_()
