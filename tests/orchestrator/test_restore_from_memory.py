"""A rank kept after a peer's failure restores the committed checkpoint from its own copy of what it wrote:
bit for bit what the same checkpoint loads from storage; only the copy of the committed attempt is used;
a copy that does not fit the model is refused before anything changes."""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.distributed.checkpoint as dcp

from support.jobs import TINY_MODEL
from v4train.model import ModelConfig, V4Stage
from v4train.orchestrator import checkpoint
from v4train.orchestrator.checkpoint import CheckpointError
from v4train.orchestrator.checkpoint.storage import Storage
from v4train.orchestrator.rank.saved_copies import SavedCopies
from v4train.parallel.optim import build_optimizer


def _trained(seed: int = 0, steps: int = 1):
    """A tiny stage and its AdamW after ``steps`` steps (after one the optimizer holds moments)."""
    cfg = ModelConfig.preset("nano", **{k: v for k, v in TINY_MODEL.items() if k != "preset"}, vocab_size=64)
    stage = V4Stage(cfg, pp_rank=0, pp_size=1)
    stage.init_weights(seed)
    stage.attention_mode = "dense"
    optimizer = build_optimizer(list(stage.named_parameters()), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95),
                                eps=1e-8)
    for _ in range(steps):
        ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(seed))
        stage(ids, torch.arange(16).expand(2, 16), torch.roll(ids, -1, dims=1)).mean().backward()
        optimizer.step()
    return stage, optimizer


def _everything(stage, optimizer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in checkpoint.shard_state(stage, optimizer).items()}


def test_memory_and_storage_restore_the_same_bits(tmp_path):
    stage, optimizer = _trained()
    copies = SavedCopies()
    storage = Storage(str(tmp_path))
    state = checkpoint.shard_state(stage, optimizer)
    copies.put(storage.url, "step_00000001.attempt-a", 0, state)
    dcp.save(state, storage_writer=storage.dcp_writer("step_00000001.attempt-a"))
    saved = _everything(stage, optimizer)

    # training goes on past the save (the copy must not follow the live tensors), then two ranks restore
    from_memory, from_storage = _trained(seed=1), _trained(seed=2)
    checkpoint.load_state(copies.get(storage.url, "step_00000001.attempt-a", 0), "step_00000001", *from_memory)
    checkpoint.load_shards(storage, "step_00000001.attempt-a", *from_storage)
    memory, disk = _everything(*from_memory), _everything(*from_storage)
    assert set(memory) == set(disk) == set(saved)
    for key in saved:
        assert torch.equal(memory[key], saved[key]) and torch.equal(disk[key], saved[key]), key


def test_only_the_copy_of_the_committed_attempt_of_this_rank_is_used():
    copies = SavedCopies(keep=2)
    for attempt in ("a", "b", "c"):
        copies.put("/root", attempt, 1, {"model.w": torch.full((2,), float(ord(attempt)))})
    assert copies.get("/root", "a", 1) is None  # the oldest of three is dropped
    assert copies.get("/root", "c", 1) is not None and copies.get("/root", "b", 1) is not None
    assert copies.get("/root", "c", 0) is None and copies.get("/other", "c", 1) is None
    assert copies.get("/root", None, 1) is None  # a checkpoint that names no attempt: storage
    assert torch.equal(copies.get("/root", "c", 1)["model.w"], torch.full((2,), 99.0))


def test_a_copy_that_does_not_fit_the_model_is_refused_before_any_change():
    stage, optimizer = _trained(steps=0)
    state = _everything(stage, optimizer)
    key = next(k for k in state if k.startswith("optim.") and k.endswith("exp_avg"))
    target = _trained(seed=1, steps=0)
    before = _everything(*target)
    with pytest.raises(CheckpointError, match="in-memory copy lacks optim"):
        checkpoint.load_state({k: v for k, v in state.items() if k != key}, "step_00000001", *target)
    wrong = dict(state, **{key: torch.zeros(3)})
    with pytest.raises(CheckpointError, match="has shape"):
        checkpoint.load_state(wrong, "step_00000001", *target)
    after = _everything(*target)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_full_store_writes_the_next_copy_into_the_oldest_copys_memory():
    """Once ``keep`` copies are held, a save of the same names, shapes and dtypes takes the oldest copy's tensors
    (no fresh memory); the newer copies stay as written, and a changed shape gets fresh tensors."""
    copies = SavedCopies(keep=2)
    states = [{"model.w": torch.full((4, 3), float(i)), "optim.w.step": torch.tensor(float(i))} for i in range(3)]
    first = copies.put("/root", "a", 0, states[0])
    first_memory = {k: v.data_ptr() for k, v in first.items()}
    copies.put("/root", "b", 0, states[1])
    third = copies.put("/root", "c", 0, states[2])
    assert {k: v.data_ptr() for k, v in third.items()} == first_memory
    assert copies.get("/root", "a", 0) is None  # dropped before its memory was overwritten
    for attempt, i in (("b", 1), ("c", 2)):
        assert all(torch.equal(copies.get("/root", attempt, 0)[k], states[i][k]) for k in states[i])
    states[2]["model.w"].add_(1.0)  # the copy never follows the live tensors
    assert torch.equal(third["model.w"], torch.full((4, 3), 2.0))
    reshaped = {"model.w": torch.full((2, 6), 5.0), "optim.w.step": torch.tensor(5.0)}
    fourth = copies.put("/root", "d", 0, reshaped)
    assert fourth["model.w"].shape == (2, 6) and torch.equal(fourth["model.w"], reshaped["model.w"])
    assert fourth["model.w"].data_ptr() != reshaped["model.w"].data_ptr()
    assert torch.equal(copies.get("/root", "c", 0)["model.w"], torch.full((4, 3), 2.0))


def test_an_oldest_copy_that_cannot_be_reused_is_freed_before_the_new_one_is_allocated(monkeypatch):
    """A rank's state copy can be most of its host memory: holding keep + 1 of them at once would raise its peak."""
    from v4train.orchestrator.rank import saved_copies

    copies = SavedCopies(keep=1)
    first = copies.put("/root", "a", 0, {"model.w": torch.ones(4, 3)})
    buffer = weakref.ref(first["model.w"].untyped_storage())
    del first
    assert buffer() is not None  # held by the store: the weakref follows the buffer, not a passing wrapper
    alive_at_allocation = []
    allocate = saved_copies.host_copy
    monkeypatch.setattr(saved_copies, "host_copy", lambda state: (alive_at_allocation.append(buffer() is not None),
                                                                  allocate(state))[1])
    second = copies.put("/root", "b", 0, {"model.w": torch.ones(2, 6)})  # another shape: a fresh buffer
    assert alive_at_allocation == [False]
    assert torch.equal(second["model.w"], torch.ones(2, 6)) and copies.get("/root", "a", 0) is None
