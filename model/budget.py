"""Size, KV-cache and attention-FLOP calculator for V4 configs and a DeepSeek-V3.2-style baseline.

Everything is by formula (no model is instantiated) so the full-size presets cost nothing.

``param_counts(cfg)`` counts the parameters :class:`model.transformer.V4Stage` builds with
pp_size = 1 (a test holds ``total_with_mtp`` to the built nano/small models): embedding, per layer
the attention (+ compressor for CSA/HCA, + indexer for CSA), two mHC, two norms and the MoE, then
hc_head, norm, head; and the MTP blocks. Buffers (router bias, hash table) are not parameters.
Conventions, chosen because they reproduce the published figures (V3's "671B" likewise leaves MTP
out): ``"total"`` is the main model *without* MTP (flash 284.3B vs 284B; with MTP 290.9B);
``"active"`` is what one token's main forward uses: every non-expert parameter, the shared experts
and K of the E routed experts, *without* the embedding lookup (spec 10.1) and without MTP (flash
13.27B, pro 48.85B vs 13B / 49B; the spec's own arithmetic, which includes the embedding - spec 0.1
item 11 - gives 13.80B / 49.78B, which would round to 14B / 50B). ``"active_with_embedding"``,
``"mtp"`` and ``"total_with_mtp"`` are returned too.

``kv_cache_bytes_per_token(cfg, L)``: cache bytes per token of a context of L tokens, summed over
layers (MTP excluded), in the released storage format (spec 3.9): an entry keeps its
``head_dim - rope_head_dim`` non-RoPE dims in FP8 (1 B) plus one ue8m0 scale byte per 64 of them and
its RoPE dims in BF16 (2 B); a CSA layer stores L/m entries plus L/m indexer keys (FP4: 0.5 B per dim
plus one scale byte per 32); an HCA layer L/m' entries; every layer also keeps its n_win-entry window
(amortised over L). For :class:`BaselineConfig` (V3.2 MLA + DSA): one 512-d latent in FP8 with an
fp32 scale per 128 plus the 64 RoPE dims in BF16 (656 B), and a 128-d FP8 indexer key with one fp32
scale (132 B), per token and layer (spec 3.9).

``attention_flops_per_token(cfg, L)``: FLOPs of the context-dependent attention work of one new
token at position L (decode), summed over layers: 2 FLOPs per multiply-add for q.k and p.v over every
attended entry and head (V4: c each; V3.2 absorbed MLA: 576 for q.k and 512 for p.v) plus the
indexer's q.k over every visible compressed key (V3.2: every previous token). Projections, MoE and
the compressor's per-token linears are context-independent and excluded; add ``2 * active`` for a
whole-token estimate. Real FLOPs (FP4/FP8 are not discounted).

Shape-free module; numbers are Python ints/floats.
"""

from __future__ import annotations

from dataclasses import dataclass

from v4train.model.config import ModelConfig

__all__ = ["param_counts", "kv_cache_bytes_per_token", "attention_flops_per_token", "BaselineConfig",
           "V32_BASELINE", "baseline_param_counts", "comparison_table",
           "training_flops_per_sequence", "attention_core_flops", "layer_params"]

_CSA_RATIO = 4  # OC: ratio 4 layers overlap and carry an indexer (model.attention.CSA_RATIO)


# ------------------------------------------------------------------------------------------ params
def _compressor_params(d: int, c: int, ratio: int, overlap: bool) -> int:
    width = (1 + overlap) * c
    return ratio * width + 2 * d * width + c  # ape, wkv, wgate, norm


def _attention_params(cfg: ModelConfig, ratio: int) -> int:
    d = cfg.dim
    n = (d * cfg.q_lora_rank + cfg.q_lora_rank                      # wq_a, q_norm
         + cfg.q_lora_rank * cfg.n_heads * cfg.head_dim             # wq_b
         + d * cfg.head_dim + cfg.head_dim                          # wkv, kv_norm
         + cfg.n_heads * cfg.head_dim * cfg.o_lora_rank             # wo_a (g blocks of [r, h*c/g])
         + cfg.o_groups * cfg.o_lora_rank * d                       # wo_b
         + cfg.n_heads)                                             # attn_sink
    if ratio:
        n += _compressor_params(d, cfg.head_dim, ratio, overlap=ratio == _CSA_RATIO)
    if ratio == _CSA_RATIO:
        n += (cfg.q_lora_rank * cfg.index_n_heads * cfg.index_head_dim   # indexer wq_b
              + d * cfg.index_n_heads                                     # weights_proj
              + _compressor_params(d, cfg.index_head_dim, ratio, overlap=True))
    return n


