"""A surviving rank abandons its step when the supervisor asks (a peer failed): in the forward, in the
backward, and from the actor's heartbeat thread while the step runs; the switch changes no value."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from support.jobs import TINY_MODEL
from v4train.model import ModelConfig, V4Stage
from v4train.orchestrator.rank.abort import AbortSwitch, StepAborted


def _stage() -> V4Stage:
    cfg = ModelConfig.preset("nano", **{k: v for k, v in TINY_MODEL.items() if k != "preset"}, vocab_size=64)
    torch.manual_seed(3)
    stage = V4Stage(cfg, pp_rank=0, pp_size=1)
    stage.init_weights(3)
    stage.attention_mode = "dense"
    return stage


def _batch(stage: V4Stage):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, stage.cfg.vocab_size, (2, 16), generator=gen)
    return ids, torch.arange(16).expand(2, 16), torch.roll(ids, -1, dims=1)


def _switched(stage: V4Stage) -> AbortSwitch:
    switch = AbortSwitch()
    switch.install(stage, [*stage.layers.values(), *stage.mtp.values()])
    return switch


def test_the_switch_changes_no_loss_or_gradient_bit():
    plain, watched = _stage(), _stage()
    _switched(watched)
    for stage in (plain, watched):
        stage(*_batch(stage)).mean().backward()
    a, b = dict(plain.named_parameters()), dict(watched.named_parameters())
    assert all(torch.equal(a[n].grad, b[n].grad) for n in a if a[n].grad is not None)
    assert torch.equal(plain(*_batch(plain)), watched(*_batch(watched)))


def test_an_abort_stops_the_forward_at_the_next_module():
    stage = _stage()
    switch = _switched(stage)
    calls = []
    stage.layers["0"].register_forward_pre_hook(lambda *_: calls.append("layer 0"))
    switch.request()
    with pytest.raises(StepAborted, match="a peer rank failed"):
        stage(*_batch(stage))
    assert calls == []  # stopped before the first layer ran


def test_an_abort_stops_the_backward_at_the_next_block():
    stage = _stage()
    switch = _switched(stage)
    loss = stage(*_batch(stage)).mean()
    switch.request()
    with pytest.raises(StepAborted):
        loss.backward()
    assert stage.embed.weight.grad is None  # the backward never reached the first stage's input


@pytest.mark.timeout(60)
def test_an_abort_from_another_thread_ends_a_running_step_early():
    stage = _stage()
    switch = _switched(stage)
    done = []

    def steps() -> None:
        try:
            for _ in range(1000):  # far longer than the test's timeout if never aborted
                stage(*_batch(stage)).mean().backward()
        except StepAborted:
            done.append("aborted")

    worker = threading.Thread(target=steps)
    worker.start()
    time.sleep(0.5)
    switch.request()
    worker.join(timeout=30)
    assert not worker.is_alive() and done == ["aborted"]


class _Actor:
    """A rank actor handle's ``abort`` call, recorded."""

    def __init__(self, rank: int, aborted: list) -> None:
        self.rank = rank
        self.abort = type("Method", (), {"remote": staticmethod(lambda: aborted.append(rank))})()


@pytest.mark.parametrize("kind, replaced, aborted", [("died", 1, [0, 2, 3]), ("stall", 1, [0, 2, 3]),
                                                      ("exception", None, [0, 1, 2, 3])])
def test_rejoin_asks_every_kept_rank_to_abandon_its_call(monkeypatch, kind, replaced, aborted):
    from v4train.orchestrator.control import ray_group
    from v4train.orchestrator.control.rank_group import RankFailure

    calls, killed = [], []
    actors = [_Actor(r, calls) for r in range(4)]
    group = ray_group.RayRankGroup(list(actors), timeout_s=5.0, spares=["spare"])
    group._in_flight = ["ref0", "ref1", "ref2", "ref3"]
    waited = []
    monkeypatch.setattr(ray_group.ray, "kill", lambda actor, no_restart: killed.append(actor.rank))
    monkeypatch.setattr(ray_group.ray, "wait",
                        lambda refs, num_returns, timeout: (waited.extend(refs), (refs, []))[1])
    assert group.rejoin(RankFailure(1, kind, "gone", "train_step"), 5.0)
    assert calls == aborted and waited == [f"ref{r}" for r in aborted]
    assert killed == ([] if replaced is None else [replaced])
    assert group.actors[1] == ("spare" if replaced is not None else actors[1])
