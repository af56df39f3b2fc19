"""Expert-parallel dispatch parity on gloo (case C6 and random top-2 routing).

``ExpertParallelExperts`` on every rank of an EP group must reproduce a single-process ``LocalExperts``
run over the EP group's concatenated tokens: the output rows, the input and routing-weight gradients,
every expert's weight gradients (each expert on the rank that owns it), and the global per-expert load.
One spawn of 4 gloo ranks runs every case: the world is the EP=4 group, and [0, 1] and [2, 3] are two
EP=2 groups (two expert-data-parallel replicas) that run the same cases side by side. Expert
parameters are initialised from their state-dict names, so every layout and the reference agree.

Shape letters: T tokens on a rank, K activated experts, D model dim, E routed experts.
"""

from __future__ import annotations

import datetime
import faulthandler
import zlib

import pytest
import torch
import torch.distributed as dist
from torch import nn

from support.spawn import free_ports, spawn_ranks
from v4train.model.config import ModelConfig
from v4train.model.moe import LocalExperts, expert_parallel_experts

TOL = 1e-6
# A hung rank dumps its stack and exits after RANK_HANG_S; the pool needs ~10 s on 2 idle cores, the
# margin covers a machine shared with other test runs.
RANK_HANG_S = 100
POOL_DEADLINE_S = 120
GLOO_TIMEOUT = datetime.timedelta(seconds=60)

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU/gloo suite")

# C6: top-1, E=4, ep=2 (rank 0 holds experts 0-1, rank 1 holds 2-3). Rank 0 sends 3 tokens to expert 2
# and rank 1 sends 7; expert 1 gets nothing from rank 0, expert 0 nothing from rank 1, expert 3 nothing
# at all (it still gets a zero gradient). Each row is (expert id, tokens of that rank routed to it).
C6_ROUTING = {0: [(0, 5), (2, 3)], 1: [(2, 7), (1, 4)]}
C6_LOAD = [5, 4, 10, 0]


def _config(n_experts: int, k: int) -> ModelConfig:
    return ModelConfig.preset("nano", vocab_size=64, dim=16, moe_inter_dim=12,
                              n_routed_experts=n_experts, n_activated_experts=k)


def _init_by_name(module: nn.Module) -> None:
    """Parameters drawn from crc32 of their names: identical in every layout."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            param.copy_(torch.randn(param.shape, generator=gen) * 0.5)


def _c6_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, D], weights [T, 1], indices [T, 1], upstream grad [T, D] of rank ``rank`` (T = 8 or 11)."""
    ids = torch.tensor([e for e, n in C6_ROUTING[rank] for _ in range(n)])
    gen = torch.Generator().manual_seed(100 + rank)
    ids = ids[torch.randperm(len(ids), generator=gen)]  # interleaved, so the permutation is not trivial
    T = len(ids)
    return (torch.randn(T, 16, generator=gen), torch.rand(T, 1, generator=gen) + 0.5, ids.unsqueeze(-1),
            torch.randn(T, 16, generator=gen))


def _random_batch(rank: int, n_experts: int, k: int, seed: int, tokens: int | None = None) -> tuple[torch.Tensor, ...]:
    """Random top-k routing over ``n_experts`` with T = ``tokens`` or 5 + 3*rank tokens (uneven across ranks)."""
    gen = torch.Generator().manual_seed(seed * 10 + rank)
    T = 5 + 3 * rank if tokens is None else tokens
    indices = torch.rand(T, n_experts, generator=gen).topk(k, dim=-1).indices
    return (torch.randn(T, 16, generator=gen), torch.rand(T, k, generator=gen) + 0.5, indices,
            torch.randn(T, 16, generator=gen))


def _no_tokens_batch(rank: int) -> tuple[torch.Tensor, ...]:
    """Top-2 over E=4: rank 0 of the pair has T = 0 tokens, rank 1 has 6."""
    return _random_batch(rank, 4, 2, seed=4, tokens=6 * rank)


def _run(module: nn.Module, x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, grad: torch.Tensor) -> dict:
    """One forward and backward of ``module``: output, input and weight grads, expert grads by name."""
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = module(x, w, idx)
    (y * grad).sum().backward()
    return {"y": y.detach(), "dx": x.grad, "dw": w.grad,
            "grads": {name: p.grad for name, p in module.named_parameters()}}