def layer_params(cfg: ModelConfig, ratio: int) -> tuple[int, int]:
    """``(fixed, per_routed_expert)`` parameters of one block of compression ratio ``ratio``: attention, two
    mHC, two norms, router and shared experts; and one routed expert."""
    d, n = cfg.dim, cfg.hc_mult
    mix = (2 + n) * n
    hyper = 2 * (mix * n * d + mix + 3)                              # hc_attn, hc_ffn
    expert = 3 * d * cfg.moe_inter_dim
    fixed = _attention_params(cfg, ratio) + hyper + 2 * d + cfg.n_routed_experts * d + cfg.n_shared_experts * expert
    return fixed, expert


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """``{"total", "active", "active_with_embedding", "mtp", "total_with_mtp"}`` (module docstring)."""
    d, n = cfg.dim, cfg.hc_mult
    embed = cfg.vocab_size * d
    head = n * n * d + n + 1 + d + cfg.vocab_size * d               # hc_head, norm, head
    total = embed + head
    active = head
    for ratio in cfg.compress_ratios[: cfg.n_layers]:
        fixed, expert = layer_params(cfg, ratio)
        total += fixed + cfg.n_routed_experts * expert
        active += fixed + cfg.n_activated_experts * expert
    mtp = 0
    for ratio in cfg.compress_ratios[cfg.n_layers:]:
        fixed, expert = layer_params(cfg, ratio)
        mtp += fixed + cfg.n_routed_experts * expert + 2 * d * d + 3 * d + n * n * d + n + 1
    return {"total": total, "active": active, "active_with_embedding": active + embed, "mtp": mtp,
            "total_with_mtp": total + mtp}


# --------------------------------------------------------------------------------------- baseline
@dataclass(frozen=True, kw_only=True)
class BaselineConfig:
    """DeepSeek-V3.2-style model (V3 architecture: MLA + DSA indexer), for the report's comparisons.

    Defaults are V3.2's public config.json values (V3 trunk; DSA: 64 indexer heads x 128, top-k 2048).
    """

    vocab_size: int = 129280
    dim: int = 7168
    n_layers: int = 61
    n_dense_layers: int = 3
    dense_inter_dim: int = 18432
    n_heads: int = 128
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_routed_experts: int = 256
    n_activated_experts: int = 8
    n_shared_experts: int = 1
    moe_inter_dim: int = 2048
    index_n_heads: int = 64
    index_head_dim: int = 128
    index_topk: int = 2048
    mtp_depth: int = 1


V32_BASELINE = BaselineConfig()


def baseline_param_counts(cfg: BaselineConfig = V32_BASELINE) -> dict[str, int]:
    """V3-formula parameter counts of the baseline, same keys as :func:`param_counts` (its MTP block:
    one MoE layer + the 2d -> d projection + norms)."""
    d = cfg.dim
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    mla = (d * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * cfg.n_heads * qk
           + d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank
           + cfg.kv_lora_rank * cfg.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
           + cfg.n_heads * cfg.v_head_dim * d)
    indexer = (cfg.q_lora_rank * cfg.index_n_heads * cfg.index_head_dim + d * cfg.index_head_dim
               + 2 * cfg.index_head_dim + d * cfg.index_n_heads)  # wq_b, wk, k_norm (w, b), weights_proj
    norms = 2 * d
    expert = 3 * d * cfg.moe_inter_dim
    dense_layer = mla + indexer + norms + 3 * d * cfg.dense_inter_dim
    moe_fixed = mla + indexer + norms + cfg.n_routed_experts * d + cfg.n_routed_experts + cfg.n_shared_experts * expert
    n_moe = cfg.n_layers - cfg.n_dense_layers
    embed, head = cfg.vocab_size * d, cfg.vocab_size * d + d
    total = embed + head + cfg.n_dense_layers * dense_layer + n_moe * (moe_fixed + cfg.n_routed_experts * expert)
    active = head + cfg.n_dense_layers * dense_layer + n_moe * (moe_fixed + cfg.n_activated_experts * expert)
    mtp = cfg.mtp_depth * (moe_fixed + cfg.n_routed_experts * expert + 2 * d * d + 3 * d)
    return {"total": total, "active": active, "active_with_embedding": active + embed, "mtp": mtp,
            "total_with_mtp": total + mtp}


