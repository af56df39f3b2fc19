"""``v4train convert from-hf / to-hf``: exact dequantisation of the released formats, bitwise round trips,
transformers reading the export, and bad input refused with one line and nothing written."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from support.hf import random_stage, released_tensors, tiny_config, write_hf_dir
from v4train.model import V4Stage
from v4train.model.hf_mapping import from_hf_name, hf_tensors
from v4train.model.quant import dequantize_fp8_blocks, unpack_fp4
from v4train.orchestrator.checkpoint import init_from
from v4train.orchestrator.tools import convert
from v4train.orchestrator.tools.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    cfg = tiny_config()
    tensors = released_tensors(random_stage(cfg), cfg)
    hf_dir = write_hf_dir(tensors, cfg, tmp_path_factory.mktemp("rel") / "hf")
    root = tmp_path_factory.mktemp("imported") / "root"
    convert.from_hf(hf_dir, root)
    return cfg, tensors, hf_dir, root


def _loaded(cfg, root) -> dict[str, torch.Tensor]:
    stage = V4Stage(cfg, pp_rank=0, pp_size=1)
    init_from.load_model(str(root), stage)
    return stage.state_dict()


def test_released_codes_decode_as_specified():
    """Independent of our packer: byte 0x71 holds e2m1 code 1 (0.5) in the low nibble, first, and code 7 (6.0)
    in the high one; ue8m0 byte 128 is 2^1; an e4m3 block scaled by 2^-3 divides by 8."""
    packed = torch.tensor([[0x71] * 16], dtype=torch.uint8).view(torch.int8)
    scale = torch.tensor([[128]], dtype=torch.uint8).view(torch.float8_e8m0fnu)
    assert unpack_fp4(packed, scale)[0, :2].tolist() == [1.0, 12.0]
    q = torch.full((3, 5), 3.0).to(torch.float8_e4m3fn)
    s = torch.tensor([[124]], dtype=torch.uint8).view(torch.float8_e8m0fnu)
    assert torch.equal(dequantize_fp8_blocks(q, s), torch.full((3, 5), 3.0 / 8))


def test_from_hf_dequantises_every_tensor_exactly(released):
    cfg, tensors, hf_dir, root = released
    state = _loaded(cfg, root)
    kinds = set()
    for name, spec in hf_tensors(cfg).items():
        value, scale = tensors[name], tensors.get(name.removesuffix(".weight") + ".scale")
        if value.dtype == torch.float8_e4m3fn:
            expected = dequantize_fp8_blocks(value, scale)
        elif value.dtype == torch.int8:
            expected = unpack_fp4(value, scale)
        else:
            expected = value.float() if value.is_floating_point() else value
        assert torch.equal(state[from_hf_name(name)].to(expected.dtype), expected), name
        kinds.add(spec.kind)
    assert kinds == {"fp8", "fp4", "bf16", "fp32", "int32"}
    meta = json.loads((root / "step_00000000" / "train_state.json").read_text())
    assert meta["model_only"] and meta["model"]["dim"] == cfg.dim
    assert main(["ckpt", "verify", str(root)]) == 0


def test_round_trips_are_bitwise(released, tmp_path):
    """checkpoint -> fp32 HF -> checkpoint gives the same tensors bit for bit; HF (bf16) -> checkpoint ->
    HF (bf16) gives the same bf16 tensors; an fp8 export re-imports to its own FP8 values."""
    from safetensors.torch import load_file

    cfg, _, _, root = released
    original = _loaded(cfg, root)
    convert.to_hf(root, tmp_path / "hf32", dtype="fp32", max_shard_bytes=64 << 10)
    assert len(list((tmp_path / "hf32").glob("*.safetensors"))) > 1  # streamed over several shards
    convert.from_hf(tmp_path / "hf32", tmp_path / "root32")
    again = _loaded(cfg, tmp_path / "root32")
    assert original.keys() == again.keys()
    assert all(torch.equal(original[k], again[k]) for k in original)

    convert.to_hf(root, tmp_path / "hf16", dtype="bf16")
    convert.from_hf(tmp_path / "hf16", tmp_path / "root16")
    convert.to_hf(tmp_path / "root16", tmp_path / "hf16b", dtype="bf16")
    first, second = (load_file(str(next((tmp_path / d).glob("*.safetensors")))) for d in ("hf16", "hf16b"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert first["embed.weight"].dtype == torch.bfloat16 and first["layers.2.ffn.gate.bias"].dtype == torch.float32
    assert first["layers.0.ffn.gate.tid2eid"].dtype == torch.int32

    assert main(["convert", "to-hf", str(root), "--out", str(tmp_path / "hf8"), "--dtype", "fp8"]) == 0
    fp8 = load_file(str(next((tmp_path / "hf8").glob("*.safetensors"))))
    assert fp8["layers.1.attn.wq_b.weight"].dtype == torch.float8_e4m3fn
    assert fp8["layers.1.attn.wq_b.scale"].dtype == torch.float8_e8m0fnu
    assert json.loads((tmp_path / "hf8" / "config.json").read_text())["quantization_config"]["scale_fmt"] == "ue8m0"
    convert.from_hf(tmp_path / "hf8", tmp_path / "root8")
    w = _loaded(cfg, tmp_path / "root8")["layers.1.attn.wq_b.weight"]
    assert torch.equal(w, dequantize_fp8_blocks(fp8["layers.1.attn.wq_b.weight"], fp8["layers.1.attn.wq_b.scale"]))


def test_transformers_loads_the_export_and_matches_v4train(released, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg, _, _, root = released
    out = convert.to_hf(root, tmp_path / "hf", dtype="bf16")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    convert.from_hf(out, tmp_path / "back")  # the exported (bf16) weights, as v4train reads them
    stage = V4Stage(cfg, pp_rank=0, pp_size=1)
    init_from.load_model(str(tmp_path / "back"), stage)
    stage.eval()
    stage.attention_mode = "sparse"
    ids = torch.randint(0, cfg.vocab_size, (1, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = stage(ids, torch.arange(48).unsqueeze(0))
        theirs = hf(input_ids=ids).logits
        assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()
        generated = hf.generate(ids[:, :8], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 12)


def _expect_refusal(hf_dir, tmp_path, needle: str) -> None:
    out = tmp_path / "root"
    with pytest.raises(convert.ConvertError, match=needle) as info:
        convert.from_hf(hf_dir, out)
    assert "\n" not in str(info.value)
    assert not out.exists()  # nothing written


def _variant(released, out, drop=(), add=None, config=None):
    """A one-file copy of the released tiny checkpoint without ``drop``, with ``add`` and config edits."""
    cfg, tensors, _, _ = released
    tensors = {k: v for k, v in tensors.items() if k not in drop} | (add or {})
    out = write_hf_dir(tensors, cfg, out, shards=1)
    if config:
        (out / "config.json").write_text(json.dumps(json.loads((out / "config.json").read_text()) | config))
    return out


def test_bad_input_is_refused_naming_the_file_or_tensor(released, tmp_path):
    cfg, tensors, hf_dir, _ = released
    # a shard the index names that does not exist
    missing_shard = tmp_path / "missing"
    missing_shard.mkdir()
    for f in hf_dir.iterdir():
        (missing_shard / f.name).write_bytes(f.read_bytes())
    (missing_shard / "model-00002-of-00002.safetensors").unlink()
    _expect_refusal(missing_shard, tmp_path, "model-00002-of-00002.safetensors: shard named in")
    cases = [
        (dict(add={"layers.1.attn.attn_sink": torch.zeros(3)}), "layers.1.attn.attn_sink has shape"),
        (dict(add={"layers.1.attn.wq_c.weight": torch.zeros(2, 2)}), "unknown tensor layers.1.attn.wq_c.weight"),
        (dict(drop=["layers.3.ffn.gate.bias"]), "tensor layers.3.ffn.gate.bias is missing"),
        (dict(drop=["layers.0.ffn.experts.1.w2.scale"]), "layers.0.ffn.experts.1.w2.scale is missing"),
        (dict(config={"scoring_func": "softmax"}), "scoring_func is 'softmax'"),
    ]
    for i, (edit, needle) in enumerate(cases):
        case = tmp_path / f"case{i}"
        _expect_refusal(_variant(released, case / "hf", **edit), case, needle)


def test_cli_refuses_with_one_line(tmp_path, capsys):
    assert main(["convert", "from-hf", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nowhere: not a directory" in err


def test_init_from_refuses_a_job_whose_model_differs(released, tmp_path):
    """model.init_from with a model section that computes something else fails before any rank starts."""
    import yaml

    from v4train.orchestrator.spec import SpecError, load_job

    cfg, _, _, root = released
    model = {"preset": "nano", **cfg.to_dict(), "init_from": str(root)}
    job = {"data": {"path": str(tmp_path)}, "model": model,
           "train": {"steps": 1, "global_batch": 2, "micro_batch_size": 1, "lr": 1e-3}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    assert load_job(path, check_data=False).model.init_from == str(root)
    assert load_job(path, ["model.balance_loss_weight=0.0"], check_data=False)  # training-only: allowed
    with pytest.raises(SpecError, match=r"model\.o_lora_rank: the job has 16, model.init_from .* written for 32"):
        load_job(path, ["model.o_lora_rank=16"], check_data=False)
