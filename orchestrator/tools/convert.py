"""``v4train convert``: Hugging Face DeepSeek-V4 checkpoints in and out.

``from-hf HF_DIR --out ROOT`` reads a released-layout directory (``config.json``, ``model.safetensors``
or shards listed in ``model.safetensors.index.json``, tokenizer files), dequantises every tensor exactly
to fp32 (FP8 e4m3 with 128x128 ue8m0 block scales, FP4 e2m1 experts with 1x32 scales:
``model/quant.py``), maps the names (``model/hf_mapping.py``) and writes a committed v4train checkpoint
``ROOT/step_00000000`` holding the model only (``model.<fqn>`` tensors, no optimizer state) through the
checkpoint module's commit protocol, plus ``ROOT/tokenizer/``. ``train_state.json`` records the
ModelConfig as ``model`` and ``model_only: true``; a job starts from it with ``model.init_from: ROOT``.

``to-hf RUN_DIR_OR_ROOT [--step N] --out HF_DIR [--dtype bf16|fp8|fp32]`` writes ``config.json``,
size-capped safetensors shards with ``model.safetensors.index.json`` and the tokenizer, under the
released names (MTP blocks included, which transformers skips on load). ``bf16`` keeps the released
fp32 tensors (``ape``, sinks, gate bias, ``hc_*``) in fp32 and the routing table in int32; ``fp8``
additionally stores the released FP8 linears *and the routed experts* as e4m3 with 128x128 ue8m0 block
scales (``quantization_config`` as released; experts are not re-quantised to FP4, which would lose
precision a trained model did not learn to tolerate); ``fp32`` stores every float tensor in fp32, so
``to-hf`` then ``from-hf`` returns the trained tensors bit for bit.

Both directions stream: one input shard (from-hf) or one output shard (to-hf) is in memory at a time.
Bad input is refused before anything is written, with one line naming the file or tensor
(:class:`ConvertError`): a shard the index names that does not exist, an unknown or missing tensor, a
wrong shape, a quantised weight without its scale, a config v4train cannot represent.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import shutil
import sys
import uuid
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

from v4train.model.config import ModelConfig
from v4train.model.hf_mapping import SHARED_MTP_COPIES, from_hf_name, hf_config, hf_tensors, model_config_from_hf
from v4train.model.quant import dequantize_fp8_blocks, quantize_fp8_blocks, unpack_fp4
from v4train.orchestrator import checkpoint
from v4train.orchestrator.checkpoint.storage import Storage

__all__ = ["ConvertError", "from_hf", "to_hf", "read_hf_config", "add_cli_arguments", "run_cli",
           "TOKENIZER_FILES", "FP8_QUANTIZATION_CONFIG"]

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
FP8_QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "scale_fmt": "ue8m0",
                           "weight_block_size": [128, 128], "activation_scheme": "dynamic"}
_FLOAT_OUT = {"bf16": torch.bfloat16, "fp32": torch.float32}


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


# ------------------------------------------------------------------ writing a Hugging Face directory
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


# ------------------------------------------------------------------ command line
def add_cli_arguments(sub) -> None:
    """Register ``convert from-hf`` and ``convert to-hf`` on the top-level subparsers."""
    convert = sub.add_parser("convert", help="import a Hugging Face DeepSeek-V4 checkpoint, or export one")
    conv_sub = convert.add_subparsers(dest="convert_command", required=True)
    src = conv_sub.add_parser("from-hf", help="HF directory -> committed model-only v4train checkpoint")
    src.add_argument("hf_dir", help="directory with config.json, safetensors (and an index) and the tokenizer")
    src.add_argument("--out", required=True, help="checkpoint root to create (a job reads it with model.init_from)")
    dst = conv_sub.add_parser("to-hf", help="committed v4train checkpoint -> HF directory")
    dst.add_argument("path", help="a run directory or a checkpoint root")
    dst.add_argument("--step", type=int, help="committed step to export (default: the newest)")
    dst.add_argument("--out", required=True, help="HF directory to write (must not exist or be empty)")
    dst.add_argument("--dtype", choices=("bf16", "fp8", "fp32"), default="bf16",
                     help="bf16 (default), fp8 (e4m3 with 128x128 ue8m0 scales, as released) or fp32 (lossless)")
    dst.add_argument("--max-shard-mb", type=int, default=4096, help="size cap of one safetensors shard (MB)")


def run_cli(args) -> int:
    """Run a parsed ``convert`` command; one line on stderr and exit code 2 for bad input."""
    try:
        if args.convert_command == "from-hf":
            name = from_hf(args.hf_dir, args.out)
            print(f"v4train: wrote {Path(args.out) / name} (model only); start a job from it with "
                  f"model.init_from: {args.out}")
        else:
            out = to_hf(args.path, args.out, step=args.step, dtype=args.dtype, max_shard_bytes=args.max_shard_mb << 20)
            print(f"v4train: wrote {out} (transformers.AutoModelForCausalLM.from_pretrained reads it)")
    except (ConvertError, checkpoint.CheckpointError) as exc:
        print(f"v4train: error: {exc}", file=sys.stderr)
        return 2
    return 0
