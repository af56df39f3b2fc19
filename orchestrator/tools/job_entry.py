"""The entrypoint of a job submitted to a running Ray cluster (``orchestrator/tools/jobs.py``).

``python -m v4train.orchestrator.tools.job_entry --run-dir DIR`` runs on the cluster's head node: it writes the
job and cluster carried in the environment (:data:`JOB_ENV`, :data:`CLUSTER_ENV`) to files and runs
``v4train submit`` on them, the same supervisor as a local run. A module of its own so that ``jobs`` (imported
by the CLI) never imports the CLI.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from v4train.orchestrator.tools.cli import main
from v4train.orchestrator.tools.jobs import CLUSTER_ENV, JOB_ENV

__all__ = ["run"]


def run(argv: list[str] | None = None) -> int:
    """Run the job carried in the environment, as ``v4train submit``; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m v4train.orchestrator.tools.job_entry")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--inject-fault", dest="faults", action="append", default=[])
    args = parser.parse_args(argv)
    if JOB_ENV not in os.environ or CLUSTER_ENV not in os.environ:
        print(f"v4train: error: {JOB_ENV} and {CLUSTER_ENV} must carry the job (this runs as a Ray job's entrypoint)",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="v4train-job-") as tmp:
        job_file, cluster_file = Path(tmp) / "job.yaml", Path(tmp) / "cluster.yaml"
        job_file.write_text(os.environ[JOB_ENV])
        cluster_file.write_text(os.environ[CLUSTER_ENV])
        argv = ["submit", str(job_file), "--cluster", str(cluster_file), "--run-dir", args.run_dir]
        argv += ["--overwrite"] if args.overwrite else []
        for fault in args.faults:
            argv += ["--inject-fault", fault]
        return main(argv)


if __name__ == "__main__":
    sys.exit(run())
