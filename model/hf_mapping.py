"""v4train <-> Hugging Face (released DeepSeek-V4) names, shapes, storage kinds and ``config.json``.

The released checkpoints (``deepseek-ai/DeepSeek-V4-Flash`` / ``-Pro``) use the official inference
code's module names without a prefix (``layers.3.attn.wq_a.weight``, ``embed.weight``,
``hc_head_fn``, ``mtp.0.e_proj.weight``); transformers' ``DeepseekV4ForCausalLM`` renames them on load
(its ``conversion_mapping``) and ignores ``mtp.*``. Our parameter names already follow the official ones
except for four spellings, which :func:`to_hf_name` / :func:`from_hf_name` translate both ways:

=================================================  ===================================================
v4train (``V4Stage.state_dict()``)                 released
=================================================  ===================================================
``hc_head.fn`` / ``base`` / ``scale``              ``hc_head_fn`` / ``hc_head_base`` / ``hc_head_scale``
``layers.i.hc_attn.fn`` (``hc_ffn``, ``mtp.k``)    ``layers.i.hc_attn_fn``
``mtp.k.hc_head.fn``                               ``mtp.k.hc_head_fn``
``layers.i.ffn.experts.experts.e.w1.weight``       ``layers.i.ffn.experts.e.w1.weight``
=================================================  ===================================================

:func:`hf_tensors` lists every released tensor of a config with its shape and storage kind (spec
0.1 item 9): ``fp8`` (e4m3 with a 128x128 block scale ``<name minus .weight>.scale``), ``fp4`` (routed
experts: e2m1 packed two per int8 byte, low nibble first, with a 1x32 block scale), ``bf16``, ``fp32``
(``ape``, ``attn_sink``, the gate bias, every ``hc_*``) and ``int32`` (the hash table ``tid2eid``).
The released checkpoints also carry copies of the shared embedding and head under ``mtp.k.embed.weight``
/ ``mtp.k.head.weight``; :data:`SHARED_MTP_COPIES` names them so a reader can skip them.

:func:`hf_config` / :func:`model_config_from_hf` convert :class:`model.config.ModelConfig` to and from
the released ``config.json`` (plus the keys transformers needs to build the model: ``model_type``,
``layer_types`` and ``compress_rates``, since transformers only knows the HCA ratio 128 from
``compress_ratios``). Raises ValueError naming the ``config.json`` key that v4train cannot represent.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from v4train.model.config import ModelConfig

__all__ = ["HFTensor", "SHARED_MTP_COPIES", "to_hf_name", "from_hf_name", "hf_tensors", "hf_config",
           "model_config_from_hf", "ARCHITECTURE_FIELDS", "architecture_mismatch"]

_TO_HF = [
    (re.compile(r"^((?:mtp\.\d+\.)?)hc_head\.(fn|base|scale)$"), r"\1hc_head_\2"),
    (re.compile(r"^((?:layers|mtp)\.\d+\.)hc_(attn|ffn)\.(fn|base|scale)$"), r"\1hc_\2_\3"),
    (re.compile(r"^((?:layers|mtp)\.\d+\.ffn\.experts)\.experts\.(\d+\.w[123]\.weight)$"), r"\1.\2"),
]
_FROM_HF = [
    (re.compile(r"^((?:mtp\.\d+\.)?)hc_head_(fn|base|scale)$"), r"\1hc_head.\2"),
    (re.compile(r"^((?:layers|mtp)\.\d+\.)hc_(attn|ffn)_(fn|base|scale)$"), r"\1hc_\2.\3"),
    (re.compile(r"^((?:layers|mtp)\.\d+\.ffn\.experts)\.(\d+\.w[123]\.weight)$"), r"\1.experts.\2"),
]
SHARED_MTP_COPIES = re.compile(r"^mtp\.\d+\.(embed|head)\.weight$")

# ModelConfig fields that change the computation; the others (balancing speeds, init) are training
# hyperparameters a job may set freely on top of a converted checkpoint.
ARCHITECTURE_FIELDS = tuple(
    f for f in ModelConfig.__dataclass_fields__
    if f not in ("bias_update_speed", "balance_loss_weight", "init_std", "qat"))


class HFTensor(NamedTuple):
    """A released tensor: its logical ``shape`` (unpacked, unquantised) and storage ``kind``."""

    shape: tuple[int, ...]
    kind: str


def _translate(name: str, table) -> str:
    for pattern, repl in table:
        new, n = pattern.subn(repl, name)
        if n:
            return new
    return name


def to_hf_name(name: str) -> str:
    """The released name of v4train parameter/buffer ``name`` (identity for most)."""
    return _translate(name, _TO_HF)


def from_hf_name(name: str) -> str:
    """The v4train name of released tensor ``name`` (inverse of :func:`to_hf_name`)."""
    return _translate(name, _FROM_HF)


def _block_tensors(cfg: ModelConfig, prefix: str, layer: int) -> dict[str, HFTensor]:
    """Released tensors of one Block (layer or MTP block) under ``prefix`` (e.g. ``layers.3.``)."""
    d, n = cfg.dim, cfg.hc_mult
    mix = (2 + n) * n
    out: dict[str, HFTensor] = {}

    def add(name: str, shape: tuple[int, ...], kind: str) -> None:
        out[prefix + name] = HFTensor(tuple(shape), kind)

    for hc in ("attn", "ffn"):
        add(f"hc_{hc}_fn", (mix, n * d), "fp32")
        add(f"hc_{hc}_base", (mix,), "fp32")
        add(f"hc_{hc}_scale", (3,), "fp32")
    add("attn_norm.weight", (d,), "bf16")
    add("ffn_norm.weight", (d,), "bf16")
    hd = cfg.head_dim
    add("attn.wq_a.weight", (cfg.q_lora_rank, d), "fp8")
    add("attn.q_norm.weight", (cfg.q_lora_rank,), "bf16")
    add("attn.wq_b.weight", (cfg.n_heads * hd, cfg.q_lora_rank), "fp8")
    add("attn.wkv.weight", (hd, d), "fp8")
    add("attn.kv_norm.weight", (hd,), "bf16")
    add("attn.wo_a.weight", (cfg.o_groups * cfg.o_lora_rank, cfg.n_heads * hd // cfg.o_groups), "fp8")
    add("attn.wo_b.weight", (d, cfg.o_groups * cfg.o_lora_rank), "fp8")
    add("attn.attn_sink", (cfg.n_heads,), "fp32")
    ratio = cfg.compress_ratios[layer]

    def compressor(p: str, head_dim: int, overlap: bool) -> None:
        width = (1 + overlap) * head_dim
        add(f"{p}.ape", (ratio, width), "fp32")
        add(f"{p}.wkv.weight", (width, d), "bf16")
        add(f"{p}.wgate.weight", (width, d), "bf16")
        add(f"{p}.norm.weight", (head_dim,), "bf16")

    if ratio:
        csa = ratio == 4  # OC ties the overlap and the indexer to ratio 4 (model/attention.py)
        compressor("attn.compressor", hd, csa)
        if csa:
            add("attn.indexer.wq_b.weight", (cfg.index_n_heads * cfg.index_head_dim, cfg.q_lora_rank), "fp8")
            add("attn.indexer.weights_proj.weight", (cfg.index_n_heads, d), "bf16")
            compressor("attn.indexer.compressor", cfg.index_head_dim, True)
    E, inter = cfg.n_routed_experts, cfg.moe_inter_dim
    add("ffn.gate.weight", (E, d), "bf16")
    if layer < cfg.n_hash_layers:
        add("ffn.gate.tid2eid", (cfg.vocab_size, cfg.n_activated_experts), "int32")
    else:
        add("ffn.gate.bias", (E,), "fp32")
    for e in range(E):
        add(f"ffn.experts.{e}.w1.weight", (inter, d), "fp4")
        add(f"ffn.experts.{e}.w2.weight", (d, inter), "fp4")
        add(f"ffn.experts.{e}.w3.weight", (inter, d), "fp4")
    if cfg.n_shared_experts:
        shared = cfg.n_shared_experts * inter
        add("ffn.shared_experts.w1.weight", (shared, d), "fp8")
        add("ffn.shared_experts.w2.weight", (d, shared), "fp8")
        add("ffn.shared_experts.w3.weight", (shared, d), "fp8")
    return out


def hf_tensors(cfg: ModelConfig) -> dict[str, HFTensor]:
    """Every tensor of the released checkpoint of ``cfg`` (main model and MTP blocks), in model order,
    with its logical shape and storage kind (module docstring). Scale companions are not listed."""
    d, n = cfg.dim, cfg.hc_mult
    out = {"embed.weight": HFTensor((cfg.vocab_size, d), "bf16")}
    for i in range(cfg.n_layers):
        out.update(_block_tensors(cfg, f"layers.{i}.", i))
    out["norm.weight"] = HFTensor((d,), "bf16")
    out["head.weight"] = HFTensor((cfg.vocab_size, d), "bf16")
    out["hc_head_fn"] = HFTensor((n, n * d), "fp32")
    out["hc_head_base"] = HFTensor((n,), "fp32")
    out["hc_head_scale"] = HFTensor((1,), "fp32")
    for k in range(cfg.mtp_depth):
        p = f"mtp.{k}."
        out.update(_block_tensors(cfg, p, cfg.n_layers + k))
        out[p + "e_proj.weight"] = HFTensor((d, d), "fp8")
        out[p + "h_proj.weight"] = HFTensor((d, d), "fp8")
        for norm in ("enorm", "hnorm", "norm"):
            out[f"{p}{norm}.weight"] = HFTensor((d,), "bf16")
        out[p + "hc_head_fn"] = HFTensor((n, n * d), "fp32")
        out[p + "hc_head_base"] = HFTensor((n,), "fp32")
        out[p + "hc_head_scale"] = HFTensor((1,), "fp32")
    return out


# ModelConfig field -> config.json key, where the value carries over unchanged
_PLAIN_KEYS = {
    "vocab_size": "vocab_size", "dim": "hidden_size", "n_layers": "num_hidden_layers",
    "mtp_depth": "num_nextn_predict_layers", "n_heads": "num_attention_heads", "head_dim": "head_dim",
    "rope_head_dim": "qk_rope_head_dim", "q_lora_rank": "q_lora_rank", "o_groups": "o_groups",
    "o_lora_rank": "o_lora_rank", "window": "sliding_window", "index_n_heads": "index_n_heads",
    "index_head_dim": "index_head_dim", "index_topk": "index_topk", "n_routed_experts": "n_routed_experts",
    "n_activated_experts": "num_experts_per_tok", "n_shared_experts": "n_shared_experts",
    "moe_inter_dim": "moe_intermediate_size", "n_hash_layers": "num_hash_layers",
    "route_scale": "routed_scaling_factor", "swiglu_limit": "swiglu_limit", "hc_mult": "hc_mult",
    "hc_sinkhorn_iters": "hc_sinkhorn_iters", "hc_eps": "hc_eps", "norm_eps": "rms_norm_eps",
    "rope_theta": "rope_theta", "compress_rope_theta": "compress_rope_theta",
}
# config.json keys whose value v4train cannot change: (key, the only supported value)
_FIXED_KEYS = (("num_key_value_heads", 1), ("scoring_func", "sqrtsoftplus"), ("norm_topk_prob", True),
               ("tie_word_embeddings", False), ("hidden_act", "silu"), ("topk_method", "noaux_tc"))
_LAYER_TYPES = {0: "sliding_attention", 4: "compressed_sparse_attention"}


def hf_config(cfg: ModelConfig, *, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The released-style ``config.json`` of ``cfg`` (plus transformers' ``layer_types`` and
    ``compress_rates``). Raises ValueError naming the ModelConfig field transformers cannot express
    (HCA layers with two different ratios)."""
    out: dict[str, Any] = {"architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4"}
    out.update({key: getattr(cfg, field) for field, key in _PLAIN_KEYS.items()})
    out.update(dict(_FIXED_KEYS))
    out["compress_ratios"] = list(cfg.compress_ratios)
    hca = sorted({r for r in cfg.compress_ratios[: cfg.n_layers] if r not in _LAYER_TYPES})
    if len(hca) > 1:
        raise ValueError(f"ModelConfig.compress_ratios: HCA layers use ratios {hca}; the Hugging Face config "
                         "has one HCA ratio (compress_rates.heavily_compressed_attention)")
    out["layer_types"] = [_LAYER_TYPES.get(r, "heavily_compressed_attention")
                          for r in cfg.compress_ratios[: cfg.n_layers]]
    out["compress_rates"] = {"compressed_sparse_attention": 4, "heavily_compressed_attention": hca[0] if hca else 128}
    if cfg.original_seq_len > 0:
        out["rope_scaling"] = {"type": "yarn", "factor": cfg.rope_factor,
                               "original_max_position_embeddings": cfg.original_seq_len,
                               "beta_fast": cfg.beta_fast, "beta_slow": cfg.beta_slow}
        # the YaRN-extended context, as the released config states it (65536 x 16)
        out["max_position_embeddings"] = int(cfg.original_seq_len * cfg.rope_factor)
    out.update(extra or {})
    return out


