"""The patient ``ray start`` of the simulated cluster (``orchestrator/tools/ray_start.py``): it exists because
Ray's node start-up waits a fixed 30 s for the node to register, polling ``services.get_node``; this fails
when Ray changes that, so the workaround can be revisited."""

from __future__ import annotations

import inspect

import pytest

from v4train.orchestrator.tools import ray_start


def test_ray_still_waits_a_fixed_30_s_through_services_get_node():
    import ray._private.node as node

    source = inspect.getsource(node.Node.__init__)
    assert "raylet_start_wait_time_s = 30" in source
    assert "ray._private.services.get_node(" in source


def test_patient_get_node_retries_until_the_node_registers(monkeypatch):
    monkeypatch.setattr(ray_start.time, "sleep", lambda s: None)
    calls = []

    def get_node(gcs, node_id):
        calls.append((gcs, node_id))
        if len(calls) < 3:
            raise RuntimeError("node info not available")
        return {"node_id": node_id}

    assert ray_start.patient_get_node(get_node)("gcs:6379", "abc") == {"node_id": "abc"}
    assert len(calls) == 3


def test_patient_get_node_gives_up_after_the_wait(monkeypatch):
    monkeypatch.setattr(ray_start.time, "sleep", lambda s: None)
    monkeypatch.setattr(ray_start, "REGISTER_WAIT_S", -1.0)

    def get_node(gcs, node_id):
        raise RuntimeError("node info not available")

    with pytest.raises(RuntimeError, match="not available"):
        ray_start.patient_get_node(get_node)("gcs:6379", "abc")
