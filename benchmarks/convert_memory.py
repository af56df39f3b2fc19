"""Peak memory of ``v4train convert from-hf`` / ``to-hf`` against the checkpoint and shard sizes.

Writes a synthetic released-layout checkpoint (random FP8 / FP4 / bf16 tensors of every name
``model/hf_mapping.py`` lists for the config, ``--shards`` files, one file in memory at a time), then
runs each conversion in a fresh process and reports its peak RSS above the same process's RSS after the
imports (the baseline), next to the fp32 model size and the largest input shard. Streaming shows as an
increment near one shard's fp32 size, well below the whole model's.

    python benchmarks/convert_memory.py --out runs/bench/convert_memory [--layers 8 --dim 512 --shards 8]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

_CHILD = r"""
import json, resource, sys, warnings
warnings.filterwarnings("ignore")
from v4train.orchestrator.tools import convert
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
kind, src, dst = sys.argv[1:4]
if kind == "from":
    convert.from_hf(src, dst)
else:
    convert.to_hf(src, dst, dtype="bf16", max_shard_bytes=int(sys.argv[4]))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"baseline_mb": base / 1024, "peak_mb": peak / 1024}))
"""


def write_synthetic(cfg, out: Path, shards: int) -> dict:
    import torch
    from safetensors.torch import save_file

    from v4train.model.hf_mapping import hf_config, hf_tensors
    from v4train.model.quant import pack_fp4, quantize_fp8_blocks

    out.mkdir(parents=True, exist_ok=True)
    table = list(hf_tensors(cfg).items())
    per = -(-len(table) // shards)
    weight_map, shard_fp32 = {}, []
    gen = torch.Generator().manual_seed(0)
    for i in range(shards):
        tensors, fp32 = {}, 0
        for name, spec in table[i * per:(i + 1) * per]:
            if spec.kind == "int32":
                value = torch.randint(0, cfg.n_routed_experts, spec.shape, generator=gen, dtype=torch.int32)
            else:
                value = torch.randn(spec.shape, generator=gen) * 0.02
            fp32 += value.numel() * 4
            scale = name.removesuffix(".weight") + ".scale"
            if spec.kind == "fp8":
                tensors[name], tensors[scale] = quantize_fp8_blocks(value)
            elif spec.kind == "fp4":
                tensors[name], tensors[scale] = pack_fp4(value)
            elif spec.kind == "bf16":
                tensors[name] = value.to(torch.bfloat16)
            else:
                tensors[name] = value
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / file))
        weight_map.update(dict.fromkeys(tensors, file))
        shard_fp32.append(fp32)
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(hf_config(cfg)))
    return {"model_fp32_mb": sum(shard_fp32) / 2**20, "largest_shard_fp32_mb": max(shard_fp32) / 2**20}


def measure(kind: str, src: Path, dst: Path, extra: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, kind, str(src), str(dst), *extra], check=True,
                         capture_output=True, text=True).stdout.strip().splitlines()[-1]
    result = json.loads(out)
    result["increment_mb"] = result["peak_mb"] - result["baseline_mb"]
    return result


def main() -> None:
    from v4train.model import ModelConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench/convert_memory")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--shards", type=int, default=8)
    args = parser.parse_args()
    ratios = tuple((0, 4, 128, 4)[i % 4] for i in range(args.layers)) + (0,)
    cfg = ModelConfig.preset("flash", vocab_size=16384, dim=args.dim, n_layers=args.layers, compress_ratios=ratios,
                             n_heads=8, q_lora_rank=256, o_groups=4, o_lora_rank=256, index_n_heads=8,
                             n_routed_experts=args.experts, moe_inter_dim=512, n_hash_layers=2)
    root = Path(args.out)
    shutil.rmtree(root, ignore_errors=True)
    sizes = write_synthetic(cfg, root / "hf", args.shards)
    out_cap = str(int(sizes["largest_shard_fp32_mb"] * 2**20 / 2))  # output shards: half the largest input
    result = {"config": {"layers": args.layers, "dim": args.dim, "experts": args.experts, "shards": args.shards},
              **sizes,
              "from_hf": measure("from", root / "hf", root / "ckpt", []),
              "to_hf": measure("to", root / "ckpt", root / "exported", [out_cap])}
    (root / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
