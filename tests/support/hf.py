"""Builders for the Hugging Face conversion tests (not a test module): a tiny V4 with random weights and
a checkpoint directory in the released layout (FP8 e4m3 linears with 128x128 ue8m0 scales, FP4 e2m1
experts with 1x32 scales, bf16/fp32/int32 elsewhere), written with safetensors."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from v4train.model import ModelConfig, V4Stage
from v4train.model.hf_mapping import hf_config, hf_tensors, to_hf_name
from v4train.model.quant import pack_fp4, quantize_fp8_blocks


def tiny_config(**overrides) -> ModelConfig:
    """SWA, CSA, HCA (m'=16), CSA + an SWA MTP block; hash layers 0-1; expert dims multiples of 32 (FP4)."""
    base = dict(vocab_size=512, dim=64, n_layers=4, mtp_depth=1, compress_ratios=(0, 4, 16, 4, 0), n_heads=2,
                head_dim=32, rope_head_dim=8, q_lora_rank=32, o_groups=2, o_lora_rank=32, window=16,
                index_n_heads=16, index_head_dim=16, index_topk=4, n_routed_experts=4, n_activated_experts=2,
                moe_inter_dim=64, n_hash_layers=2, init_std=0.02)
    return ModelConfig.preset("nano", **{**base, **overrides})


def random_stage(cfg: ModelConfig, seed: int = 0, scale: float = 0.1) -> V4Stage:
    """A whole-model stage, parameters and learned-router biases random."""
    stage = V4Stage(cfg, pp_rank=0, pp_size=1)
    stage.init_weights(seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in stage.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
        for name, b in stage.named_buffers():
            if name.endswith("gate.bias"):
                b.copy_(torch.randn(b.shape, generator=gen) * 0.01)
    return stage


def released_tensors(stage: V4Stage, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The released storage of a stage: FP8 / FP4 / bf16 / fp32 / int32 by tensor kind, scales included."""
    state = {to_hf_name(k): v for k, v in stage.state_dict().items() if isinstance(v, torch.Tensor)}
    out = {}
    for name, spec in hf_tensors(cfg).items():
        value = state[name]
        scale_name = name.removesuffix(".weight") + ".scale"
        if spec.kind == "fp8":
            out[name], out[scale_name] = quantize_fp8_blocks(value)
        elif spec.kind == "fp4":
            out[name], out[scale_name] = pack_fp4(value)
        elif spec.kind == "bf16":
            out[name] = value.to(torch.bfloat16)
        elif spec.kind == "int32":
            out[name] = value.to(torch.int32)
        else:
            out[name] = value.float()
    return {k: v.contiguous() for k, v in out.items()}


def write_hf_dir(tensors: dict[str, torch.Tensor], cfg: ModelConfig, out: Path, *, shards: int = 2,
                 tokenizer: Path | None = None) -> Path:
    """Write ``tensors`` as ``shards`` safetensors files with an index, config.json and the tokenizer."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, str(out / file))
        weight_map.update(dict.fromkeys(part, file))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = hf_config(cfg, extra={"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                                                          "weight_block_size": [128, 128]},
                                   "expert_dtype": "fp4"})
    (out / "config.json").write_text(json.dumps(config))
    if tokenizer is not None:
        (out / "tokenizer.json").write_bytes(tokenizer.read_bytes())
    return out
