"""Interleaved 1F1B (virtual pipeline stages) parity on gloo.

The toy model of support.toy_pipeline (NUM_LAYERS = 4 blocks) is cut into pp*vp = 2*2 virtual
stages: chunk i on pipeline rank r is virtual stage i*pp + r (Megatron's placement), i.e. rank 0
holds stages 0 (embedding, block 0) and 2 (block 2), rank 1 holds stages 1 (block 1) and 3 (block 3,
head). Trained through parallel.schedules.forward_backward with a list of chunks, it must reproduce
the plain single-process reference: per-microbatch losses and every gradient of the first step,
then the parameters, gradient norms and losses of two clipped AdamW steps and an evaluation pass.
One spawn of 2 ranks runs the refusals first (so it also shows the pipeline group stays usable after
them), then num_microbatches = 4 and = pp = 2 (every microbatch in the warm-up on rank 0).

Shape letters: B batch, S sequence.
"""

from __future__ import annotations

import faulthandler
import itertools

import pytest
import torch
import torch.distributed as dist

from support.spawn import free_ports, spawn_ranks
from support.toy_pipeline import (
    EPS, GLOBAL_BATCH, H, LR, MAX_NORM, MICROBATCHES, RTOL, S, STEPS, WEIGHT_DECAY, ToyStage, assert_layout_matches,
    forward_step, global_batches, join, microbatches, refusal,
)
from v4train.parallel import groups
from v4train.parallel.groups import ParallelContext
from v4train.parallel.optim import build_optimizer, clip_grad_norm_
from v4train.parallel.schedules import forward_backward

PP, VP = 2, 2

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU/gloo suite")
# A hung rank dumps its stack and exits after RANK_HANG_S; the spawn takes ~15 s on 2 idle cores but
# several times that on a loaded machine (as tests/parallel/test_parallel_pipeline.py), hence the margin.
RANK_HANG_S = 240
POOL_DEADLINE_S = 270


def _chunks(pctx: ParallelContext) -> list[ToyStage]:
    """This rank's VP chunks: chunk i is virtual stage i*pp + pp_rank of pp*VP."""
    return [ToyStage(i * pctx.pp + pctx.pp_rank, pctx.pp * VP) for i in range(VP)]


def _run(chunks: list[ToyStage], pctx: ParallelContext, step: int, num_microbatches: int,
         forward_only: bool = False) -> list[dict]:
    batches = microbatches(step, pctx, num_microbatches)
    return forward_backward(
        forward_step, [iter(batches) for _ in chunks], chunks,
        num_microbatches=num_microbatches, seq_length=S,
        micro_batch_size=GLOBAL_BATCH // num_microbatches, hidden_size=H, pctx=pctx,
        forward_only=forward_only,
    )


def _train(pctx: ParallelContext, num_microbatches: int) -> dict:
    """Two clipped AdamW steps and an evaluation pass; the fields assert_layout_matches reads,
    plus the first step's per-microbatch losses and gradients."""
    chunks = _chunks(pctx)
    named = list(itertools.chain.from_iterable(c.named_parameters() for c in chunks))
    params = [p for _, p in named]
    optimizer = build_optimizer(named, lr=LR, weight_decay=WEIGHT_DECAY, eps=EPS)
    losses, norms, first_logged, first_grads = [], [], None, None
    for step in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        logged = _run(chunks, pctx, step, num_microbatches)
        if step == 0:
            first_logged = [d["loss"].item() for d in logged]
            first_grads = {name: p.grad.clone() for name, p in named}
        norms.append(clip_grad_norm_(params, MAX_NORM, pctx.pp_group))
        optimizer.step()
        if pctx.is_last_stage:
            losses.append(torch.stack([d["loss"] for d in logged]).mean().item())
        else:
            assert logged == []
    optimizer.zero_grad(set_to_none=True)
    logged = _run(chunks, pctx, 0, num_microbatches, forward_only=True)
    return {
        "pp_rank": pctx.pp_rank,
        "dp_rank": pctx.dp_rank,
        "losses": losses,
        "norms": norms,
        "eval_loss": torch.stack([d["loss"] for d in logged]).mean().item() if logged else None,
        "grads_after_eval": [p.grad for p in params if p.grad is not None],
        "params": {name: p.detach().clone() for name, p in named},
        "first_microbatch_losses": first_logged,
        "first_grads": first_grads,
        "input_after_step": [c.input_SBH for c in chunks],
    }


def _pool_main(rank: int, port: int, out_dir: str) -> None:
    faulthandler.dump_traceback_later(RANK_HANG_S, exit=True)
    join(port, rank, PP)
    pctx = groups.initialize(1, PP, 1, 1)
    chunks = _chunks(pctx)
    results = {
        "microbatches not a multiple of pp": refusal(lambda: _run(chunks, pctx, 0, 3)),
        # Rank 1 passes one chunk (plain 1F1B) while rank 0 passes two.
        "vp mismatch": refusal(lambda: _run(chunks[: VP - rank], pctx, 0, MICROBATCHES)),
        "one iterator for all chunks": refusal(lambda: forward_backward(
            forward_step, iter([]) if rank == 1 else [iter([])] * VP, chunks,
            num_microbatches=MICROBATCHES, seq_length=S, micro_batch_size=2, hidden_size=H,
            pctx=pctx,
        )),
    }
    results[MICROBATCHES] = _train(pctx, MICROBATCHES)
    results[PP] = _train(pctx, PP)
    groups.destroy()
    dist.destroy_process_group()
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> dict[int, dict]:
    out_dir = tmp_path_factory.mktemp("interleaved")
    spawn_ranks(_pool_main, (free_ports(1)[0], str(out_dir)), PP, POOL_DEADLINE_S, "rank pool")
    return {rank: torch.load(out_dir / f"rank{rank}.pt") for rank in range(PP)}


