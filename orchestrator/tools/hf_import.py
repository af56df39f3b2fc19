"""Reading a Hugging Face DeepSeek-V4 directory into a committed model-only v4train checkpoint
(``v4train convert from-hf``; the format and the errors are described in :mod:`orchestrator.tools.convert`).
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

from v4train.model.config import ModelConfig
from v4train.model.hf_mapping import SHARED_MTP_COPIES, from_hf_name, hf_tensors, model_config_from_hf
from v4train.model.quant import dequantize_fp8_blocks, unpack_fp4
from v4train.orchestrator import checkpoint
from v4train.orchestrator.checkpoint.storage import Storage


__all__ = ["ConvertError", "from_hf", "read_hf_config", "INDEX_FILE", "SINGLE_FILE", "TOKENIZER_FILES"]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


class ConvertError(ValueError):
    """A conversion input is invalid; the message is one line naming the file or tensor."""


# ------------------------------------------------------------------ reading a Hugging Face directory
def read_hf_config(hf_dir: Path, defaults: ModelConfig | None = None) -> ModelConfig:
    """The ModelConfig of ``hf_dir/config.json``; ConvertError naming the file and key."""
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ConvertError(f"{path}: not found")
    try:
        return model_config_from_hf(json.loads(path.read_text()), source=str(path), defaults=defaults)
    except (ValueError, TypeError) as exc:
        raise ConvertError(str(exc)) from None


def _shard_files(hf_dir: Path) -> dict[str, Path]:
    """Tensor name -> file, from the index (every shard it names must exist) or the single file."""
    from safetensors import safe_open

    index = hf_dir / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConvertError(f"{index}: no weight_map")
        files = {name: hf_dir / shard for name, shard in weight_map.items()}
        for name, file in files.items():
            if not file.is_file():
                raise ConvertError(f"{file}: shard named in {INDEX_FILE} (for tensor {name}) does not exist")
        listed: dict[str, Path] = {}
        for file in sorted(set(files.values())):
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    listed[name] = file
        for name, file in files.items():
            if listed.get(name) != file:
                raise ConvertError(f"{file}: lacks tensor {name}, which {INDEX_FILE} places there")
        return listed
    single = hf_dir / SINGLE_FILE
    if not single.is_file():
        raise ConvertError(f"{hf_dir}: neither {INDEX_FILE} nor {SINGLE_FILE}")
    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}


def _scale_name(name: str) -> str:
    return name.removesuffix(".weight") + ".scale"


def _check_hf_tensors(cfg: ModelConfig, files: dict[str, Path]) -> None:
    """Every tensor known, present, of the expected (logical) shape, quantised ones with their scale."""
    from safetensors import safe_open

    expected = hf_tensors(cfg)
    scales = {_scale_name(n) for n in expected if n.endswith(".weight")}
    for name, file in files.items():
        if name not in expected and name not in scales and not SHARED_MTP_COPIES.match(name):
            raise ConvertError(f"{file}: unknown tensor {name} (not part of a DeepSeek-V4 model of this config.json)")
    for name, spec in expected.items():
        if name not in files:
            raise ConvertError(f"tensor {name} is missing from the checkpoint")
        with safe_open(str(files[name]), framework="pt") as f:
            meta = f.get_slice(name)
            shape, dtype = tuple(meta.get_shape()), meta.get_dtype()
        if dtype in ("F8_E4M3", "I8", "U8") and _scale_name(name) not in files:
            raise ConvertError(f"{files[name]}: {name} is quantised ({dtype}) but {_scale_name(name)} is missing")
        if dtype in ("I8", "U8"):  # packed FP4: two codes per byte along the input dim
            shape = (*shape[:-1], 2 * shape[-1])
        if shape != spec.shape:
            raise ConvertError(f"{files[name]}: {name} has shape {list(shape)}, config.json implies {list(spec.shape)}")


def _dequantised(name: str, files: dict[str, Path], handles: dict) -> torch.Tensor:
    """Tensor ``name`` as fp32 (int32 for the routing table), its scale applied exactly."""
    tensor = handles[files[name]].get_tensor(name)
    if tensor.dtype == torch.float8_e4m3fn:
        scale_name = _scale_name(name)
        return dequantize_fp8_blocks(tensor, handles[files[scale_name]].get_tensor(scale_name))
    if tensor.dtype in (torch.int8, torch.uint8) and name.endswith(".weight"):
        scale_name = _scale_name(name)
        return unpack_fp4(tensor, handles[files[scale_name]].get_tensor(scale_name))
    if not tensor.is_floating_point():
        return tensor.to(torch.int32)
    return tensor.float()


class _Handles(dict):
    """Open safetensors files by path, opened on first use."""

    def __missing__(self, path: Path):
        from safetensors import safe_open

        handle = safe_open(str(path), framework="pt")
        self[path] = handle
        return handle


def from_hf(hf_dir: str | Path, root: str | Path, *, defaults: ModelConfig | None = None) -> str:
    """Convert ``hf_dir`` into a committed model-only checkpoint under the local directory ``root``.

    Returns the committed step directory name (``step_00000000``). Raises ConvertError (nothing written)
    for invalid input, or when ``root`` already holds a committed checkpoint.
    """
    hf_dir, root = Path(hf_dir), Path(root)
    if not hf_dir.is_dir():
        raise ConvertError(f"{hf_dir}: not a directory")
    cfg = read_hf_config(hf_dir, defaults)
    files = _shard_files(hf_dir)
    _check_hf_tensors(cfg, files)
    storage = Storage(str(root))
    if root.exists() and checkpoint.latest_committed(storage) is not None:
        raise ConvertError(f"{root}: already holds a committed checkpoint; choose an empty --out")
    root.mkdir(parents=True, exist_ok=True)
    attempt = checkpoint.begin_attempt(storage, 0)
    try:
        _write_model_dcp(root / attempt, cfg, files)
        name = checkpoint.commit(storage, attempt, 0, {
            "step": 0, "consumed_tokens": 0, "consumed_samples": 0, "model_only": True,
            "model": cfg.to_dict(), "layout": {"tp": 1, "pp": 1, "ep": 1, "dp": 1},
            "source": {"format": "huggingface", "path": str(hf_dir.resolve())},
        })
    except BaseException:
        shutil.rmtree(root / attempt, ignore_errors=True)
        raise
    tokenizer = root / "tokenizer"
    tokenizer.mkdir(exist_ok=True)
    for file in TOKENIZER_FILES:
        if (hf_dir / file).is_file():
            shutil.copyfile(hf_dir / file, tokenizer / file)
    return name


def _write_model_dcp(attempt: Path, cfg: ModelConfig, files: dict[str, Path]) -> None:
    """One DCP save per input shard (``__<i>_0.distcp``), then one ``.metadata`` naming them all: the
    layout a multi-rank save produces, so every checkpoint reader accepts it."""
    handles = _Handles()
    by_file: dict[Path, list[str]] = {}
    for name in hf_tensors(cfg):
        by_file.setdefault(files[name], []).append(name)
    merged = None
    for i, (_, names) in enumerate(sorted(by_file.items())):
        state = {f"model.{from_hf_name(n)}": _dequantised(n, files, handles) for n in names}
        part = attempt / f".part-{i}"
        dcp.save(state, storage_writer=FileSystemWriter(str(part)), no_dist=True)
        meta = FileSystemReader(str(part)).read_metadata()
        renamed = {}
        for key, info in meta.storage_data.items():
            target = f"__{i}_0.distcp"
            if not (attempt / target).exists():
                (part / info.relative_path).rename(attempt / target)
            renamed[key] = dataclasses.replace(info, relative_path=target)
        shutil.rmtree(part)
        if merged is None:
            merged = dataclasses.replace(meta, storage_data=renamed)
        else:
            merged.state_dict_metadata.update(meta.state_dict_metadata)
            merged.storage_data.update(renamed)
        del state
    with open(attempt / ".metadata", "wb") as f:
        pickle.dump(merged, f)


