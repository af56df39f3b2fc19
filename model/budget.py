"""Parameter counts of the modules this package builds, by formula (no model is instantiated).

Counts what :class:`model.transformer.V4Stage` builds in the first cut: embedding, every layer's
attention (SWA), mHC, norms and MoE, hc_head, final norm and head. Not counted because not built yet:
the MTP block and the CSA/HCA compressors and indexers (spec 10.1's nano "~9.2M" includes them:
about 1.2M for MTP and 0.2M for compression). "active" follows spec 10.1: it excludes the embedding
lookup and the routed experts a token does not use; buffers (router bias, hash table) are not parameters.
"""

from __future__ import annotations

from model.config import ModelConfig

__all__ = ["param_counts"]


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """``{"total": int, "active": int}`` parameter counts of the full (pp_size = 1) model."""
    d, n = cfg.dim, cfg.hc_mult
    attention = (
        d * cfg.q_lora_rank + cfg.q_lora_rank                       # wq_a, q_norm
        + cfg.q_lora_rank * cfg.n_heads * cfg.head_dim              # wq_b
        + d * cfg.head_dim + cfg.head_dim                           # wkv, kv_norm
        + cfg.n_heads * cfg.head_dim * cfg.o_lora_rank              # wo_a (g blocks of [r, h*c/g])
        + cfg.o_groups * cfg.o_lora_rank * d                        # wo_b
        + cfg.n_heads                                               # attn_sink
    )
    mix = (2 + n) * n
    hyper = 2 * (mix * n * d + mix + 3)                              # hc_attn, hc_ffn
    expert = 3 * d * cfg.moe_inter_dim
    shared = cfg.n_shared_experts * expert
    router = cfg.n_routed_experts * d
    per_layer_fixed = attention + hyper + 2 * d + router + shared   # + attn_norm, ffn_norm
    embed = cfg.vocab_size * d
    last_stage = n * n * d + n + 1 + d + cfg.vocab_size * d          # hc_head, norm, head
    total = embed + cfg.n_layers * (per_layer_fixed + cfg.n_routed_experts * expert) + last_stage
    active = cfg.n_layers * (per_layer_fixed + cfg.n_activated_experts * expert) + last_stage
    return {"total": total, "active": active}