def _ep_case(cfg: ModelConfig, group, ep_rank: int, ep_size: int, batch: tuple) -> dict:
    module = expert_parallel_experts(cfg, ep_group=group, ep_rank=ep_rank, ep_size=ep_size)
    _init_by_name(module)
    out = _run(module, *batch)
    out["load"] = module.last_load()
    out["state_keys"] = sorted(module.state_dict())
    return out


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    faulthandler.dump_traceback_later(RANK_HANG_S, exit=True)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=4,
                            timeout=GLOO_TIMEOUT)
    pair_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]  # collective: every rank creates both
    pair, ep2_rank = pair_groups[rank // 2], rank % 2
    results = {
        "c6": _ep_case(_config(4, 1), pair, ep2_rank, 2, _c6_batch(ep2_rank)),
        "top2_ep2": _ep_case(_config(8, 2), pair, ep2_rank, 2, _random_batch(ep2_rank, 8, 2, seed=1)),
        # a rank without tokens still takes part in every exchange (all its splits are zero)
        "no_tokens_ep2": _ep_case(_config(4, 2), pair, ep2_rank, 2, _no_tokens_batch(ep2_rank)),
        "top2_ep4": _ep_case(_config(8, 2), dist.group.WORLD, rank, 4, _random_batch(rank, 8, 2, seed=2)),
    }
    dist.destroy_process_group()
    torch.save(results, f"{out_dir}/rank{rank}.pt")
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def pool(tmp_path_factory) -> dict[int, dict]:
    out_dir = tmp_path_factory.mktemp("ep")
    spawn_ranks(_rank_main, (free_ports(1)[0], str(out_dir)), 4, POOL_DEADLINE_S, "expert-parallel ranks")
    return {rank: torch.load(out_dir / f"rank{rank}.pt") for rank in range(4)}


def _assert_matches_local_reference(results: list[dict], batches: list[tuple], cfg: ModelConfig) -> None:
    """``results[r]`` of EP rank r against LocalExperts over the concatenation of ``batches``."""
    reference = LocalExperts(cfg)
    _init_by_name(reference)
    ref = _run(reference, *(torch.cat(parts) for parts in zip(*batches)))
    rows = torch.tensor([0] + [len(b[0]) for b in batches]).cumsum(0).tolist()
    held: set[str] = set()
    for r, got in enumerate(results):
        mine = slice(rows[r], rows[r + 1])
        for key in ("y", "dx", "dw"):
            torch.testing.assert_close(got[key], ref[key][mine], rtol=TOL, atol=TOL, msg=f"rank {r} {key}")
        assert got["grads"], f"rank {r} holds no expert"
        for name, grad in got["grads"].items():
            torch.testing.assert_close(grad, ref["grads"][name], rtol=TOL, atol=TOL, msg=f"rank {r} {name}")
        held |= set(got["grads"])
        assert got["state_keys"] == sorted(got["grads"])  # same names as LocalExperts; no extra state
        indices = torch.cat([b[2] for b in batches])
        assert torch.equal(got["load"], torch.bincount(indices.flatten(), minlength=cfg.n_routed_experts))
    assert held == set(ref["grads"]), "the ranks together must hold every expert exactly once"


def test_c06_uneven_expert_load(pool):
    cfg = _config(4, 1)
    for group in ([0, 1], [2, 3]):
        results = [pool[r]["c6"] for r in group]
        _assert_matches_local_reference(results, [_c6_batch(0), _c6_batch(1)], cfg)
        for got in results:
            assert got["load"].tolist() == C6_LOAD
        # rank 0 of the pair owns experts 0-1, rank 1 owns 2-3 (expert 3 got no token: zero gradient)
        assert {n.split(".")[1] for n in results[0]["grads"]} == {"0", "1"}
        assert torch.equal(results[1]["grads"]["experts.3.w1.weight"], torch.zeros(12, 16))


@pytest.mark.parametrize("ep", [2, 4])
def test_random_top2_routing_matches_local_experts(pool, ep):
    cfg = _config(8, 2)
    if ep == 2:
        for group in ([0, 1], [2, 3]):
            batches = [_random_batch(r, 8, 2, seed=1) for r in range(2)]
            _assert_matches_local_reference([pool[r]["top2_ep2"] for r in group], batches, cfg)
    else:
        batches = [_random_batch(r, 8, 2, seed=2) for r in range(4)]
        _assert_matches_local_reference([pool[r]["top2_ep4"] for r in range(4)], batches, cfg)


def test_rank_without_tokens_matches_local_experts(pool):
    for group in ([0, 1], [2, 3]):
        results = [pool[r]["no_tokens_ep2"] for r in group]
        assert results[0]["y"].shape == (0, 16)
        _assert_matches_local_reference(results, [_no_tokens_batch(0), _no_tokens_batch(1)], _config(4, 2))


def test_ep1_without_group_matches_local_experts():
    """ep=1 needs no process group and exchanges nothing."""
    cfg = _config(8, 2)
    batch = _random_batch(0, 8, 2, seed=3)
    _assert_matches_local_reference([_ep_case(cfg, None, 0, 1, batch)], [batch], cfg)


def test_last_load_is_zero_before_any_forward():
    module = expert_parallel_experts(_config(8, 2), ep_group=None, ep_rank=0, ep_size=1)
    assert torch.equal(module.last_load(), torch.zeros(8, dtype=torch.int64))


def test_ep_not_dividing_experts_is_refused():
    with pytest.raises(ValueError, match=r"ep=3 must be >= 1 and divide n_routed_experts=8"):
        expert_parallel_experts(_config(8, 2), ep_group=None, ep_rank=0, ep_size=3)


@pytest.mark.parametrize(("ep_rank", "ep_size", "message"), [
    (2, 2, r"ep_rank=2 is outside \[0, ep=2\)"),
    (0, 2, r"ep=2 > 1 needs an ep_group"),
    (0, 0, r"ep=0 must be >= 1"),
])
def test_inconsistent_ep_arguments_are_refused(ep_rank, ep_size, message):
    with pytest.raises(ValueError, match=message):
        expert_parallel_experts(_config(8, 2), ep_group=None, ep_rank=ep_rank, ep_size=ep_size)
