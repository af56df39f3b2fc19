"""Anticipatory routing (spec 8.1) and C10: routing indices of step t chosen with the parameters of step
t-1 on the prefetched batch; on for a set number of steps, then off; its state survives a resume, also on
another layout, with the same indices at the following steps."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from support.jobs import run_job, tiny_job
from v4train.model import ModelConfig, V4Stage
from v4train.model.moe import RoutingTape, set_routing_tape
from v4train.orchestrator.faults import parse_fault


def test_replayed_indices_override_selection_but_weights_use_current_scores():
    from support.jobs import TINY_MODEL

    cfg = ModelConfig.preset("nano", **{k: v for k, v in TINY_MODEL.items() if k != "preset"}, vocab_size=64)
    stage = V4Stage(cfg, pp_rank=0, pp_size=1)
    stage.init_weights(0)
    router = next(m for m in stage.modules() if type(m).__name__ == "Router" and not m.is_hash)
    x = torch.randn(6, cfg.dim)
    tape = RoutingTape("capture")
    set_routing_tape(stage, tape)
    captured = router(x, torch.zeros(6, dtype=torch.long))
    forced = torch.tensor([[0, 1]] * 6)
    set_routing_tape(stage, RoutingTape("replay", {router.layer_idx: [forced]}))
    with torch.no_grad():
        router.weight.add_(1.0)  # "current" parameters differ from the capture's
    replayed = router(x, torch.zeros(6, dtype=torch.long))
    assert torch.equal(tape.indices[router.layer_idx][0], captured.indices)
    assert torch.equal(replayed.indices, forced)
    w = replayed.scores.gather(1, forced)
    assert torch.allclose(replayed.weights, w / w.sum(-1, keepdim=True) * cfg.route_scale)
    with pytest.raises(RuntimeError, match="no recorded indices"):
        router(x, torch.zeros(6, dtype=torch.long))


@pytest.mark.timeout(900)
def test_c10_anticipatory_routing_survives_a_restart(rank_pool, tiny_dataset, tmp_path):
    job = tiny_job(tiny_dataset, parallel={"pp": 2, "dp": 2}, train={"steps": 8, "warmup_steps": 2},
                   checkpoint={"every_steps": 4, "at_end": False},
                   spike_guard={"enabled": False, "anticipatory_steps": 4})
    straight, events, _ = run_job(rank_pool, job, tmp_path / "straight", faults=[parse_fault("anticipatory@3")])
    names = [(e["event"], e["step"]) for e in events if "anticipatory" in e["event"]]
    assert names == [("anticipatory_routing_on", 2), ("anticipatory_routing_off", 6)]
    by_step = {m["step"]: m for m in straight}
    assert [s for s in by_step if "routing_fingerprint" in by_step[s]] == [3, 4, 5, 6]
    state = json.loads((tmp_path / "straight" / "step_00000004" / "train_state.json").read_text())
    ar = state["anticipatory_routing"]
    assert ar["remaining"] == 2 and ar["delay_steps"] == 1 and list(ar["rows"]) == ["5"]

    for layout in ({"pp": 2, "dp": 2}, {"pp": 1, "dp": 2}):
        run_dir = tmp_path / f"pp{layout['pp']}dp{layout['dp']}"
        shutil.copytree(tmp_path / "straight" / "step_00000004", run_dir / "step_00000004")
        other = {**job, "parallel": {**job["parallel"], **layout}}
        resumed, revents, _ = run_job(rank_pool, other, run_dir, resume_from="step_00000004")
        routing_events = [(e["event"], e["step"]) for e in revents if "anticipatory" in e["event"]]
        assert routing_events == [("anticipatory_routing_off", 6)]
        for m in resumed:
            ref = by_step[m["step"]]
            assert m.get("routing_fingerprint") == ref.get("routing_fingerprint"), (layout, m["step"])
            assert m["loss"] == pytest.approx(ref["loss"], rel=1e-5), (layout, m["step"])
