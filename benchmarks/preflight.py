"""What preflight costs before any rank starts (``orchestrator/control/preflight.py``).

    python benchmarks/preflight.py                 # stdlib-docstring corpus, local root and moto S3, 5 rounds
    python benchmarks/preflight.py --scale 200     # the corpus 200 times over (same tokenizer): about 12 MB
    python benchmarks/preflight.py --data datasets/shakespeare --rounds 3

Times each check of ``preflight(job, root, resume_from)`` (median of ``--rounds``): the dataset (manifest, every
shard hashed, parsed and its token ids checked; tokenizer loaded), the checkpoint root (a probe object written
and removed: a local directory, then an S3 bucket on a moto server on 127.0.0.1), and a resume target (a
committed checkpoint of the tiny model, its files listed against the manifest and DCP's metadata). Prints the
dataset's size, so the dataset check's cost reads as a rate.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _median(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="a prepared dataset (default: a small standard-library corpus)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--scale", type=int, default=1, help="repeat the default corpus this many times")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from support.jobs import stdlib_dataset, stdlib_documents, tiny_job

    from v4train.orchestrator.control import preflight as pf
    from v4train.orchestrator.control.fake_group import FakeRankGroup, Script
    from v4train.orchestrator.control.supervisor import Supervisor
    from v4train.orchestrator.control.telemetry import Telemetry
    from v4train.orchestrator.spec import ClusterSpec, JobSpec

    tmp = Path(tempfile.mkdtemp(prefix="preflight-"))
    data = Path(args.data) if args.data else None
    if data is None:
        data = stdlib_dataset(tmp / "dataset", vocab_size=512)
        if args.scale > 1:
            data = stdlib_dataset(tmp / "big", documents=stdlib_documents() * args.scale,
                                  tokenizer=data / "tokenizer.json")
    vocab = json.loads((data / "dataset.json").read_text())["vocab_size"]
    shard_mb = sum(p.stat().st_size for p in data.glob("*.parquet")) / 1e6
    job = JobSpec.model_validate(tiny_job(data, model={**tiny_job(data)["model"], "vocab_size": vocab},
                                          train={"steps": 2, "eval_batches": 1},
                                          checkpoint={"every_steps": 2, "async_save": False}))
    run = tmp / "run"
    telemetry = Telemetry(run, 2, live=False)
    Supervisor(job, ClusterSpec(name="fake", devices_per_node=1), str(run), lambda: FakeRankGroup(1, Script()),
               telemetry).run()
    telemetry.close()

    figures = {
        "dataset_mb": round(shard_mb, 2),
        "dataset_s": _median(lambda: pf.check_dataset(job), args.rounds),
        "local_root_s": _median(lambda: pf.check_checkpoint_root(job, str(run)), args.rounds),
        "resume_target_s": _median(lambda: pf.check_resume_target(job, str(run), "step_00000002"), args.rounds),
    }
    import boto3
    from moto.server import ThreadedMotoServer

    from v4train.orchestrator.control.ray_group import free_port

    for key, value in (("AWS_ACCESS_KEY_ID", "bench"), ("AWS_SECRET_ACCESS_KEY", "bench"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(key, value)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="bench")
    s3_job = job.model_copy(update={"checkpoint": job.checkpoint.model_copy(update={"endpoint_url": endpoint})})
    pf.check_checkpoint_root(s3_job, "s3://bench/run")  # the first S3 call builds the client: timed apart
    figures["s3_root_s"] = _median(lambda: pf.check_checkpoint_root(s3_job, "s3://bench/run"), args.rounds)
    server.stop()
    figures = {k: round(v, 4) for k, v in figures.items()}
    figures["dataset_mb_per_s"] = round(shard_mb / figures["dataset_s"], 1)
    for key, value in figures.items():
        print(f"{key:>18}  {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
