"""Context parallelism through the trainer's rank step: step time, bytes and memory at CP = 1, 2, 4 for one
sequence length, one run.

Each point spawns ``cp`` gloo ranks; every rank runs the trainer's own rank object
(:class:`orchestrator.rank.trainer.RankTrainer`: Megatron's groups, the model stage on its CP share, the
loader, Megatron's schedule, the gradient sync over data x context parallel ranks, the global norm, Muon and
AdamW) for ``--steps`` optimizer steps of one curriculum stage in ``sparse`` mode at ``--seq-len`` tokens
(global batch ``--global-batch`` sequences of the prepared dataset), exactly as the supervisor drives it. It
reports, per rank, the median time of the steps after the first, the bytes it handed to ``torch.distributed``
per step (counted at the calls, as ``context_parallel.py`` does) split by the step's phase -- the forward and
backward (the CP exchanges, position ids and labels, the entries' gradients) and the rest (gradient sync,
norm, loss) -- the process's peak resident memory (model, optimizer, activations), and the step losses (equal
across cp within 1e-5 when the wiring is right).

    python benchmarks/context_parallel_trainer.py --seq-len 4096 --steps 3
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import torch.distributed as dist  # noqa: E402

from support.spawn import free_ports, spawn_ranks  # noqa: E402
from v4train.orchestrator.curriculum import plan_step  # noqa: E402
from v4train.orchestrator.spec import JobSpec  # noqa: E402
from v4train.parallel.context_parallel import exchange_bytes  # noqa: E402

SCHEDULE_PHASES = ("schedule", "forward")  # the heartbeat's phases while the forward and backward run


class _PhaseBytes:
    """Bytes this rank hands to torch.distributed's point-to-point and collective calls, by the trainer's
    heartbeat phase at the call (all-reduce counted as a ring: 2 (n - 1) / n of the buffer)."""

    def __init__(self, heartbeat):
        self.heartbeat = heartbeat
        self.bytes = {"forward_backward": 0.0, "rest": 0.0}
        self._saved = {}

    def _add(self, n: float) -> None:
        self.bytes["forward_backward" if self.heartbeat()["phase"] in SCHEDULE_PHASES else "rest"] += n

    def __enter__(self):
        for name in ("all_gather", "all_reduce", "P2POp"):
            self._saved[name] = getattr(dist, name)
        saved, add = self._saved, self._add

        def all_gather(parts, tensor, *a, **k):
            add(tensor.numel() * tensor.element_size() * (len(parts) - 1))
            return saved["all_gather"](parts, tensor, *a, **k)

        def all_reduce(tensor, *a, **k):
            world = dist.get_world_size(k.get("group"))
            add(2 * (world - 1) / world * tensor.numel() * tensor.element_size())
            return saved["all_reduce"](tensor, *a, **k)

        def p2p(op, tensor, *a, **k):
            if op is dist.isend:
                add(tensor.numel() * tensor.element_size())
            return saved["P2POp"](op, tensor, *a, **k)

        dist.all_gather, dist.all_reduce, dist.P2POp = all_gather, all_reduce, p2p
        return self

    def __exit__(self, *exc):
        for name, fn in self._saved.items():
            setattr(dist, name, fn)


def _job(args, cp: int) -> JobSpec:
    return JobSpec.model_validate({
        "name": f"cp{cp}-bench", "seed": 1, "model": {"preset": args.preset, **json.loads(args.model)},
        "data": {"path": args.data, "seq_len": args.seq_len},
        "train": {"steps": args.steps, "global_batch": args.global_batch, "micro_batch_size": 1, "lr": 3e-3,
                  "eval_batches": 0},
        "parallel": {"cp": cp},
        "curriculum": {"stages": [{"seq_len": args.seq_len, "attention": "sparse"}], "batch_multiple": 1},
        "checkpoint": {"every_steps": 0, "at_end": False},
    })


def _rank(rank: int, job: JobSpec, port: int, out: str) -> None:
    from v4train.orchestrator.rank.trainer import RankTrainer

    trainer = RankTrainer(job, rank=rank, world_size=job.parallel.world_size,
                          init_method=f"tcp://127.0.0.1:{port}", timeout_s=1800)
    try:
        steps = []
        for step in range(1, job.train.steps + 1):
            with _PhaseBytes(lambda: trainer.heartbeat) as counted:
                start = time.perf_counter()
                metrics = trainer.train_step(plan_step(job, step))
                seconds = time.perf_counter() - start
            steps.append({"s": seconds, "loss": metrics["loss"], **counted.bytes})
        Path(out, f"rank{rank}.json").write_text(json.dumps({
            "steps": steps, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    finally:
        trainer.close()


def measure(args, cp: int) -> dict:
    job = _job(args, cp)
    with tempfile.TemporaryDirectory() as tmp:
        spawn_ranks(_rank, (job, free_ports(1)[0], tmp), cp, deadline_s=3600, what=f"cp={cp} trainer")
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(cp)]
    warm = [r["steps"][1:] or r["steps"] for r in ranks]
    cfg = job.model.build()
    return {
        "cp": cp, "seq_len": args.seq_len, "global_batch": args.global_batch,
        "step_s": max(statistics.median(s["s"] for s in steps) for steps in warm),
        "forward_backward_bytes": max(steps[-1]["forward_backward"] for steps in warm),
        "rest_bytes": max(steps[-1]["rest"] for steps in warm),
        "ring_attention_bytes": exchange_bytes(cfg, args.seq_len, cp, batch=args.global_batch)["ring_attention"],
        "peak_rss_mib": max(r["peak_rss_mib"] for r in ranks),
        "losses": [s["loss"] for s in ranks[0]["steps"]],  # one stage: every rank holds the global mean
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT / "datasets" / "shakespeare"))
    parser.add_argument("--preset", default="nano")
    parser.add_argument("--model", default="{}", help="JSON overrides of the preset")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--global-batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--cps", default="1,2,4")
    parser.add_argument("--out", default=str(ROOT / "runs" / "context_parallel_trainer.json"))
    args = parser.parse_args(argv)
    points = []
    for cp in (int(c) for c in args.cps.split(",")):
        points.append(measure(args, cp))
        print(json.dumps(points[-1]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(points, indent=2))
    return points


if __name__ == "__main__":
    main()
