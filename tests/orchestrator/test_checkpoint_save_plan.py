"""The save layout cache (orchestrator/checkpoint/save_plan.py, dcp_storage.save) on two gloo ranks: a save
group's later saves of the same state issue no collective but one one-integer all-reduce, yet write the same
files and metadata DCP's full save writes (read back bitwise, resharded, verified); a change of dtype or shape on
one rank only sends both ranks through DCP's full path again; a new group (a recovery) plans afresh."""

from __future__ import annotations

import datetime
import json

import pytest
import torch
import torch.distributed.checkpoint as dcp

from support.spawn import free_ports, spawn_ranks
from v4train.orchestrator import checkpoint
from v4train.orchestrator.checkpoint.storage import Storage

HANG_S = 300
# object collectives DCP's full save uses (gather/scatter of plans, write results, metadata): forbidden in the
# cached path, counted in the full one
_OBJECT_COLLECTIVES = ("gather_object", "scatter_object_list", "broadcast_object_list", "all_gather_object")
_TENSOR_COLLECTIVES = ("broadcast", "all_gather", "gather", "scatter", "reduce_scatter", "barrier")
# (save name, seed, b's dtype, b's rows): in order, on one save group unless "recovered"
SAVES = [("first", 1, torch.float32, 5), ("cached", 2, torch.float32, 5), ("dtype", 3, torch.bfloat16, 5),
         ("cached_bf16", 4, torch.bfloat16, 5), ("shape", 5, torch.bfloat16, 7), ("recovered", 6, torch.bfloat16, 7)]


def _state(rank: int, seed: int, b_dtype: torch.dtype = torch.float32, b_rows: int = 5) -> dict[str, torch.Tensor]:
    """Rank 0 holds ``a``, rank 1 holds ``b`` (the one whose dtype or shape changes: one rank only); both hold
    ``shared`` (written once) and a step counter."""
    g = torch.Generator().manual_seed(seed)
    a, shared = torch.randn(3, 5, generator=g), torch.randn(4, 6, generator=g)
    b = torch.randn(b_rows, 5, generator=g).to(b_dtype)
    return {"shared": shared, **({"a": a} if rank == 0 else {"b": b}), "optim.step": torch.tensor(float(seed))}


def _rank(rank: int, port: int, root: str) -> None:
    import torch.distributed as dist

    from v4train.orchestrator.checkpoint import save_plan
    from v4train.orchestrator.checkpoint.dcp_storage import save

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=HANG_S))
    calls: list[str] = []

    def counted(name, real):
        def call(*args, **kwargs):
            calls.append(name if name != "all_reduce" else f"all_reduce of {args[0].numel()}")
            return real(*args, **kwargs)
        return call

    for name in (*_OBJECT_COLLECTIVES, *_TENSOR_COLLECTIVES, "all_reduce"):
        setattr(dist, name, counted(name, getattr(dist, name)))
    storage = Storage(root)
    try:
        group = dist.new_group(backend="gloo")
        generation = save_plan.new_generation()
        for name, seed, b_dtype, b_rows in SAVES:
            if name == "recovered":  # a recovery: the group is left and formed anew
                save_plan.forget(generation)
                group, generation = dist.new_group(backend="gloo"), save_plan.new_generation()
            calls.clear()
            save(_state(rank, seed, b_dtype, b_rows), storage.dcp_writer(name),
                 planner=save_plan.CachedSavePlanner(generation), process_group=group)
            with open(f"{root}/{name}.rank{rank}.json", "w") as f:
                json.dump(calls, f)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def saves(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("plans")
    spawn_ranks(_rank, (free_ports(1)[0], str(root)), 2, HANG_S, "save-plan ranks")
    return str(root)


def _calls(root: str, name: str) -> list[list[str]]:
    return [json.load(open(f"{root}/{name}.rank{rank}.json")) for rank in (0, 1)]


def _expected(seed: int, b_dtype: torch.dtype, b_rows: int) -> dict[str, torch.Tensor]:
    return {**_state(0, seed), **_state(1, seed, b_dtype, b_rows)}  # both ranks' shared and step are the same


@pytest.mark.parametrize("name,seed,b_dtype,b_rows", SAVES)
def test_every_save_reads_back_bitwise_resharded_and_commits(saves, name, seed, b_dtype, b_rows):
    storage = Storage(saves)
    expected = _expected(seed, b_dtype, b_rows)
    meta = storage.dcp_reader(name).read_metadata()
    assert sorted(meta.state_dict_metadata) == ["a", "b", "optim.step", "shared"]
    assert meta.state_dict_metadata["b"].properties.dtype == b_dtype
    assert tuple(meta.state_dict_metadata["b"].size) == (b_rows, 5)
    # read back in another layout: one process, every tensor
    out = {k: torch.full_like(v, 7) for k, v in expected.items()}
    dcp.load(out, storage_reader=storage.dcp_reader(name), no_dist=True)
    for key, value in expected.items():
        assert out[key].dtype == value.dtype and torch.equal(out[key], value), (name, key)
    attempt = checkpoint.begin_attempt(storage, seed)
    for rel in storage.files(name):
        storage.fs.copy(storage._path(f"{name}/{rel}"), storage._path(f"{attempt}/{rel}"))
    final = checkpoint.commit(storage, attempt, seed, {"step": seed})
    assert checkpoint.verify(storage, final)["step"] == seed


@pytest.mark.parametrize("name", ["cached", "cached_bf16"])
def test_a_save_of_an_unchanged_state_issues_one_integer_all_reduce_and_nothing_else(saves, name):
    assert _calls(saves, name) == [["all_reduce of 1"], ["all_reduce of 1"]]


@pytest.mark.parametrize("name", ["first", "dtype", "shape", "recovered"])
def test_a_first_or_changed_save_takes_dcps_full_path_on_every_rank(saves, name):
    """First save of a group, a dtype or a shape changed on rank 1 only, a new group: DCP's plan and write
    results travel as objects on both ranks."""
    for calls in _calls(saves, name):
        assert "gather_object" in calls and {"broadcast_object_list", "scatter_object_list"} & set(calls), calls


def test_the_cached_path_writes_the_full_paths_metadata_and_files(saves):
    """Same shapes: the same ``.metadata`` but for its path and save id, the same file sizes; the bytes are the
    new values'."""
    storage = Storage(saves)
    full, cached = (storage.dcp_reader(n).read_metadata() for n in ("first", "cached"))
    assert cached.state_dict_metadata == full.state_dict_metadata
    assert cached.storage_data == full.storage_data
    assert cached.planner_data == full.planner_data
    assert cached.storage_meta.checkpoint_id != full.storage_meta.checkpoint_id
    assert cached.storage_meta.save_id != full.storage_meta.save_id
    sizes = {n: storage.files(n) for n in ("first", "cached")}
    assert {k: v for k, v in sizes["cached"].items() if k != ".metadata"} == \
        {k: v for k, v in sizes["first"].items() if k != ".metadata"}
