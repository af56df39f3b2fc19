"""Session fixtures shared by every test folder: tiny real-text datasets, one pool of Ray rank workers,
and an S3-compatible server. Helpers that tests import live in ``tests/support/``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from support.jobs import POOL_SIZE, RankPool, stdlib_dataset, stdlib_documents

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A prepared dataset (vocab 512) of standard-library docstrings, one document per module."""
    return stdlib_dataset(tmp_path_factory.mktemp("corpus") / "dataset", vocab_size=512)


@pytest.fixture(scope="session")
def rank_pool():
    """Four RankWorker actors on an embedded local Ray, shared by every multi-rank test."""
    import ray

    from v4train.orchestrator.control.ray_group import start_ray

    start_ray(num_cpus=POOL_SIZE * 3, object_store_memory_mb=256)
    pool = RankPool(POOL_SIZE)
    yield pool
    pool.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto) on 127.0.0.1 with one bucket; credentials in the environment."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    from v4train.orchestrator.control.rendezvous import free_port

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    # s3fs's mkdir sends a LocationConstraint moto rejects; create the bucket with boto3.
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="ckpts")
    yield {"endpoint_url": endpoint, "bucket": "ckpts"}
    server.stop()


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> Path:
    """A dataset of a few thousand tokens, so that a global batch of 8 x 64 tokens passes an epoch in a few steps."""
    return stdlib_dataset(tmp_path_factory.mktemp("small") / "dataset", vocab_size=300, val_fraction=0.2,
                          documents=[text[:1200] for text in stdlib_documents()[:4]])
