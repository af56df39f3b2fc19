"""The save-plan cache (orchestrator/checkpoint/save_plan.py) on two gloo ranks: plans reused within a group
generation, re-planned when a rank's dtypes change, and never reused by a recovered group, against torch's own
class-keyed cache, which these same steps show going stale (so a change of torch's behaviour fails here)."""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader

from support.spawn import free_ports, spawn_ranks

HANG_S = 300


def _state(rank: int, seed: int, b_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Rank 0 holds ``a``, rank 1 holds ``b``; both hold ``shared`` (written once)."""
    g = torch.Generator().manual_seed(seed)
    a, b, shared = (torch.randn(3, 5, generator=g) for _ in range(3))
    return {"shared": shared, **({"a": a} if rank == 0 else {"b": b.to(b_dtype)})}


def _forget_all_plans() -> None:
    """What a replacement process has: no cached plan at all."""
    from torch.distributed.checkpoint.planner import SavePlanner

    for name in ("_cached_save_plan", "_cached_final_save_plan", "_cached_all_plans", "_cached_global_plan",
                 "_cached_metadata"):
        getattr(SavePlanner, name).clear()


def _rank(rank: int, port: int, root: str) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint import DefaultSavePlanner

    from v4train.orchestrator.checkpoint import save_plan

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=HANG_S))

    def save(name: str, state: dict, planner) -> None:
        dcp.save(state, checkpoint_id=f"{root}/{name}", planner=planner)

    try:
        first = save_plan.new_generation()
        save("first", _state(rank, 1), save_plan.CachedSavePlanner(first))
        save("cached", _state(rank, 2), save_plan.CachedSavePlanner(first))
        save("dtype", _state(rank, 3, torch.bfloat16), save_plan.CachedSavePlanner(first))
        # recovery in place: rank 0's process is a replacement, rank 1's kept its caches; a new group
        if rank == 0:
            _forget_all_plans()
        else:
            save_plan.forget(first)
        save("recovered", _state(rank, 4, torch.bfloat16), save_plan.CachedSavePlanner(save_plan.new_generation()))
        # the same steps with torch's own cache key (the planner's class name)
        save("torch_warm", _state(rank, 5), DefaultSavePlanner(enable_plan_caching=True))
        save("torch_dtype", _state(rank, 6, torch.bfloat16), DefaultSavePlanner(enable_plan_caching=True))
        if rank == 0:
            _forget_all_plans()
        try:
            save("torch_recovered", _state(rank, 7, torch.bfloat16), DefaultSavePlanner(enable_plan_caching=True))
            outcome = "saved"
        except BaseException as e:  # noqa: BLE001 - DCP's CheckpointException is a BaseException
            outcome = repr(e)
        with open(f"{root}/torch_recovered.rank{rank}.txt", "w") as f:
            f.write(outcome)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def saves(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("plans")
    spawn_ranks(_rank, (free_ports(1)[0], str(root)), 2, HANG_S, "save-plan ranks")
    return str(root)


def _metadata(root: str, name: str) -> dict:
    return FileSystemReader(f"{root}/{name}").read_metadata().state_dict_metadata


def _load(root: str, name: str, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {k: torch.empty_like(v) for k, v in expected.items()}
    dcp.load(out, checkpoint_id=f"{root}/{name}", no_dist=True)
    return out


@pytest.mark.parametrize("name,seed,b_dtype", [("first", 1, torch.float32), ("cached", 2, torch.float32),
                                                ("dtype", 3, torch.bfloat16), ("recovered", 4, torch.bfloat16)])
def test_cached_plans_write_complete_checkpoints(saves, name, seed, b_dtype):
    expected = {**_state(0, seed), **_state(1, seed, b_dtype)}
    meta = _metadata(saves, name)
    assert sorted(meta) == ["a", "b", "shared"]
    assert meta["b"].properties.dtype == b_dtype
    loaded = _load(saves, name, expected)
    for key, value in expected.items():
        assert torch.equal(loaded[key], value), (name, key)


def test_torch_class_keyed_cache_goes_stale(saves):
    """Why the cache is keyed per group generation: torch's own key keeps a changed dtype's old metadata, and a
    replacement coordinator beside a kept rank cannot plan (the kept rank sent only "unchanged")."""
    assert _metadata(saves, "torch_warm")["b"].properties.dtype == torch.float32
    assert _metadata(saves, "torch_dtype")["b"].properties.dtype == torch.float32  # bf16 was written
    for rank in (0, 1):
        outcome = open(f"{saves}/torch_recovered.rank{rank}.txt").read()
        assert "TypeError" in outcome, outcome  # the coordinator's error, reported on every rank
