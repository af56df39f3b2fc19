"""parallel.distributed_muon: the ownership partition, and the distributed step against the plain Muon.

The partition is checked for determinism, coverage and Graham's bound on a real nano stage; the step on
spawned gloo ranks (4 data-parallel ranks with a separate expert group, and 2 x 2 tensor x data parallel
with blocks straddling the TP cut) against :class:`parallel.muon.Muon` on the whole matrices over 3 steps;
the momentum lives only with owners, and the global state round-trips both ways.
"""

from __future__ import annotations

import datetime
import faulthandler

import pytest
import torch
import torch.distributed as dist
from torch import nn

from support.spawn import free_ports, spawn_ranks
from v4train.parallel.distributed_muon import (
    DistributedMuon, muon_units, newton_schulz_flops, partition_units,
)
from v4train.parallel.muon import Muon, MuonSplit
from v4train.parallel.optim import build_optimizer

RANK_HANG_S = 240
POOL_DEADLINE_S = 480  # 4 spawned ranks import torch; a loaded 2-core machine takes minutes to start them
SETTINGS = dict(lr=0.05, weight_decay=0.1)

# name: (whole shape, muon_split, TP partition dim or None, expert)
_CASES = {
    "a": ((24, 40), None, 0, False),
    "b": ((24, 40), None, None, False),            # same shape as "a": batched with it on one owner
    "c": ((40, 24), None, 1, False),
    "wo": ((32, 16), MuonSplit(0, (8, 8, 8, 8)), 0, False),
    "fn": ((24, 16), MuonSplit(0, (4, 4, 16)), 0, False),   # the 16-row block straddles the TP cut
    "col": ((16, 30), MuonSplit(1, (10, 20)), 0, False),    # split across the partition dim
    "big": ((48, 40), MuonSplit(0, (20, 28)), 0, False),    # blocks owned by two ranks, straddling the cut
    "e0": ((12, 20), None, None, True),
    "e1": ((12, 20), None, None, True),
    "e2": ((20, 12), None, None, True),
}


# ----------------------------------------------------------------------------- partition
def test_flops_count_the_short_side():
    assert newton_schulz_flops((8, 32), 10) == newton_schulz_flops((32, 8), 10) == 10 * (4 * 64 * 32 + 2 * 512)
    with pytest.raises(ValueError, match="matrix shape"):
        newton_schulz_flops((3,), 1)


def test_partition_is_deterministic_covering_and_balanced():
    costs = [7, 7, 7, 3, 3, 100, 1, 1, 1, 50]
    for size in (1, 2, 3, 4, 16):
        owners = partition_units(costs, size)
        assert owners == partition_units(list(costs), size)
        assert len(owners) == len(costs) and all(0 <= o < size for o in owners)
        loads = [sum(c for c, o in zip(costs, owners, strict=True) if o == r) for r in range(size)]
        assert max(loads) <= sum(costs) / size + max(costs)  # Graham's list-scheduling bound
    # longest first: the two big units land on different ranks
    assert partition_units([1, 100, 99], 2) == [1, 0, 1]
    with pytest.raises(ValueError, match="group size"):
        partition_units([1], 0)


def test_partition_of_a_nano_stage_is_a_function_of_the_model_and_group_size():
    """Every unit (each expert matrix, each muon_split block) has one owner; two separately built stages
    of the same model give the same table; at dp 2 and 4 the busiest rank carries at most 1/dp of the
    FLOPs plus the largest unit."""
    from support.model import small_cfg  # the model stays out of the spawned ranks' imports
    from v4train.model import V4Stage

    tables = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        stage = V4Stage(small_cfg(), pp_rank=0, pp_size=1)
        named = [(n, p) for n, p in stage.named_parameters()
                 if p.ndim == 2 and "norm" not in n and ".embed." not in f".{n}." and ".head." not in f".{n}."]
        units = muon_units([p.shape for _, p in named], [getattr(p, "muon_split", None) for _, p in named])
        split_blocks = sum(len(p.muon_split.sizes) for _, p in named if hasattr(p, "muon_split"))
        assert len(units) == len(named) - sum(hasattr(p, "muon_split") for _, p in named) + split_blocks
        costs = [newton_schulz_flops(u.shape, 10) for u in units]
        tables.append({size: partition_units(costs, size) for size in (2, 4)})
        for size, owners in tables[-1].items():
            loads = [sum(c for c, o in zip(costs, owners, strict=True) if o == r) for r in range(size)]
            assert max(loads) <= sum(costs) / size + max(costs)
            assert min(loads) > 0
    assert tables[0] == tables[1]


