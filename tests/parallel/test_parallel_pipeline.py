"""Pipeline and data-parallel parity on gloo.

The toy stage model of ``support.toy_pipeline`` trains for two steps through
parallel.schedules.forward_backward + all_reduce_gradients + clip_grad_norm_ + build_optimizer under
(pp, dp) in {(1,1), (2,1), (1,2), (2,2)} and must reproduce a plain single-process torch reference
(full batch, torch AdamW, torch clip_grad_norm_). One spawn of 4 ranks runs every layout: (2,2) on
4 ranks, then ranks 0-1 meet again as a world of 2 for (2,1) and (1,2), then rank 0 alone for
(1,1), switching layouts with groups.destroy() + groups.initialize() as a reused rank pool would.
"""
from __future__ import annotations

import faulthandler

import pytest
import torch
import torch.distributed as dist
from torch import nn

from support.spawn import free_ports, spawn_ranks
from support.toy_pipeline import (
    EPS, GLOBAL_BATCH, H, LR, MAX_NORM, MICROBATCHES, S, STEPS, WEIGHT_DECAY, ToyStage, assert_layout_matches,
    forward_step, join, microbatches, refusal,
)
from v4train.parallel import groups
from v4train.parallel.data_parallel import all_reduce_gradients
from v4train.parallel.groups import ParallelContext
from v4train.parallel.optim import build_optimizer, clip_grad_norm_
from v4train.parallel.schedules import forward_backward

# The CPU parity suite: gloo, CPU stages and the CPU shim (a no-op on CUDA hosts, where Megatron
# allocates p2p buffers on the GPU). GPU parity needs NCCL and device placement.
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU/gloo suite")
# A hung rank dumps its stack and exits after RANK_HANG_S. The pool needs ~20 s on 2 idle cores but
# took 130 s once while a 4-rank Ray demo shared the machine, hence the margin.
RANK_HANG_S = 240
POOL_DEADLINE_S = 270


def _train(pctx: ParallelContext, num_microbatches: int = MICROBATCHES) -> dict:
    stage = ToyStage(pctx.pp_rank, pctx.pp)
    optimizer = build_optimizer(stage.named_parameters(), lr=LR, weight_decay=WEIGHT_DECAY, eps=EPS)
    micro_batch_size = GLOBAL_BATCH // pctx.dp // num_microbatches
    losses, norms = [], []
    for step in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        logged = forward_backward(
            forward_step, iter(microbatches(step, pctx, num_microbatches)), stage,
            num_microbatches=num_microbatches, seq_length=S, micro_batch_size=micro_batch_size,
            hidden_size=H, pctx=pctx,
        )
        all_reduce_gradients(stage.parameters(), pctx.dp_group)
        norms.append(clip_grad_norm_(stage.parameters(), MAX_NORM, pctx.pp_group))
        optimizer.step()
        if pctx.is_last_stage:
            losses.append(_dp_mean(torch.stack([d["loss"] for d in logged]).mean(), pctx))
        else:
            assert logged == []
    optimizer.zero_grad(set_to_none=True)
    logged = forward_backward(
        forward_step, iter(microbatches(0, pctx, num_microbatches)), stage,
        num_microbatches=num_microbatches, seq_length=S, micro_batch_size=micro_batch_size,
        hidden_size=H, pctx=pctx, forward_only=True,
    )
    return {
        "pp_rank": pctx.pp_rank,
        "dp_rank": pctx.dp_rank,
        "losses": losses,
        "norms": norms,
        "eval_loss": (
            _dp_mean(torch.stack([d["loss"] for d in logged]).mean(), pctx) if logged else None
        ),
        "grads_after_eval": [p.grad for p in stage.parameters() if p.grad is not None],
        "params": {name: p.detach().clone() for name, p in stage.named_parameters()},
    }


def _dp_mean(value: torch.Tensor, pctx: ParallelContext) -> float:
    if pctx.dp_group is not None:
        dist.all_reduce(value, group=pctx.dp_group)
    return value.item() / pctx.dp


def _none_grads(pctx: ParallelContext) -> dict:
    """all_reduce_gradients over the DP group with grads present on only some ranks."""
    a, c, big = (nn.Parameter(torch.zeros(n)) for n in (3, 2, 7))
    b = nn.Parameter(torch.zeros(5, dtype=torch.float64))
    frozen = nn.Parameter(torch.zeros(2), requires_grad=False)
    if pctx.dp_rank == 0:
        a.grad = torch.full((3,), 2.0)
        big.grad = torch.arange(7.0)
    else:
        b.grad = torch.full((5,), 4.0, dtype=torch.float64)
        big.grad = torch.arange(7.0) * 3
    all_reduce_gradients([a, b, frozen, c, big], pctx.dp_group, bucket_numel=4)
    return {"a": a.grad, "b": b.grad, "c": c.grad, "frozen": frozen.grad, "big": big.grad}


