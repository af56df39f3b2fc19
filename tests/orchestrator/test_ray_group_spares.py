"""The rank group's spare actor starts once the first step has run, not beside the ranks (whose start it would
slow on shared cores); each step tops the spares up again after a recovery used one."""

from __future__ import annotations

from v4train.orchestrator.control import ray_group
from v4train.orchestrator.control.ray_group import RayRankGroup


class _FakeActorClass:
    """What ``ray.remote(...)(RankWorker)`` returns, reduced to the calls ``RayRankGroup.create`` makes."""

    def options(self, **_):
        return self

    def remote(self, log_path):
        return ("rank", log_path)


def test_the_spare_starts_after_the_first_step(monkeypatch, tmp_path):
    started = []
    monkeypatch.setattr(ray_group.node_placement, "place_group", lambda shares, *_: ("pg", list(range(sum(shares)))))
    monkeypatch.setattr(ray_group.ray, "remote", lambda **_: lambda cls: _FakeActorClass())
    monkeypatch.setattr(ray_group, "start_spare", lambda log_path=None: started.append(log_path) or ("spare", log_path))
    import ray.util.scheduling_strategies as strategies

    monkeypatch.setattr(strategies, "PlacementGroupSchedulingStrategy", lambda *a, **k: None)
    group = RayRankGroup.create(4, timeout_s=5.0, log_dir=str(tmp_path), spares=1)
    assert len(group.actors) == 4 and group.spares == [] and started == []  # nothing beside the ranks' start
    monkeypatch.setattr(group, "_run", lambda fn, *args, **kw: [{}] * 4)
    group.train_step(plan=None)
    assert started == [str(tmp_path / "spare_0.log")] and len(group.spares) == 1
    group.train_step(plan=None)
    assert len(started) == 1  # topped up, not added to
    group.spares.pop()  # a recovery took it: the next step starts another
    group.train_step(plan=None)
    assert started[-1] == str(tmp_path / "spare_1.log") and len(group.spares) == 1
