"""Writing a committed v4train checkpoint as a Hugging Face DeepSeek-V4 directory (``v4train convert
to-hf``; the format is described in :mod:`orchestrator.tools.convert`).
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from v4train.model.config import ModelConfig
from v4train.model.hf_mapping import from_hf_name, hf_config, hf_tensors
from v4train.model.quant import quantize_fp8_blocks
from v4train.orchestrator import checkpoint
from v4train.orchestrator.checkpoint.storage import Storage


from v4train.orchestrator.tools.hf_import import INDEX_FILE, TOKENIZER_FILES, ConvertError, _scale_name

__all__ = ["to_hf", "FP8_QUANTIZATION_CONFIG"]

FP8_QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                           "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
_FLOAT_OUT = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _locate(path: Path, step: int | None) -> tuple[Storage, str]:
    """The checkpoint root and committed step directory for a run directory or a checkpoint root."""
    if not path.is_dir():
        raise ConvertError(f"{path}: not a run directory or checkpoint root")
    root = path
    if (path / "job.yaml").is_file():
        from v4train.orchestrator.spec import load_job

        job = load_job(path / "job.yaml", check_data=False)
        root = Path(job.checkpoint.root) if job.checkpoint.root else path
    storage = Storage(str(root))
    if step is not None:
        name = checkpoint.step_name(step)
        if not storage.exists(f"{name}/COMMIT"):
            raise ConvertError(f"--step: {storage.url_of(name)} is not a committed checkpoint")
        return storage, name
    name = checkpoint.latest_committed(storage)
    if name is None:
        raise ConvertError(f"{storage.url}: no committed checkpoint")
    return storage, name


def _model_config(state: dict, vocab_size: int) -> ModelConfig:
    """The ModelConfig a checkpoint was written for: a converted checkpoint records every field; a
    training checkpoint records the job's model section (vocabulary from the embedding's rows)."""
    model = state["model"]
    if "preset" in model:
        from v4train.orchestrator.spec import ModelSpec

        return ModelSpec(**model).build(vocab_size=vocab_size)
    return ModelConfig.from_dict(model)


def _hf_tensors_out(name: str, value: torch.Tensor, kind: str, dtype: str) -> dict[str, torch.Tensor]:
    if kind == "int32":
        return {name: value.to(torch.int32).contiguous()}
    if kind == "fp32":
        return {name: value.float().contiguous()}
    if dtype == "fp8" and kind in ("fp8", "fp4"):
        q, scale = quantize_fp8_blocks(value)
        return {name: q.contiguous(), _scale_name(name): scale.contiguous()}
    return {name: value.to(_FLOAT_OUT.get(dtype, torch.bfloat16)).contiguous()}


def to_hf(path: str | Path, out: str | Path, *, step: int | None = None, dtype: str = "bf16",
          max_shard_bytes: int = 4 << 30) -> Path:
    """Export a committed checkpoint (of a run directory or a checkpoint root) to ``out``.

    Writes into a temporary sibling of ``out`` and renames it at the end. Raises ConvertError when
    ``out`` exists and is not empty, the checkpoint is missing or uncommitted, or a tensor is absent.
    """
    if dtype not in ("bf16", "fp8", "fp32"):
        raise ConvertError(f"--dtype {dtype}: choose bf16, fp8 or fp32")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConvertError(f"--out: {out} exists and is not empty")
    storage, name = _locate(Path(path), step)
    try:
        state = checkpoint.verify(storage, name)
    except (checkpoint.CheckpointError, FileNotFoundError) as exc:
        raise ConvertError(str(exc)) from None
    reader = storage.dcp_reader(name)
    saved = reader.read_metadata().state_dict_metadata
    if "model.embed.weight" not in saved:
        raise ConvertError(f"{storage.url_of(name)}: lacks model.embed.weight")
    cfg = _model_config(state, int(saved["model.embed.weight"].size[0]))
    table = hf_tensors(cfg)
    for hf_name, spec in table.items():
        key = f"model.{from_hf_name(hf_name)}"
        if key not in saved:
            raise ConvertError(f"{storage.url_of(name)}: lacks {key}")
        if tuple(saved[key].size) != spec.shape:
            raise ConvertError(f"{storage.url_of(name)}: {key} has shape {list(saved[key].size)}, "
                               f"expected {list(spec.shape)}")
    partial = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    partial.mkdir(parents=True)
    try:
        _write_shards(partial, storage, name, saved, table, dtype, max_shard_bytes)
        config = hf_config(cfg, extra={"torch_dtype": "float32" if dtype == "fp32" else "bfloat16"})
        if dtype == "fp8":
            config["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
        _copy_tokenizer(Path(storage.url), state, partial, config)
        (partial / "config.json").write_text(json.dumps(config, indent=1))
        if out.exists():
            out.rmdir()
        partial.rename(out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out


def _write_shards(out: Path, storage: Storage, name: str, saved: dict, table: dict, dtype: str,
                  max_shard_bytes: int) -> None:
    from safetensors.torch import save_file

    groups: list[list[str]] = [[]]
    size = 0
    for hf_name, spec in table.items():
        nbytes = saved[f"model.{from_hf_name(hf_name)}"].properties.dtype.itemsize * int(torch.Size(spec.shape).numel())
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(hf_name)
        size += nbytes
    weight_map, total = {}, 0
    for i, names in enumerate(groups):
        keys = {f"model.{from_hf_name(n)}": n for n in names}
        state = {k: torch.empty(saved[k].size, dtype=saved[k].properties.dtype) for k in keys}
        dcp.load(state, storage_reader=storage.dcp_reader(name), no_dist=True)
        tensors = {}
        for key, hf_name in keys.items():
            tensors.update(_hf_tensors_out(hf_name, state.pop(key), table[hf_name].kind, dtype))
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        for tensor_name, tensor in tensors.items():
            weight_map[tensor_name] = file
            total += tensor.numel() * tensor.element_size()
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))


def _copy_tokenizer(root: Path, state: dict, out: Path, config: dict) -> None:
    """The tokenizer carried by ``from-hf`` (``ROOT/tokenizer/``), else the training dataset's; its
    ``<|endoftext|>`` id becomes the config's eos (and bos) token."""
    carried = root / "tokenizer"
    copied = False
    if carried.is_dir():
        for file in TOKENIZER_FILES:
            if (carried / file).is_file():
                shutil.copyfile(carried / file, out / file)
                copied = True
    elif state.get("data_path") and (Path(state["data_path"]) / "tokenizer.json").is_file():
        shutil.copyfile(Path(state["data_path"]) / "tokenizer.json", out / "tokenizer.json")
        (out / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}))
        copied = True
    if copied and (out / "tokenizer.json").is_file():
        vocab = json.loads((out / "tokenizer.json").read_text()).get("added_tokens", [])
        eos = next((t["id"] for t in vocab if t.get("content") == "<|endoftext|>"), None)
        if eos is not None:
            config.setdefault("eos_token_id", eos)
            config.setdefault("bos_token_id", eos)