def model_config_from_hf(config: dict[str, Any], *, source: str = "config.json",
                         defaults: ModelConfig | None = None) -> ModelConfig:
    """The :class:`ModelConfig` of a released-style ``config.json`` dict.

    Training-only fields come from ``defaults`` (else the ``flash`` preset's). Raises ValueError naming
    ``source`` and the key that is missing or holds a value v4train does not implement.
    """
    def need(key: str) -> Any:
        if key not in config:
            raise ValueError(f"{source}: lacks {key!r}")
        return config[key]

    for key, value in _FIXED_KEYS:
        if key in config and config[key] != value:
            raise ValueError(f"{source}: {key} is {config[key]!r}; v4train implements only {value!r}")
    base = defaults or ModelConfig.preset("flash")
    values = {f: getattr(base, f) for f in ("bias_update_speed", "balance_loss_weight", "init_std", "qat")}
    for field, key in _PLAIN_KEYS.items():
        if key == "num_nextn_predict_layers":
            values[field] = config.get(key, 0)
        else:
            values[field] = need(key)
    ratios = need("compress_ratios")
    n_layers = values["n_layers"]
    if isinstance(ratios, list) and len(ratios) == n_layers:  # some configs omit the MTP entries (SWA)
        ratios = ratios + [0] * values["mtp_depth"]
    values["compress_ratios"] = tuple(ratios) if isinstance(ratios, list) else ratios
    scaling = config.get("rope_scaling") or {}
    kind = scaling.get("type", scaling.get("rope_type"))
    if scaling and kind != "yarn":
        raise ValueError(f"{source}: rope_scaling type {kind!r}; v4train implements only 'yarn'")
    if scaling:
        values.update(rope_factor=float(scaling["factor"]),
                      original_seq_len=int(scaling["original_max_position_embeddings"]),
                      beta_fast=int(scaling.get("beta_fast", 32)), beta_slow=int(scaling.get("beta_slow", 1)))
    else:
        values.update(rope_factor=1.0, original_seq_len=0, beta_fast=32, beta_slow=1)
    try:
        return ModelConfig.from_dict(values)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{source}: {exc}") from None


_YARN_FIELDS = ("rope_factor", "beta_fast", "beta_slow")


def architecture_mismatch(a: ModelConfig, b: ModelConfig) -> str | None:
    """The first :data:`ARCHITECTURE_FIELDS` field where ``a`` and ``b`` compute differently, else None
    (the YaRN fields are inert, and so not compared, while both have ``original_seq_len == 0``)."""
    for field in ARCHITECTURE_FIELDS:
        if field in _YARN_FIELDS and a.original_seq_len == 0 and b.original_seq_len == 0:
            continue
        if getattr(a, field) != getattr(b, field):
            return field
    return None