# ------------------------------------------------------------------------------------------ cache
def _entry_bytes(dim: int, rope_dim: int) -> float:
    nope = dim - rope_dim
    return nope + nope / 64 + 2 * rope_dim  # FP8 + ue8m0 scale per 64, BF16 RoPE dims


def kv_cache_bytes_per_token(cfg: ModelConfig | BaselineConfig, context_len: int) -> float:
    """Cache bytes per token of a ``context_len``-token context, summed over the main layers."""
    L = context_len
    if isinstance(cfg, BaselineConfig):
        latent = cfg.kv_lora_rank + 4 * cfg.kv_lora_rank / 128 + 2 * cfg.qk_rope_head_dim   # 656 B
        index_key = cfg.index_head_dim + 4                                                   # 132 B
        return cfg.n_layers * (latent + index_key)
    entry = _entry_bytes(cfg.head_dim, cfg.rope_head_dim)
    index_key = cfg.index_head_dim / 2 + cfg.index_head_dim / 32
    total = 0.0
    for ratio in cfg.compress_ratios[: cfg.n_layers]:
        total += min(cfg.window, L) * entry / L
        if ratio:
            total += (L // ratio) * entry / L
        if ratio == _CSA_RATIO:
            total += (L // ratio) * index_key / L
    return total


# ------------------------------------------------------------------------------------------ flops
def attention_flops_per_token(cfg: ModelConfig | BaselineConfig, context_len: int) -> float:
    """Attention FLOPs of one new token with ``context_len`` tokens of context (module docstring)."""
    L = context_len
    if isinstance(cfg, BaselineConfig):
        per_entry = 2 * cfg.n_heads * (cfg.kv_lora_rank + cfg.qk_rope_head_dim + cfg.kv_lora_rank)
        indexer = 2 * cfg.index_n_heads * cfg.index_head_dim * L
        return cfg.n_layers * (per_entry * min(cfg.index_topk, L) + indexer)
    per_entry = 2 * cfg.n_heads * 2 * cfg.head_dim
    total = 0.0
    for ratio in cfg.compress_ratios[: cfg.n_layers]:
        attended = min(cfg.window, L)
        if ratio == _CSA_RATIO:
            attended += min(cfg.index_topk, L // ratio)
            total += 2 * cfg.index_n_heads * cfg.index_head_dim * (L // ratio)
        elif ratio:
            attended += L // ratio
        total += per_entry * attended
    return total


def attention_core_flops(cfg: ModelConfig, ratio: int, seq_len: int, attention_mode: str) -> float:
    """FLOPs of one layer's attention core and Lightning Indexer over one training sequence of ``seq_len``
    tokens, forward + backward (the counting of :func:`training_flops_per_sequence`), for a layer of
    compression ratio ``ratio`` (0 SWA, 4 CSA, else HCA)."""
    t = range(1, seq_len + 1)                              # t + 1 for the 0-based positions
    per_entry = 3 * 4 * cfg.n_heads * cfg.head_dim
    per_score = 2 * cfg.index_n_heads * cfg.index_head_dim
    entries = sum(min(cfg.window, u) for u in t)
    visible = sum(u // ratio for u in t) if ratio else 0
    flops = 0.0
    if ratio == _CSA_RATIO and attention_mode == "sparse":
        picked = sum(min(cfg.index_topk, u // ratio) for u in t)
        entries += picked
        flops += per_score * visible + 3 * per_score * picked
    else:
        entries += visible
        if ratio == _CSA_RATIO and attention_mode == "indexer_warmup":
            flops += per_score * visible + 3 * per_score * visible
    return flops + per_entry * entries


def training_flops_per_sequence(cfg: ModelConfig, seq_len: int, attention_mode: str = "sparse") -> float:
    """Real FLOPs of one training forward + backward over one sequence of ``seq_len`` tokens (for MFU).

    Counted (2 FLOPs per multiply-add, backward = 2x forward):

    * matmuls: ``6 * seq_len * P`` with P the parameters one token multiplies: ``param_counts(cfg)["active"]``
      (head included, embedding lookup excluded) plus, per MTP block, its fixed and ``n_activated_experts``
      routed-expert parameters, its projections and one more pass through the shared head;
    * attention cores, main and MTP layers: token t (0-based) attends ``min(window, t + 1)`` raw entries
      plus its compressed entries (spec 3.3, 3.6): HCA every visible one, ``(t + 1) // m``; CSA the same in
      ``dense`` / ``indexer_warmup`` mode and ``min(index_topk, (t + 1) // m)`` in ``sparse`` mode; each
      entry costs ``4 * n_heads * head_dim`` forward (q.k and p.v), 3x that with the backward;
    * the Lightning Indexer of CSA layers outside ``dense`` mode: its scores over every visible compressed
      entry forward (``2 * index_n_heads * index_head_dim`` each; the picks are not differentiated) and its
      KL loss's scores over the picked (sparse) or visible (warm-up) entries forward and backward.

    Not counted: compressors' pooling, mHC mixing and Sinkhorn, norms, softmaxes, the loss (all
    elementwise or O(dim) per token). Raises ValueError for ``seq_len < 1`` or an unknown mode.
    """
    if seq_len < 1:
        raise ValueError(f"training_flops_per_sequence: seq_len={seq_len} must be >= 1")
    if attention_mode not in ("dense", "indexer_warmup", "sparse"):
        raise ValueError(f"training_flops_per_sequence: attention_mode={attention_mode!r} is not one of "
                         "dense, indexer_warmup, sparse")
    d, n, L = cfg.dim, cfg.hc_mult, seq_len
    per_token = param_counts(cfg)["active"]
    for ratio in cfg.compress_ratios[cfg.n_layers:]:
        fixed, expert = layer_params(cfg, ratio)
        per_token += (fixed + cfg.n_activated_experts * expert + 2 * d * d + 3 * d + n * n * d + n + 1
                      + cfg.vocab_size * d)
    flops = 6.0 * L * per_token
    for ratio in cfg.compress_ratios:                      # main layers, then the MTP blocks
        flops += attention_core_flops(cfg, ratio, L, attention_mode)
    return flops


def comparison_table(context_len: int = 1 << 20) -> list[dict[str, float | str]]:
    """Rows for BENCHMARKS.md: params, KV bytes/token and attention FLOPs/token at ``context_len``
    for flash, pro and the V3.2 baseline, with the ratios to the baseline."""
    base_kv = kv_cache_bytes_per_token(V32_BASELINE, context_len)
    base_fl = attention_flops_per_token(V32_BASELINE, context_len)
    base_p = baseline_param_counts()
    rows = []
    for name, cfg, p in (("flash", ModelConfig.preset("flash"), None), ("pro", ModelConfig.preset("pro"), None),
                         ("v3.2", V32_BASELINE, base_p)):
        p = p or param_counts(cfg)
        kv, fl = kv_cache_bytes_per_token(cfg, context_len), attention_flops_per_token(cfg, context_len)
        rows.append({
            "model": name, "total": p["total"], "active": p["active"],
            "active_with_embedding": p["active_with_embedding"],
            "kv_bytes_per_token": kv, "kv_vs_v32": kv / base_kv,
            "attn_flops_per_token": fl, "attn_flops_vs_v32": fl / base_fl,
            "token_flops_vs_v32": (fl + 2 * p["active"]) / (base_fl + 2 * base_p["active"]),
        })
    return rows
