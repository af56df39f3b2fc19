"""FP8 convergence: the demo job trained once in fp32 and once with emulated blockwise FP8 (parallel/fp8.py).

Single process (no Ray, no torch.distributed). Both runs use the demo's model, data, schedule and seed
(configs/demo.yaml: nano on Shakespeare, 300 steps x 16 sequences x 256 tokens, the job's optimizer (Muon
+ AdamW) at lr 3e-3 with 30 warmup steps and a cosine to 0.1x, weight decay 0.1, gradient clip 1.0), the same
initial weights (``V4Stage.init_weights(seed)``) and the same batches (``GlobalBatchLoader`` with the data seed). A step
runs ``global_batch / micro_batch_size`` micro-batches and averages their mean per-token losses, as the
trainer does over its data-parallel ranks. The final loss of a run is the mean training loss (nats,
main next-token cross-entropy) of its last ``--last`` steps; the JSON also holds every step's loss and
the mean step time.

    python benchmarks/fp8_convergence.py                       # the full comparison (300 steps each)
    python benchmarks/fp8_convergence.py --steps 5 --last 2    # smoke run: a 5-step schedule

``--steps`` overrides ``train.steps``, so the learning-rate schedule is that of a run of that length.
The dataset must exist (``v4train prepare-data --source shakespeare --out datasets/shakespeare``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from v4train.data.loader import GlobalBatchLoader, TokenDataset  # noqa: E402
from v4train.model import V4Stage  # noqa: E402
from v4train.model.moe import discard_expert_counts, update_expert_bias  # noqa: E402
from v4train.orchestrator.curriculum import plan_step  # noqa: E402
from v4train.orchestrator.spec import JobSpec, SpecError, load_job  # noqa: E402
from v4train.parallel.fp8 import enable_fp8  # noqa: E402
from v4train.parallel.optim import build_optimizer, clip_grad_norm_  # noqa: E402


def train(job: JobSpec, *, fp8: bool, log_every: int) -> dict:
    """Train ``job.train.steps`` steps in one process; return per-step losses (nats) and timings (s)."""
    data = TokenDataset.open(job.data.path, "train")
    torch.manual_seed(job.seed)
    stage = V4Stage(job.model.build(vocab_size=data.vocab_size), pp_rank=0, pp_size=1)
    stage.init_weights(job.seed)
    swapped = enable_fp8(stage) if fp8 else []
    t = job.train
    optimizer = build_optimizer(list(stage.named_parameters()), algorithm=t.optimizer, lr=t.lr,
                                weight_decay=t.weight_decay, betas=tuple(t.adam_betas), eps=t.adam_eps,
                                momentum=t.muon_momentum)
    params = [p for p in stage.parameters() if p.requires_grad]
    loader = GlobalBatchLoader(data, seed=job.data.seed)
    losses, step_times, skipped = [], [], 0
    for step in range(1, t.steps + 1):
        start = time.perf_counter()
        plan = plan_step(job, step)
        batch = loader.next_batch(plan.global_batch, plan.seq_len, 0, 1)
        n_micro = plan.global_batch // plan.micro_batch_size
        stage.aux_loss_scale = 1.0 / n_micro
        stage.attention_mode = plan.attention_mode
        stage.mtp_loss_weight = plan.mtp_loss_weight
        optimizer.zero_grad(set_to_none=False)
        micro_losses = []
        for i in range(0, plan.global_batch, plan.micro_batch_size):
            rows = slice(i, i + plan.micro_batch_size)
            ids, pos, labels = (torch.from_numpy(a[rows].copy())
                                for a in (batch.input_ids, batch.position_ids, batch.labels))
            loss = stage(ids, pos, labels).mean()
            (loss / n_micro).backward()
            micro_losses.append(loss.item())
        stage.pop_aux_metrics()
        grad_norm = clip_grad_norm_(params, t.grad_clip, None)
        if math.isfinite(grad_norm):
            update_expert_bias(stage, None)
            for group in optimizer.param_groups:
                group["lr"] = plan.lr
            optimizer.step()
        else:  # the trainer's rule: a non-finite step changes nothing
            discard_expert_counts(stage)
            skipped += 1
        losses.append(sum(micro_losses) / n_micro)
        step_times.append(time.perf_counter() - start)
        if log_every and (step % log_every == 0 or step == t.steps):
            print(f"{'fp8 ' if fp8 else 'fp32'} step {step:4d}  loss {losses[-1]:.4f}  lr {plan.lr:.2e}  "
                  f"grad_norm {grad_norm:.3f}  {step_times[-1]:.2f} s", flush=True)
    return {"losses": losses, "step_times_s": step_times, "skipped_steps": skipped, "fp8_linears": len(swapped)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", default=str(ROOT / "configs" / "demo.yaml"), help="job YAML (default: the demo)")
    parser.add_argument("--steps", type=int, default=None, help="override train.steps (default: the job's, 300)")
    parser.add_argument("--last", type=int, default=10, help="steps averaged into the final loss")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="further job overrides")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--out", default=str(ROOT / "runs" / "fp8_convergence.json"))
    args = parser.parse_args(argv)
    overrides = list(args.set) + ([f"train.steps={args.steps}"] if args.steps is not None else [])
    if not any(o.startswith("data.path=") for o in overrides):
        overrides.append(f"data.path={ROOT / 'datasets' / 'shakespeare'}")  # independent of the cwd
    try:
        job = load_job(args.job, overrides)
    except SpecError as exc:  # e.g. the dataset is missing: one line, naming the field
        parser.error(str(exc))
    if args.last < 1 or args.last > job.train.steps:
        parser.error(f"--last {args.last}: must be in 1..{job.train.steps} (the number of steps)")
    torch.set_num_threads(args.threads)

    runs = {name: train(job, fp8=name == "fp8", log_every=args.log_every) for name in ("fp32", "fp8")}
    for run in runs.values():
        run["final_loss"] = sum(run["losses"][-args.last:]) / args.last
        run["mean_step_s"] = sum(run["step_times_s"]) / len(run["step_times_s"])
    result = {
        "job": args.job, "overrides": overrides, "steps": job.train.steps, "last": args.last,
        "threads": args.threads, "seed": job.seed,
        "final_loss_fp32": runs["fp32"]["final_loss"], "final_loss_fp8": runs["fp8"]["final_loss"],
        "difference_nats": runs["fp8"]["final_loss"] - runs["fp32"]["final_loss"],
        "step_time_ratio": runs["fp8"]["mean_step_s"] / runs["fp32"]["mean_step_s"],
        "runs": runs,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
