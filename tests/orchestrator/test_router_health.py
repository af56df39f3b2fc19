"""Router health: per-layer expert load, dead experts and entropy summed over the data-parallel group (two
gloo ranks against the statistics of their tokens together), the ``router_collapse`` streaks, and the
report's rows."""

from __future__ import annotations

import datetime
import json
import re

import torch
import torch.distributed as dist

from support.spawn import free_ports, spawn_ranks
from v4train.orchestrator.control.router_watch import RouterWatch
from v4train.orchestrator.rank import router_health
from v4train.orchestrator.spec.job import RouterHealthSpec
from v4train.orchestrator.tools.report import format_summary, summary

# layer 3's tokens per expert on two data-parallel ranks: expert 3 dead on rank 0 only, expert 2 on both
COUNTS = {0: [6, 2, 0, 0], 1: [1, 5, 0, 2]}
ENTROPIES = {0: [0.5, 0.7], 1: [0.9]}  # each rank's micro-batch mean entropies


def _layers(rank: int) -> list:
    e = ENTROPIES[rank]
    return [(3, torch.tensor(COUNTS[rank], dtype=torch.int64), sum(e), len(e))]


def _rank(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    result = router_health.reduce(_layers(rank), dist.group.WORLD)
    with open(f"{out}.{rank}", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def test_router_health_is_summed_over_the_data_parallel_group(tmp_path):
    out = str(tmp_path / "health")
    spawn_ranks(_rank, (free_ports(1)[0], out), nprocs=2, deadline_s=120, what="router health all-reduce")
    results = [json.loads(open(f"{out}.{r}").read()) for r in (0, 1)]
    assert results[0] == results[1]  # every rank of the group reports the group's numbers
    load = [a + b for a, b in zip(COUNTS[0], COUNTS[1])]  # [7, 7, 0, 2]: only expert 2 is dead for the group
    entropies = ENTROPIES[0] + ENTROPIES[1]
    assert results[0] == {"router/3/max_load": max(load) / (sum(load) / 4), "router/3/dead_experts": 1.0,
                          "router/3/entropy": sum(entropies) / 3}
    alone = router_health.reduce(_layers(0), None)  # one rank's view differs: two dead experts
    assert alone["router/3/dead_experts"] == 2.0 and alone["router/3/max_load"] == 6 / 2


def _record(step: int, dead: float, max_load: float) -> dict:
    return {"step": step, "router/1/dead_experts": dead, "router/1/max_load": max_load, "router/1/entropy": 1.0,
            "router/2/dead_experts": 0.0, "router/2/max_load": 1.1, "router/2/entropy": 1.3}


def test_router_collapse_fires_once_per_episode_when_a_streak_reaches_the_threshold():
    watch = RouterWatch(RouterHealthSpec(collapse_steps=3, max_load=2.0))
    dead = [1, 1, 0, 1, 1, 1, 1, 1]  # a dead expert on layer 1: broken at step 3, then 5 steps in a row
    fired = {step: watch.observe(_record(step, d, 1.5)) for step, d in enumerate(dead, start=1)}
    assert {s: f for s, f in fired.items() if f} == {
        6: [{"layer": 1, "reason": "dead", "steps": 3, "dead_experts": 1, "max_load": 1.5}]}
    watch = RouterWatch(RouterHealthSpec(collapse_steps=2, max_load=2.0))
    fired = [watch.observe(_record(step, 0, load)) for step, load in enumerate([2.5, 1.9, 2.1, 3.0], start=1)]
    assert fired == [[], [], [], [{"layer": 1, "reason": "overloaded", "steps": 2, "dead_experts": 0,
                                   "max_load": 3.0}]]


def test_router_collapse_streaks_start_again_when_the_run_goes_back():
    """Steps redone after a restart or rollback are not the same steps counted twice: two dead steps, a restart
    from step 1, then two more dead steps are a streak of 2 (no collapse at 3), and a third makes it 3."""
    watch = RouterWatch(RouterHealthSpec(collapse_steps=3, max_load=2.0))
    fired = [watch.observe(_record(step, 1, 1.5)) for step in (1, 2, 2, 3, 4)]
    assert fired == [[], [], [], [], [{"layer": 1, "reason": "dead", "steps": 3, "dead_experts": 1,
                                       "max_load": 1.5}]]


def test_report_shows_each_layers_router_health_and_collapses():
    metrics = [{**_record(1, 0, 1.5), "loss": 5.0, "tokens_per_s": 10.0},
               {**_record(2, 1, 2.5), "loss": 4.0, "tokens_per_s": 10.0, "router/1/entropy": 0.25}]
    events = [{"event": "router_collapse", "step": 2, "layer": 1, "reason": "dead"}]
    s = summary(metrics, events)
    assert s["router"] == {1: {"max_load": 2.5, "dead_steps": 1, "entropy": 0.25},
                           2: {"max_load": 1.1, "dead_steps": 0, "entropy": 1.3}}
    text = format_summary("run", s)
    assert re.search(r"router layer 1 +max load 2\.50, dead expert in 1 steps, entropy 0\.250 nats", text)
    assert re.search(r"router collapses +layer 1 dead at step 2", text)
