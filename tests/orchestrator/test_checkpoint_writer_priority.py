"""The asynchronous save's writer thread (orchestrator/rank/checkpoint_io.py) runs at idle CPU priority, and only
it: the training step's thread keeps its scheduling class."""

from __future__ import annotations

import concurrent.futures
import os

import pytest

from v4train.orchestrator.rank.checkpoint_io import background_priority


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="Linux scheduling classes")
def test_the_writer_thread_alone_runs_at_idle_priority():
    before = os.sched_getscheduler(0)
    with concurrent.futures.ThreadPoolExecutor(1, initializer=background_priority) as writer:
        assert writer.submit(os.sched_getscheduler, 0).result() == os.SCHED_IDLE
    assert os.sched_getscheduler(0) == before != os.SCHED_IDLE