# ----------------------------------------------------------------------------- the step on gloo ranks
def _params(tp_rank: int, tp_size: int) -> tuple[dict[str, nn.Parameter], dict[str, nn.Parameter]]:
    """The whole reference parameters and this rank's (possibly sharded) copies, same values everywhere."""
    gen = torch.Generator().manual_seed(11)
    ref, mine = {}, {}
    for name, (shape, split, dim, _) in _CASES.items():
        whole = torch.randn(shape, generator=gen)
        ref[name] = nn.Parameter(whole.clone())
        sharded = dim is not None and tp_size > 1
        mine[name] = nn.Parameter(whole.chunk(tp_size, dim=dim)[tp_rank].clone() if sharded else whole.clone())
        if split is not None:
            ref[name].muon_split = mine[name].muon_split = split
        if sharded:
            mine[name].tensor_model_parallel, mine[name].partition_dim, mine[name].partition_stride = True, dim, 1
    return ref, mine


def _piece(name: str, t: torch.Tensor, tp_rank: int, tp_size: int) -> torch.Tensor:
    dim = _CASES[name][2]
    return t.chunk(tp_size, dim=dim)[tp_rank] if dim is not None and tp_size > 1 else t


def _compare(rank: int, world: int, tp_size: int) -> dict:
    tp_rank, dp_rank = rank % tp_size, rank // tp_size
    tp_group = dp_group = None
    for start in range(0, world, tp_size):  # every rank creates every group, in the same order
        g = dist.new_group(list(range(start, start + tp_size)))
        if start // tp_size == dp_rank:
            tp_group = g
    for t in range(tp_size):
        g = dist.new_group(list(range(t, world, tp_size)))
        if t == tp_rank:
            dp_group = g
    # experts: data-parallel over pairs of ranks when there is no TP, else over the whole world
    expert_group = dist.group.WORLD
    if tp_size == 1:
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        expert_group = pairs[rank // 2]
    ref, mine = _params(tp_rank, tp_size)
    dense = [p for n, p in mine.items() if not _CASES[n][3]]
    experts = [p for n, p in mine.items() if _CASES[n][3]]
    plain = Muon(ref.values(), **SETTINGS)
    dist_opt = DistributedMuon(mine.values(), **SETTINGS, tp_group=tp_group if tp_size > 1 else None,
                               shard_groups=[(dp_group, dense), (expert_group, experts)])
    gen = torch.Generator().manual_seed(12)
    out = {"owned": {}, "param_rel": 0.0, "momentum_rel": 0.0, "resume_rel": 0.0}
    grads = []
    for step in range(3):
        grads.append({n: torch.randn(_CASES[n][0], generator=gen) for n in _CASES})
        for n in _CASES:
            ref[n].grad = grads[-1][n]
            mine[n].grad = _piece(n, grads[-1][n], tp_rank, tp_size).clone()
        plain.step()
        dist_opt.step()
        if step == 1:  # momentum lives with owners; the gathered state is the plain optimizer's
            out["owned"] = {n: (dist_opt.owned_blocks(p), "momentum_buffer" in dist_opt.state.get(p, {}))
                            for n, p in mine.items()}
            out["flops"] = dist_opt.owned_flops()
            dist_opt.gather_state()
            for n, p in mine.items():
                want = _piece(n, plain.state[ref[n]]["momentum_buffer"], tp_rank, tp_size)
                got = dist_opt.state[p]["momentum_buffer"]
                out["momentum_rel"] = max(out["momentum_rel"], ((got - want).norm() / want.norm()).item())
                assert dist_opt.state[p]["step"].item() == 2
            dist_opt.scatter_state()
            plain_state = {n: {k: v.clone() for k, v in plain.state[ref[n]].items()} for n in _CASES}
            before = {n: ref[n].detach().clone() for n in _CASES}
    for n in _CASES:
        want = _piece(n, ref[n].detach(), tp_rank, tp_size)
        out["param_rel"] = max(out["param_rel"], ((mine[n] - want).norm() / want.norm()).item())
    # resume from the plain optimizer's state (as a checkpoint load gives it) into fresh copies
    _, again = _params(tp_rank, tp_size)
    resumed = DistributedMuon(again.values(), **SETTINGS, tp_group=tp_group if tp_size > 1 else None,
                              shard_groups=[(dp_group, [p for n, p in again.items() if not _CASES[n][3]]),
                                            (expert_group, [p for n, p in again.items() if _CASES[n][3]])])
    with torch.no_grad():
        for n, p in again.items():
            p.copy_(_piece(n, before[n], tp_rank, tp_size))
            resumed.state[p] = {"step": plain_state[n]["step"].clone(),
                                "momentum_buffer": _piece(n, plain_state[n]["momentum_buffer"], tp_rank,
                                                          tp_size).clone()}
            p.grad = _piece(n, grads[2][n], tp_rank, tp_size).clone()
    resumed.scatter_state()
    resumed.step()
    for n, p in again.items():
        want = _piece(n, ref[n].detach(), tp_rank, tp_size)
        out["resume_rel"] = max(out["resume_rel"], ((p - want).norm() / want.norm()).item())
    return out


def _rank(rank: int, port: int, world: int, out_dir: str) -> None:
    faulthandler.dump_traceback_later(RANK_HANG_S, exit=True)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        for tp_size in (1, 2):  # both layouts in one pool: starting ranks costs more than the steps
            torch.save(_compare(rank, world, tp_size), f"{out_dir}/tp{tp_size}_rank{rank}.pt")
    finally:
        dist.destroy_process_group()
        faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    """The result files of 4 gloo ranks that ran both layouts (DP 4; TP 2 x DP 2)."""
    out = tmp_path_factory.mktemp("distributed_muon")
    spawn_ranks(_rank, (free_ports(1)[0], 4, str(out)), 4, POOL_DEADLINE_S, "distributed Muon ranks")
    return out


@pytest.mark.parametrize("tp_size", [1, 2], ids=["dp4", "tp2xdp2"])
def test_distributed_step_equals_plain_muon(four_ranks, tp_size):
    """4 gloo ranks, 3 steps: parameters equal the plain Muon within 1e-6 relative; every unit has
    exactly one owner per group; only owners hold momentum; the gathered momentum equals the plain one;
    a plain optimizer's state resumes in the distributed one."""
    world = 4
    results = [torch.load(four_ranks / f"tp{tp_size}_rank{r}.pt") for r in range(world)]
    for rank, res in enumerate(results):
        assert res["param_rel"] <= 1e-6, (rank, res["param_rel"])
        assert res["momentum_rel"] <= 1e-6, (rank, res["momentum_rel"])
        assert res["resume_rel"] <= 1e-6, (rank, res["resume_rel"])
        for name, (blocks, has_momentum) in res["owned"].items():
            assert has_momentum == bool(blocks), (rank, name)
    # ownership: each dense unit on exactly one rank of each data-parallel group
    dp_groups = [[0, 1, 2, 3]] if tp_size == 1 else [[0, 2], [1, 3]]
    expert_groups = [[0, 1], [2, 3]] if tp_size == 1 else [[0, 1, 2, 3]]
    for name, (_, split, _, expert) in _CASES.items():
        n_blocks = len(split.sizes) if split is not None else 1
        for members in (expert_groups if expert else dp_groups):
            owned = sorted(b for r in members for b in results[r]["owned"][name][0])
            assert owned == list(range(n_blocks)), (name, members, owned)
    # the partly-owned path runs: some matrix has its blocks on two ranks of one group
    assert any(0 < len(results[r]["owned"][name][0]) < len(split.sizes)
               for name, (_, split, _, _) in _CASES.items() if split is not None for r in range(world))
    # the work is split: no rank of a DP group of 4 does more than half the dense FLOPs
    if tp_size == 1:
        for res in results:
            mine, total = res["flops"][0]
            assert 0 < mine <= total / 2


def test_build_optimizer_makes_the_distributed_muon_and_checks_coverage():
    """One process (groups of one): ``muon_shard_groups`` gives a DistributedMuon owning everything, whose
    step equals the plain Muon's; a Muon parameter in no group is refused."""
    from support.model import small_cfg
    from v4train.model import V4Stage

    torch.manual_seed(0)
    stages = [V4Stage(small_cfg(), pp_rank=0, pp_size=1) for _ in range(2)]
    stages[1].load_state_dict(stages[0].state_dict())
    params = [list(s.parameters()) for s in stages]
    opts = [build_optimizer(stages[0].named_parameters(), algorithm="muon", lr=0.01, weight_decay=0.1, eps=1e-20),
            build_optimizer(stages[1].named_parameters(), algorithm="muon", lr=0.01, weight_decay=0.1, eps=1e-20,
                            muon_shard_groups=[(None, params[1])])]
    assert isinstance(opts[1].optimizers[0], DistributedMuon)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        for p0, p1 in zip(*params, strict=True):
            p0.grad = torch.randn(p0.shape, generator=gen)
            p1.grad = p0.grad.clone()
        for opt in opts:
            opt.step()
    for p0, p1 in zip(*params, strict=True):
        torch.testing.assert_close(p1, p0, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="in no shard_groups"):
        build_optimizer(stages[1].named_parameters(), algorithm="muon", lr=0.01, weight_decay=0.1, eps=1e-20,
                        muon_shard_groups=[(None, params[1][:3])])


# ----------------------------------------------------------------------------- checkpoints by global name
class _Matrices(nn.Module):
    """The dense cases of ``_CASES`` as one module (whole, unsharded), seeded values."""

    def __init__(self):
        super().__init__()
        _, whole = _params(0, 1)
        self.mats = nn.ParameterDict({n: p for n, p in whole.items()})


def _stepped(opt, module: _Matrices, steps: int) -> None:
    gen = torch.Generator().manual_seed(21)
    for _ in range(steps):
        for n, p in module.mats.items():
            p.grad = torch.randn(_CASES[n][0], generator=gen)
        opt.step()


def _ckpt_rank(rank: int, port: int, root: str) -> None:
    from v4train.orchestrator import checkpoint
    from v4train.orchestrator.checkpoint.storage import Storage

    faulthandler.dump_traceback_later(RANK_HANG_S, exit=True)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        storage = Storage(root)
        # a plain single-process checkpoint loads into DP 2: owners get their part, the rest nothing
        module = _Matrices()
        opt = DistributedMuon(module.parameters(), **SETTINGS, shard_groups=[(dist.group.WORLD, module.parameters())])
        checkpoint.load_shards(storage, "plain", module, opt)
        loaded = {n: (opt.owned_blocks(p), {k: v.clone() for k, v in opt.state.get(p, {}).items()})
                  for n, p in module.mats.items()}
        # DP 2 trains on and saves; the main process loads it without distribution
        _stepped(opt, module, 1)
        checkpoint.save_shards(storage, "distributed", module, opt)
        assert all(bool(opt.state.get(p)) == bool(opt.owned_blocks(p)) for p in module.parameters())
        torch.save(loaded, f"{root}/loaded{rank}.pt")
    finally:
        dist.destroy_process_group()
        faulthandler.cancel_dump_traceback_later()


def test_checkpoints_stay_global_across_dp_sizes(tmp_path):
    """Plain Muon (one process) saves after 2 steps; 2 distributed ranks load it through
    orchestrator.checkpoint (each keeps only its units' momentum), step once and save; the plain Muon
    loads that and equals a plain run of 3 steps (momentum and parameters, 1e-6 relative)."""
    from v4train.orchestrator import checkpoint
    from v4train.orchestrator.checkpoint.storage import Storage

    storage = Storage(str(tmp_path))
    module = _Matrices()
    opt = Muon(module.parameters(), **SETTINGS)
    _stepped(opt, module, 2)
    checkpoint.save_shards(storage, "plain", module, opt)
    after_two = {n: opt.state[p]["momentum_buffer"].clone() for n, p in module.mats.items()}
    spawn_ranks(_ckpt_rank, (free_ports(1)[0], str(tmp_path)), 2, POOL_DEADLINE_S, "checkpoint ranks")
    for rank in range(2):
        for n, (blocks, state) in torch.load(tmp_path / f"loaded{rank}.pt").items():
            assert bool(state) == bool(blocks), (rank, n)
            if state:
                split = _CASES[n][1]
                want = split.blocks(after_two[n]) if split is not None else (after_two[n],)
                got = split.blocks(state["momentum_buffer"]) if split is not None else (state["momentum_buffer"],)
                for j in range(len(want)):
                    assert torch.equal(got[j], want[j] if j in blocks else torch.zeros_like(want[j])), (rank, n, j)
    # the plain reference: 3 steps with the same gradients (2, then the ranks' third)
    reference = _Matrices()
    ref_opt = Muon(reference.parameters(), **SETTINGS)
    _stepped(ref_opt, reference, 2)
    gen = torch.Generator().manual_seed(21)  # the ranks' third step drew the first gradients again
    for n, p in reference.mats.items():
        p.grad = torch.randn(_CASES[n][0], generator=gen)
    ref_opt.step()
    resumed = _Matrices()
    resumed_opt = Muon(resumed.parameters(), **SETTINGS)
    checkpoint.load_shards(storage, "distributed", resumed, resumed_opt)
    for n, p in resumed.mats.items():
        want_p, want_m = reference.mats[n].detach(), ref_opt.state[reference.mats[n]]["momentum_buffer"]
        assert ((p.detach() - want_p).norm() / want_p.norm()).item() <= 1e-6, n
        got_m = resumed_opt.state[p]["momentum_buffer"]
        assert ((got_m - want_m).norm() / want_m.norm()).item() <= 1e-6, n
        assert resumed_opt.state[p]["step"].item() == 3
