"""Released weights in, fine-tuned on the simulated cluster, served by transformers (Ray rank pool).

1. A tiny checkpoint in the released format (FP8 / FP4 with scales) imports with ``convert from-hf``,
   a job starts from it with ``model.init_from`` on (TP, PP, EP, DP) = (1, 2, 1, 2) (its first loss is
   the imported model's loss on that batch) and the loss falls; ``to-hf`` exports the result and
   transformers' forward on the export equals v4train's (1e-5), and ``generate`` runs.
2. A checkpoint trained under (2, 2, 1, 1) (tensor and pipeline parallel on the 4-rank pool) exports and,
   reloaded at (1, 1, 1, 1) in one process, reproduces the run's validation loss.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from support.hf import random_stage, released_tensors, tiny_config, write_hf_dir
from support.jobs import run_job, tiny_job
from v4train.data.loader import GlobalBatchLoader, TokenDataset, eval_batches
from v4train.model import V4Stage
from v4train.orchestrator.checkpoint import init_from
from v4train.orchestrator.tools import convert

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _model_section(cfg, **extra) -> dict:
    return {"preset": "nano", **{k: v for k, v in cfg.to_dict().items()}, **extra}


def _stage_from(cfg, root) -> V4Stage:
    stage = V4Stage(cfg, pp_rank=0, pp_size=1)
    init_from.load_model(str(root), stage)
    return stage


@pytest.mark.timeout(900)
def test_released_checkpoint_finetunes_and_exports_for_transformers(rank_pool, tiny_dataset, tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = tiny_config(vocab_size=TokenDataset.open(str(tiny_dataset), "train").vocab_size)
    hf_in = write_hf_dir(released_tensors(random_stage(cfg, scale=0.05), cfg), cfg, tmp_path / "released",
                         tokenizer=tiny_dataset / "tokenizer.json")
    convert.from_hf(hf_in, tmp_path / "imported")
    job = tiny_job(tiny_dataset, model=_model_section(cfg, init_from=str(tmp_path / "imported")),
                   parallel={"tp": 1, "pp": 2, "ep": 1, "dp": 2},
                   train={"steps": 6, "warmup_steps": 1, "lr": 3e-3, "optimizer": "adamw"},
                   checkpoint={"every_steps": 0, "at_end": True})
    metrics, _, _ = run_job(rank_pool, job, tmp_path / "run")
    losses = [m["loss"] for m in metrics]
    # the first step trained the imported weights: its loss is theirs on the first global batch
    imported = _stage_from(cfg, tmp_path / "imported")
    imported.attention_mode = "dense"  # the job has no curriculum: it trains dense attention
    batch = GlobalBatchLoader(TokenDataset.open(str(tiny_dataset), "train"), seed=0).next_batch(8, 64, 0, 1)
    ids, pos, labels = (torch.from_numpy(a) for a in (batch.input_ids, batch.position_ids, batch.labels))
    with torch.no_grad():
        expected = imported(ids, pos, labels).mean().item()
    assert losses[0] == pytest.approx(expected, rel=1e-4)
    assert losses[-1] < losses[0] - 0.05, losses

    out = convert.to_hf(tmp_path / "run", tmp_path / "served", dtype="bf16")
    assert (out / "tokenizer.json").read_bytes() == (tiny_dataset / "tokenizer.json").read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    convert.from_hf(out, tmp_path / "served-back")
    stage = _stage_from(cfg, tmp_path / "served-back")
    stage.eval()
    stage.attention_mode = "sparse"
    with torch.no_grad():
        ours, theirs = stage(ids[:2], pos[:2]), hf(input_ids=ids[:2]).logits
        assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()
        assert hf.generate(ids[:1, :8], max_new_tokens=4, do_sample=False).shape == (1, 12)
    trained = stage.state_dict()["layers.2.attn.wq_b.weight"]
    assert not torch.equal(trained, imported.state_dict()["layers.2.attn.wq_b.weight"])


@pytest.mark.timeout(900)
def test_tensor_and_pipeline_parallel_checkpoint_exports_and_reloads_on_one_process(rank_pool, tiny_dataset, tmp_path):
    job = tiny_job(tiny_dataset, parallel={"tp": 2, "pp": 2, "ep": 1, "dp": 1},
                   train={"steps": 3, "eval_batches": 2}, checkpoint={"every_steps": 0, "at_end": True})
    _, _, supervisor = run_job(rank_pool, job, tmp_path / "run")
    convert.to_hf(tmp_path / "run", tmp_path / "hf", dtype="fp32")
    convert.from_hf(tmp_path / "hf", tmp_path / "back")
    storage, name = init_from.resolve(str(tmp_path / "back"))
    cfg = init_from.checkpoint_config(storage, name)
    stage = _stage_from(cfg, tmp_path / "back")
    stage.eval()
    stage.attention_mode = "dense"  # evaluation runs in the mode the job trained (no curriculum: dense)
    val = TokenDataset.open(str(tiny_dataset), "val")
    losses = []
    with torch.no_grad():
        for batch in eval_batches(val, 2, 8, 64, 0, 1):
            ids, pos, labels = (torch.from_numpy(a) for a in (batch.input_ids, batch.position_ids, batch.labels))
            losses.append(stage(ids, pos, labels).mean().item())
    assert sum(losses) / len(losses) == pytest.approx(supervisor.val_loss, rel=1e-5)
