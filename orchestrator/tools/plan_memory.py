"""The planner's model of one rank's parameters and activations (the terms are those of
:mod:`orchestrator.tools.plan`'s docstring): exact parameter counts from the real modules on the meta
device, and per-token activation element counts fitted to autograd's saved tensors.
"""

from __future__ import annotations

import functools

__all__ = ["stage_parameters", "stage_fp32_parameters", "activation_elements",
           "mhc_elements", "cp_buffer_elements", "head_elements",
           "head_weight_elements"]


# ------------------------------------------------------------------ parameters (exact, from the modules)
def _count(module) -> tuple[int, int]:
    dense = expert = 0
    for name, p in module.named_parameters():
        if ".experts." in f".{name}":
            expert += p.numel()
        else:
            dense += p.numel()
    return dense, expert


@functools.lru_cache(maxsize=64)
def _block_params(cfg, layer_idx: int, mtp: bool) -> tuple[int, int]:
    """(dense, routed-expert) parameters of one Block (or MTP block), built on the meta device."""
    import torch

    from v4train.model.block import Block
    from v4train.model.mtp import MTPBlock

    with torch.device("meta"):
        return _count((MTPBlock if mtp else Block)(cfg, layer_idx))


@functools.lru_cache(maxsize=16)
def _head_params(cfg) -> int:
    import torch

    from v4train.model.mhc import HyperHead

    with torch.device("meta"):
        head = HyperHead(cfg.dim, cfg.hc_mult, hc_eps=cfg.hc_eps, norm_eps=cfg.norm_eps)
        hc = sum(p.numel() for p in head.parameters())
    return hc + cfg.dim + cfg.vocab_size * cfg.dim  # hc_head, norm, head


@functools.lru_cache(maxsize=64)
def _block_fp32_params(cfg, layer_idx: int, mtp: bool) -> int:
    """Dense parameters of one Block (or MTP block) that ``precision: bf16`` keeps in fp32
    (:func:`parallel.mixed_precision.computes_in_bf16` false: mHC, norms, compressors, router, sinks)."""
    import torch

    from v4train.model.block import Block
    from v4train.model.mtp import MTPBlock
    from v4train.parallel.mixed_precision import computes_in_bf16

    with torch.device("meta"):
        block = (MTPBlock if mtp else Block)(cfg, layer_idx)
    return sum(p.numel() for n, p in block.named_parameters() if not computes_in_bf16(n))


def _layer_key(cfg, i: int) -> int:
    """A representative layer index with the same modules as layer ``i`` (same ratio, hash or learned routing)."""
    ratio, hashed = cfg.compress_ratios[i], i < cfg.n_hash_layers
    return next(j for j in range(cfg.n_layers) if cfg.compress_ratios[j] == ratio and (j < cfg.n_hash_layers) == hashed)


def stage_parameters(cfg, pp: int, stage_layers: list[int] | None = None) -> list[tuple[range, int, int]]:
    """``[(layers, dense, routed_expert)]`` parameter counts of every pipeline stage (as ``V4Stage`` builds them),
    with ``stage_layers[r]`` layers on stage r (default: the even split)."""
    from v4train.model.transformer import stage_layer_ranges

    out = []
    for r, layers in enumerate(stage_layer_ranges(cfg.n_layers, pp, stage_layers)):
        dense = expert = 0
        for i in layers:
            d, e = _block_params(cfg, _layer_key(cfg, i), False)
            dense, expert = dense + d, expert + e
        if r == 0 or (r == pp - 1 and cfg.mtp_depth > 0):
            dense += cfg.vocab_size * cfg.dim  # the embedding (the last stage's copy feeds MTP)
        if r == pp - 1:
            dense += _head_params(cfg)
            for k in range(cfg.mtp_depth):
                d, e = _block_params(cfg, cfg.n_layers + k, True)
                dense, expert = dense + d, expert + e
        out.append((layers, dense, expert))
    return out


def stage_fp32_parameters(cfg, pp: int, stage_layers: list[int] | None = None) -> list[int]:
    """Per pipeline stage, how many of its dense parameters ``precision: bf16`` keeps in fp32 (the rest, routed
    experts included, compute in bf16): the blocks' mHC, norms, compressors, routers and sinks, and on the last
    stage the head's mHC and norm."""
    from v4train.model.transformer import stage_layer_ranges

    out = []
    for r, layers in enumerate(stage_layer_ranges(cfg.n_layers, pp, stage_layers)):
        n = sum(_block_fp32_params(cfg, _layer_key(cfg, i), False) for i in layers)
        if r == pp - 1:
            n += _head_params(cfg) - cfg.vocab_size * cfg.dim  # hc_head and norm; the head weight is bf16
            n += sum(_block_fp32_params(cfg, cfg.n_layers + k, True) for k in range(cfg.mtp_depth))
        out.append(n)
    return out