def _pool_main(rank: int, ports: list[int], out_dir: str) -> None:
    faulthandler.dump_traceback_later(RANK_HANG_S, exit=True)
    results: dict = {}
    join(ports[0], rank, 4)
    results["tp*pp*dp != world"] = refusal(lambda: groups.initialize(1, 2, 1, 1))
    results["ep does not divide tp*dp"] = refusal(lambda: groups.initialize(1, 2, 3, 2))
    pctx = groups.initialize(1, 2, 2, 2)
    results["ep2"] = (pctx.ep, pctx.ep_rank, dist.get_process_group_ranks(pctx.ep_group))
    pctx = groups.initialize(1, 2, 1, 2)  # re-layout on the same default group
    results["pctx(2,2)"] = (pctx.pp_rank, pctx.dp_rank, pctx.is_first_stage, pctx.is_last_stage)
    results[(2, 2)] = _train(pctx)
    results["none_grads"] = _none_grads(pctx)
    groups.destroy()
    dist.destroy_process_group()
    if rank < 2:
        join(ports[1], rank, 2)
        pctx = groups.initialize(1, 2, 1, 1)
        results[(2, 1)] = _train(pctx)
        stage = ToyStage(pctx.pp_rank, pctx.pp)
        results["mismatch"] = refusal(lambda: forward_backward(
            forward_step, iter([]), stage, num_microbatches=4 - rank, seq_length=S,
            micro_batch_size=2, hidden_size=H, pctx=pctx,
        ))
        results["no set_input_tensor"] = refusal(lambda: forward_backward(
            forward_step, iter([]), nn.Linear(1, 1) if rank == 1 else stage, num_microbatches=4,
            seq_length=S, micro_batch_size=2, hidden_size=H, pctx=pctx,
        ))
        results["(2,1) with 1 microbatch"] = _train(pctx, num_microbatches=1)
        groups.destroy()
        results[(1, 2)] = _train(groups.initialize(1, 1, 1, 2))
        groups.destroy()
        dist.destroy_process_group()
    if rank == 0:
        join(ports[2], rank, 1)
        results[(1, 1)] = _train(groups.initialize(1, 1, 1, 1))
        groups.destroy()
        dist.destroy_process_group()
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> dict[int, dict]:
    out_dir = tmp_path_factory.mktemp("pool")
    spawn_ranks(_pool_main, (free_ports(3), str(out_dir)), 4, POOL_DEADLINE_S, "rank pool")
    return {rank: torch.load(out_dir / f"rank{rank}.pt") for rank in range(4)}


@pytest.mark.parametrize(
    ("layout", "ranks"),
    [((1, 1), [0]), ((2, 1), [0, 1]), ((1, 2), [0, 1]), ((2, 2), [0, 1, 2, 3])],
    ids=["pp1-dp1", "pp2-dp1", "pp1-dp2", "pp2-dp2"],
)
def test_layout_matches_single_process_reference(pool, toy_reference, layout, ranks):
    assert_layout_matches([pool[r][layout] for r in ranks], toy_reference, *layout)


def test_fewer_microbatches_than_stages(pool, toy_reference):
    """1F1B with num_microbatches=1 < pp=2: warm-up and cool-down only, same result."""
    assert_layout_matches([pool[r]["(2,1) with 1 microbatch"] for r in (0, 1)], toy_reference, 2, 1)


def test_single_process_context_without_torch_distributed(toy_reference):
    assert_layout_matches([_train(ParallelContext.single())], toy_reference, 1, 1)


def test_rank_order_is_tp_cp_ep_dp_pp(pool):
    # pp groups [[0, 2], [1, 3]], dp groups [[0, 1], [2, 3]].
    assert [pool[r]["pctx(2,2)"] for r in range(4)] == [
        (0, 0, True, False), (0, 1, True, False), (1, 0, False, True), (1, 1, False, True)
    ]


def test_expert_groups_span_data_parallel_ranks_of_a_stage(pool):
    # tp=1, pp=2, dp=2, ep=2 with ETP=1: each stage's two DP ranks form one expert group.
    assert [pool[r]["ep2"] for r in range(4)] == [
        (2, 0, [0, 1]), (2, 1, [0, 1]), (2, 0, [2, 3]), (2, 1, [2, 3])
    ]


def test_initialize_refuses_impossible_layouts(pool):
    for rank in range(4):
        got = pool[rank]
        assert "tp*cp*pp*dp = 1*1*2*1 = 2 must equal the world size 4" in got["tp*pp*dp != world"]
        assert "ep=3 must divide tp*cp*dp=2" in got["ep does not divide tp*dp"]


def test_initialize_names_invalid_field_before_touching_distributed():
    with pytest.raises(ValueError, match=r"pp=0 must be an int >= 1"):
        groups.initialize(1, 0, 1, 1)


def test_all_reduce_gradients_treats_missing_grads_as_zero(pool):
    for rank in range(4):
        got = pool[rank]["none_grads"]
        assert torch.equal(got["a"], torch.full((3,), 1.0))
        assert torch.equal(got["b"], torch.full((5,), 2.0, dtype=torch.float64))
        assert torch.equal(got["big"], torch.arange(7.0) * 2)
        assert got["c"] is None and got["frozen"] is None


def test_stages_refuse_mismatched_arguments_instead_of_hanging(pool):
    for rank in (0, 1):
        message = pool[rank]["mismatch"]
        assert "pipeline stages disagree on num_microbatches (min 3, max 4)" in message
    assert "Linear has no set_input_tensor" in pool[1]["no set_input_tensor"]
    assert "another pipeline stage reported a problem" in pool[0]["no set_input_tensor"]
