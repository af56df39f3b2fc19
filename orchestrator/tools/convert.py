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

import sys
from pathlib import Path

from v4train.orchestrator import checkpoint
from v4train.orchestrator.tools.hf_export import FP8_QUANTIZATION_CONFIG, to_hf
from v4train.orchestrator.tools.hf_import import TOKENIZER_FILES, ConvertError, from_hf, read_hf_config

__all__ = ["ConvertError", "from_hf", "to_hf", "read_hf_config", "add_cli_arguments", "run_cli",
           "TOKENIZER_FILES", "FP8_QUANTIZATION_CONFIG"]


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