# ------------------------------------------------------------------ activations (fitted element counts)
def activation_elements(cfg, layer_idx: int, seq_len: int, attention: str, tp: int = 1) -> tuple[float, float]:
    """``(other, kv_compressor)`` saved elements per token of one layer (block ``layer_idx``).

    Fitted to autograd's saved tensors (unique storages, parameters excluded) of this code's layers over 14
    random configurations (nano-sized: D 64-192, H 2-8, head_dim 32-128, window 16-64, K 1-3) and checked
    against nano and small in ``tests/orchestrator/test_plan.py``. Terms: mHC (two fused reads, whose Sinkhorn
    keeps its 2N normalisers per iteration, and two writes) and norms; attention (what ``model/attention.py``
    keeps after recomputing the rest in the backward: the sparse core's q and output, c^Q, the layer input, the
    window kv rows, the slot indices, and wo_b's input when it is row-parallel); CSA/HCA compressor entries and
    their slot indices (every visible entry in dense mode, the indexer's top-k in sparse mode, plus the
    indexer's projections); MoE (router, K routed expert SwiGLUs in fp32, the shared expert).
    """
    D = cfg.dim
    HC, C, L = cfg.n_heads * cfg.head_dim, cfg.head_dim, cfg.q_lora_rank
    W = min(cfg.window, seq_len)
    block = mhc_elements(cfg, layer_idx)
    attn = 2 * HC / tp + L + D + W + (cfg.o_groups * cfg.o_lora_rank / tp if tp > 1 else 0) + 35
    kv = C
    ratio = cfg.compress_ratios[layer_idx]
    if ratio == 4:  # CSA: overlapping compressor, indexer
        slots = seq_len / ratio if attention == "dense" else min(cfg.index_topk, seq_len / ratio)
        kv += 4.75 * C + slots + 12
        if attention != "dense":
            attn += cfg.index_n_heads * (cfg.index_head_dim + 1) / tp + cfg.index_head_dim / ratio
    elif ratio:  # HCA: each query's visible entries are one (first, last) slot range
        kv += 2.1 * C + 7
    F, K = cfg.moe_inter_dim, cfg.n_activated_experts
    ffn = K * (7 * F + 2 * D + 8) + 4 * F * cfg.n_shared_experts / tp + D + cfg.n_routed_experts + 9
    return block + attn + ffn, kv


def mhc_elements(cfg, layer_idx: int) -> float:
    """The mHC and norm part of :func:`activation_elements` (elements per token of block ``layer_idx``):
    two fused reads (Sinkhorn keeps its 2N normalisers per iteration), two writes, the norms, and an MTP
    block's projections of the embedding and the streams. What ``recompute: selective`` keeps."""
    D, N, it = cfg.dim, cfg.hc_mult, cfg.hc_sinkhorn_iters
    block = 2.36 * N * D + 2 * (2 * N * it + N * N) + 162
    if layer_idx >= cfg.n_layers:
        block += 4.3 * N * D
    return block


def cp_buffer_elements(cfg, layer_idx: int, seq_len: int, cp: int) -> float:
    """Elements one sequence's context-parallel exchange keeps per layer on a rank: the halo rows of the
    layer input (two chunks, ``parallel.context_parallel``) with their window KV, and the all-gathered
    compressed entries (and the indexer's keys for CSA) of the whole sequence."""
    ratio = cfg.compress_ratios[layer_idx]
    width = cfg.window - 1 if not ratio else max(cfg.window - 1, (2 if ratio == 4 else 1) * ratio - 1)
    halo = 2 * min(width, seq_len // (2 * cp)) * (cfg.dim + cfg.head_dim)
    entries = seq_len / ratio * (cfg.head_dim + (cfg.index_head_dim if ratio == 4 else 0)) if ratio else 0.0
    return halo + entries


def head_elements(cfg, tp: int) -> float:
    """Last stage, per token: hc_head and norm (the fused head and loss, ``model/head_loss.py``, keeps no
    ``[tokens, vocab]`` tensor)."""
    return 2 * cfg.hc_mult * cfg.dim + 24


def head_weight_elements(cfg, tp: int) -> float:
    """Last stage, per micro-batch in flight: the fused head and loss forms each head's (main and MTP) weight
    gradient ``[V / tp, D]`` in the forward and keeps it until the backward."""
    return (1 + cfg.mtp_depth) * cfg.vocab_size / tp * cfg.dim