@pytest.fixture(scope="module")
def first_step() -> dict:
    """The reference's first step: per-microbatch losses (of each microbatch count) and the
    gradients of the full-batch mean loss (= the mean of the microbatch losses: equal sizes)."""
    model = ToyStage(0, 1)
    tokens, labels = global_batches()
    model(tokens[0], labels[0]).mean().backward()
    return {
        "grads": {name: p.grad for name, p in model.named_parameters()},
        "microbatch_losses": {
            m: [model(t, l).mean().item() for t, l in zip(tokens[0].chunk(m), labels[0].chunk(m))]
            for m in (MICROBATCHES, PP)
        },
    }


@pytest.mark.parametrize("num_microbatches", [MICROBATCHES, PP], ids=["m4", "m2-all-warmup"])
def test_interleaved_matches_single_process_reference(
    pool, toy_reference, first_step, num_microbatches
):
    results = [pool[rank][num_microbatches] for rank in range(PP)]
    assert_layout_matches(results, toy_reference, PP, 1)
    for r in results:
        assert set(r["first_grads"]) == set(r["params"])
        for name, grad in r["first_grads"].items():
            torch.testing.assert_close(grad, first_step["grads"][name], rtol=RTOL, atol=1e-7)
        assert r["input_after_step"] == [None] * VP  # no activation graph outlives the call
    assert results[0]["first_microbatch_losses"] == []
    assert results[-1]["first_microbatch_losses"] == pytest.approx(
        first_step["microbatch_losses"][num_microbatches], rel=RTOL
    )


def test_chunks_are_virtual_stages_in_megatron_order(pool):
    # Rank 0: stages 0 and 2; rank 1: stages 1 and 3 (embedding first, head last).
    layers = [
        sorted({name.split(".")[1] for name in pool[rank][MICROBATCHES]["params"]
                if name.startswith("layers.")})
        for rank in range(PP)
    ]
    assert layers == [["0", "2"], ["1", "3"]]
    assert any(n.startswith("embed.") for n in pool[0][MICROBATCHES]["params"])
    assert any(n.startswith("head.") for n in pool[1][MICROBATCHES]["params"])


def test_refuses_microbatches_not_a_multiple_of_pp_on_every_stage(pool):
    for rank in range(PP):
        message = pool[rank]["microbatches not a multiple of pp"]
        assert "num_microbatches=3 must be a multiple of pp=2 for the interleaved" in message


def test_refuses_stages_disagreeing_on_vp(pool):
    for rank in range(PP):
        assert "pipeline stages disagree on vp (min 1, max 2)" in pool[rank]["vp mismatch"]


def test_refuses_a_single_iterator_for_several_chunks(pool):
    message = pool[1]["one iterator for all chunks"]
    assert "data_iterator must be a list of vp=2 iterators (one per model chunk)" in message
    assert "another pipeline stage reported a problem" in pool[0]["one iterator for all chunks"]


def test_refuses_chunks_without_pipeline_parallelism():
    chunks = [ToyStage(0, 2), ToyStage(1, 2)]
    with pytest.raises(ValueError, match=r"vp=2 model chunks need pipeline parallelism"):
        forward_backward(
            forward_step, [iter([]), iter([])], chunks, num_microbatches=2, seq_length=S,
            micro_batch_size=4, hidden_size=H, pctx=ParallelContext.single(),
        )
    with pytest.raises(ValueError, match=r"stage_module is an empty list of model chunks"):
        forward_backward(
            forward_step, [], [], num_microbatches=2, seq_length=S, micro_batch_size=4,
            hidden_size=H, pctx=ParallelContext.single(),
        )


def test_one_chunk_list_is_the_plain_schedule(toy_reference):
    stage = ToyStage(0, 1)
    tokens, labels = global_batches()
    batches = list(zip(tokens[0].chunk(MICROBATCHES), labels[0].chunk(MICROBATCHES)))
    logged = forward_backward(
        forward_step, [iter(batches)], torch.nn.ModuleList([stage]),
        num_microbatches=MICROBATCHES, seq_length=S, micro_batch_size=GLOBAL_BATCH // MICROBATCHES,
        hidden_size=H, pctx=ParallelContext.single(),
    )
    mean_loss = torch.stack([d["loss"] for d in logged]).mean().item()
    assert mean_loss == pytest.approx(toy_reference["losses"][0], rel=RTOL)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in stage.parameters()]))
    assert norm.item() == pytest.approx(toy_reference["norms"][0], rel=RTOL)
