"""parallel.muon (V4's Muon, spec section 6) and the Muon/AdamW split of parallel.optim.

Newton-Schulz against spec 10.3 item 4, the update RMS, one Muon step against a hand-written copy of
Algorithm 1, logically independent blocks, tensor-parallel shards on 2 gloo ranks against the
single-process optimizer on the whole matrix, the parameter assignment on a real nano V4Stage, and the
HybridOptimizer's state handling (state_dict round trip, initial state, merged state view).
"""

from __future__ import annotations

import copy
import datetime
import faulthandler
import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from support.model import small_cfg
from support.spawn import free_ports, spawn_ranks
from v4train.model import V4Stage
from v4train.model.config import ModelConfig
from v4train.parallel.muon import UPDATE_RMS, V4_NS_STEPS, Muon, MuonSplit, hybrid_newton_schulz
from v4train.parallel.optim import HybridOptimizer, build_optimizer, describe_assignment, initial_state

RANK_HANG_S = 90
POOL_DEADLINE_S = 120


def _reference_ns(M: torch.Tensor) -> torch.Tensor:
    """Spec section 6 verbatim, float64, no transpose: X = a X + b (X X^T) X + c (X X^T)^2 X."""
    X = M.double() / torch.linalg.matrix_norm(M.double())
    for a, b, c in [(3.4445, -4.7750, 2.0315)] * 8 + [(2.0, -1.5, 0.5)] * 2:
        G = X @ X.T
        X = a * X + b * G @ X + c * G @ G @ X
    return X


def _orthonormal(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))
    return q


# ----------------------------------------------------------------------------- Newton-Schulz
@pytest.mark.parametrize("shape", [(64, 128), (128, 64), (32, 128)])
def test_newton_schulz_rectangular_random_singular_values_are_one(shape):
    """Spec 10.3 item 4: rectangular random M (aspect >= 2): every singular value lands in 1 +/- 0.01."""
    M = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    source = torch.linalg.svdvals(M) / torch.linalg.matrix_norm(M)
    assert source.min() >= 1e-3  # all of them are covered by the statement
    sigma = torch.linalg.svdvals(hybrid_newton_schulz(M))
    assert (sigma - 1).abs().max() <= 0.01


def test_newton_schulz_well_conditioned_square_and_threshold():
    """Spec 10.3 item 4 on a known spectrum: values with sigma/||M||_F >= 1e-3 land in 1 +/- 0.01 (a
    well-conditioned square matrix, and the covered part of a 1e-5..1 spread); far smaller ones are not
    lifted in 10 steps. NS(U diag(s) V^T) = U p(s) V^T, so p(s_i) = (U^T NS V)_ii."""
    gen = torch.Generator().manual_seed(2)
    U, V = _orthonormal(96, 96, gen), _orthonormal(96, 96, gen)
    s = torch.linspace(1.0, 3.0, 96, dtype=torch.float64)
    out = hybrid_newton_schulz((U * s) @ V.T).double()
    assert ((U.T @ out @ V).diagonal() - 1).abs().max() <= 0.01

    U, V = _orthonormal(48, 48, gen), _orthonormal(96, 48, gen)
    s = torch.logspace(-5, 0, 48, dtype=torch.float64)
    M = ((U * s) @ V.T).float()
    p = (U.T @ hybrid_newton_schulz(M).double() @ V).diagonal()
    ratio = s / s.norm()
    assert (ratio >= 1e-3).sum() >= 20 and ratio.min() < 1e-5
    assert (p[ratio >= 1e-3] - 1).abs().max() <= 0.01
    assert p[ratio < 1e-5].max() < 0.99


def test_newton_schulz_matches_the_spec_formula_batched_and_zero():
    gen = torch.Generator().manual_seed(3)
    stack = torch.randn(3, 40, 24, generator=gen) * torch.tensor([1e-12, 1.0, 1e6]).view(3, 1, 1)
    out = hybrid_newton_schulz(stack)
    assert out.dtype == torch.float32 and out.shape == stack.shape
    for i in range(3):  # scale-free, the transpose (40 > 24) changes nothing, batched == one by one
        torch.testing.assert_close(out[i].double(), _reference_ns(stack[i]), rtol=0, atol=2e-5)
        torch.testing.assert_close(out[i], hybrid_newton_schulz(stack[i]), rtol=0, atol=1e-6)
    assert torch.equal(hybrid_newton_schulz(torch.zeros(4, 6)), torch.zeros(4, 6))
    with pytest.raises(ValueError, match="needs a matrix"):
        hybrid_newton_schulz(torch.ones(3))


# ----------------------------------------------------------------------------- Muon step
def _one_update(weight: torch.Tensor, grad: torch.Tensor, split: MuonSplit | None = None) -> torch.Tensor:
    """O of one Muon step from zero momentum (lr 1, no decay, mu 0): W - W'."""
    p = nn.Parameter(weight.clone())
    if split is not None:
        p.muon_split = split
    p.grad = grad.clone()
    Muon([p], lr=1.0, weight_decay=0.0, momentum=0.0).step()
    return weight - p.detach()


def test_update_rms_is_0_18_for_a_full_rank_rectangular_matrix():
    gen = torch.Generator().manual_seed(4)
    update = _one_update(torch.randn(64, 256, generator=gen), torch.randn(64, 256, generator=gen))
    assert update.square().mean().sqrt().item() == pytest.approx(UPDATE_RMS, abs=1e-3)


@pytest.mark.parametrize("shape,nesterov", [((48, 24), True), ((24, 48), True), ((24, 48), False)])
def test_muon_steps_match_algorithm_1(shape, nesterov):
    """Three steps against spec section 6 written out (momentum, Nesterov, scale, decoupled decay)."""
    lr, wd, mu = 0.05, 0.1, 0.95
    gen = torch.Generator().manual_seed(5)
    W = torch.randn(shape, generator=gen, dtype=torch.float64)
    p = nn.Parameter(W.float().clone())
    opt = Muon([p], lr=lr, weight_decay=wd, momentum=mu, nesterov=nesterov)
    M = torch.zeros_like(W)
    for _ in range(3):
        G = torch.randn(shape, generator=gen, dtype=torch.float64)
        p.grad = G.float()
        opt.step()
        M = mu * M + G
        O = _reference_ns(mu * M + G if nesterov else M) * math.sqrt(max(shape)) * 0.18
        W = W * (1 - lr * wd) - lr * O
    torch.testing.assert_close(p.detach().double(), W, rtol=0, atol=2e-6)
    torch.testing.assert_close(opt.state[p]["momentum_buffer"].double(), M, rtol=0, atol=1e-5)
    assert opt.state[p]["step"].dtype == torch.float32 and opt.state[p]["step"].item() == 3.0
    assert opt.param_groups[0]["ns_steps"] == V4_NS_STEPS


def test_split_blocks_are_orthogonalised_separately():
    """A [2c, d] weight split in halves: its update is NS of each half (scaled by its own max dim);
    a dim-1 split with unequal sizes likewise."""
    c, d = 8, 20
    gen = torch.Generator().manual_seed(6)
    W, G = torch.randn(2 * c, d, generator=gen), torch.randn(2 * c, d, generator=gen)
    update = _one_update(W, G, MuonSplit(0, (c, c)))
    scale = math.sqrt(max(c, d)) * UPDATE_RMS
    expected = torch.cat([hybrid_newton_schulz(G[:c]), hybrid_newton_schulz(G[c:])]) * scale
    torch.testing.assert_close(update, expected, rtol=0, atol=1e-6)
    assert (update - _one_update(W, G)).abs().max() > 1e-2  # the split matters

    update = _one_update(W, G, MuonSplit(1, (5, 15)))
    expected = torch.cat([hybrid_newton_schulz(G[:, :5]) * math.sqrt(16) * UPDATE_RMS,
                          hybrid_newton_schulz(G[:, 5:]) * math.sqrt(16) * UPDATE_RMS], dim=1)
    torch.testing.assert_close(update, expected, rtol=0, atol=1e-6)


def test_muon_refuses_bad_parameters_and_settings():
    with pytest.raises(ValueError, match=r"2-D matrices only, got a parameter of shape \(4,\)"):
        Muon([nn.Parameter(torch.zeros(4))])
    tiled_wrong = nn.Parameter(torch.zeros(6, 4))
    tiled_wrong.muon_split = MuonSplit(0, (3, 2))
    with pytest.raises(ValueError, match="does not tile a matrix of shape"):
        Muon([tiled_wrong])
    with pytest.raises(ValueError, match="momentum=1.0 must be in"):
        Muon([nn.Parameter(torch.zeros(2, 2))], momentum=1.0)
    with pytest.raises(ValueError, match="ns_steps is empty"):
        Muon([nn.Parameter(torch.zeros(2, 2))], ns_steps=())
    with pytest.raises(ValueError, match="dim=2 must be 0"):
        MuonSplit(2, (1,))
    strided = nn.Parameter(torch.zeros(2, 2))
    strided.tensor_model_parallel, strided.partition_dim, strided.partition_stride = True, 0, 2
    with pytest.raises(ValueError, match="partition_stride=2"):
        Muon([strided])


# ----------------------------------------------------------------------------- tensor parallelism
# whole shape, partition_dim, split of the whole matrix (the "rows"/"cols" blocks straddle the shard cut)
_TP_CASES = {"rows": ((8, 6), 0, MuonSplit(0, (2, 6))), "cols": ((6, 10), 1, MuonSplit(1, (3, 7))),
             "tall": ((12, 4), 0, None), "replicated": ((5, 7), None, None)}


def _tp_compare(rank: int, group: dist.ProcessGroup) -> dict[str, tuple[float, float, float]]:
    """Per case: (max |shard - reference slice|, same for the momentum, max |shard - shard-local Muon|)."""
    gen = torch.Generator().manual_seed(7)
    whole = {k: torch.randn(shape, generator=gen) for k, (shape, _, _) in _TP_CASES.items()}

    def piece(name: str, t: torch.Tensor) -> torch.Tensor:
        dim = _TP_CASES[name][1]
        return t if dim is None else t.chunk(2, dim=dim)[rank]

    ref, tp, local = {}, {}, {}
    for name, (_, dim, split) in _TP_CASES.items():
        ref[name], tp[name], local[name] = (nn.Parameter(t.clone()) for t in
                                            (whole[name], piece(name, whole[name]), piece(name, whole[name])))
        if split is not None:  # local[name] keeps none: a split of the whole matrix does not fit a shard
            ref[name].muon_split = tp[name].muon_split = split
        if dim is not None:  # Megatron's attributes (set_tensor_model_parallel_attributes)
            tp[name].tensor_model_parallel, tp[name].partition_dim, tp[name].partition_stride = True, dim, 1
    settings = dict(lr=0.05, weight_decay=0.1)
    # reference on the whole matrices, the sharded optimizer, and what ignoring the sharding would do
    opts = [Muon(ref.values(), **settings), Muon(tp.values(), tp_group=group, **settings),
            Muon(local.values(), **settings)]
    for _ in range(3):
        for name, (shape, _, _) in _TP_CASES.items():
            grad = torch.randn(shape, generator=gen)
            ref[name].grad = grad
            tp[name].grad = piece(name, grad).clone()
            local[name].grad = piece(name, grad).clone()
        for opt in opts:
            opt.step()
    out = {}
    for name in _TP_CASES:
        out[name] = (
            (tp[name] - piece(name, ref[name])).abs().max().item(),
            (opts[1].state[tp[name]]["momentum_buffer"] - piece(name, opts[0].state[ref[name]]["momentum_buffer"])
             ).abs().max().item(),
            (tp[name] - local[name]).abs().max().item(),
        )
    return out


def _tp_rank(rank: int, port: int, out_dir: str) -> None:
    faulthandler.dump_traceback_later(RANK_HANG_S, exit=True)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        torch.save(_tp_compare(rank, dist.group.WORLD), f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
        faulthandler.cancel_dump_traceback_later()


def test_tensor_parallel_shards_match_the_whole_matrix(tmp_path):
    """2 gloo ranks, shards along dim 0 and dim 1 (with splits of the whole matrix straddling the cut),
    3 steps: each rank's shard equals the single-process optimizer's slice within 1e-6."""
    spawn_ranks(_tp_rank, (free_ports(1)[0], str(tmp_path)), 2, POOL_DEADLINE_S, "TP ranks")
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt")
        for name, (param_diff, momentum_diff, local_diff) in result.items():
            assert param_diff <= 1e-6 and momentum_diff <= 1e-6, (rank, name, param_diff, momentum_diff)
            # the gather matters: orthogonalising the shard alone gives another update
            assert (local_diff > 1e-3) == (name != "replicated"), (rank, name, local_diff)


# ----------------------------------------------------------------------------- V4 assignment
def _nano_stage() -> tuple[V4Stage, ModelConfig]:
    cfg = ModelConfig.preset("nano", vocab_size=64)
    stage = V4Stage(cfg, pp_rank=0, pp_size=1)
    stage.init_weights(0)
    stage.attention_mode = "dense"
    return stage, cfg


def test_assignment_on_a_nano_stage():
    stage, cfg = _nano_stage()
    marked = {n: p.muon_split for n, p in stage.named_parameters() if hasattr(p, "muon_split")}
    opt = build_optimizer(stage.named_parameters(), algorithm="muon", lr=3e-4, weight_decay=0.1, eps=1e-20)
    assert isinstance(opt, HybridOptimizer)
    names = {id(p): n for n, p in stage.named_parameters()}
    group_of: dict[str, str] = {}
    for group in opt.param_groups:
        for p in group["params"]:
            assert names[id(p)] not in group_of  # exactly one group
            group_of[names[id(p)]] = group["name"]
    assert set(group_of) == set(names.values())
    assert [g["name"] for g in opt.param_groups] == ["muon", "adamw_decay", "adamw_no_decay"]

    adamw = {n for n, g in group_of.items() if g != "muon"}
    assert {n for n in adamw if group_of[n] == "adamw_decay"} == {"embed.weight", "head.weight"}
    expected_adamw = {n for n in names.values()
                      if n in ("embed.weight", "head.weight") or "norm." in n
                      or n.rsplit(".", 1)[-1] in ("attn_sink", "ape", "base", "scale")}
    assert adamw == expected_adamw
    for n in names.values():
        if any(key in n for key in ("ffn.gate.weight", ".experts.", "shared_experts.", ".fn", "wo_a", "e_proj",
                                    "h_proj", "compressor.wkv", "compressor.wgate", "indexer.wq_b")):
            assert group_of[n] == "muon", n
    assert group_of["layers.1.attn.compressor.ape"] == "adamw_no_decay"

    settings = {g["name"]: g for g in opt.param_groups}
    assert (settings["muon"]["weight_decay"], settings["muon"]["momentum"], settings["muon"]["nesterov"],
            settings["muon"]["update_rms"], settings["muon"]["ns_steps"]) == (0.1, 0.95, True, 0.18, V4_NS_STEPS)
    assert settings["adamw_decay"]["weight_decay"] == 0.1 and settings["adamw_no_decay"]["weight_decay"] == 0.0
    for name in ("adamw_decay", "adamw_no_decay"):
        assert (settings[name]["betas"], settings[name]["eps"]) == ((0.9, 0.95), 1e-20)

    # splits: grouped wo_a, CSA compressor halves (attention and indexer), mHC fn pre/post/res
    assert marked["layers.0.attn.wo_a.weight"] == MuonSplit(0, (96, 96))
    assert marked["layers.1.attn.compressor.wkv.weight"] == MuonSplit(0, (64, 64))
    assert marked["layers.1.attn.indexer.compressor.wgate.weight"] == MuonSplit(0, (32, 32))
    assert marked["mtp.0.hc_ffn.fn"] == MuonSplit(0, (4, 4, 16))
    assert "layers.2.attn.compressor.wkv.weight" not in marked  # HCA: one series, no halves
    assert "hc_head.fn" not in marked
    assert len(marked) == 5 + 8 + 10  # 5 wo_a, 2 CSA layers x 4 compressor weights, 5 blocks x 2 fn
    assert stage.layers["0"].attn.wo_a.weight.muon_split == marked["layers.0.attn.wo_a.weight"]

    table = describe_assignment(opt, stage.named_parameters())
    assert table == describe_assignment(opt, stage.named_parameters())
    lines = table.splitlines()
    numel = sum(p.numel() for p in stage.parameters())
    assert lines[0] == f"optimizer assignment: {len(names)} parameters, {numel:,} elements"
    assert len(lines) == 1 + 3 + 1 + len(names)
    assert lines[5].split() == ["embed.weight", "64x192", "adamw_decay", "-"]
    row = next(line for line in lines if line.startswith("layers.0.hc_attn.fn "))
    assert row.split() == ["layers.0.hc_attn.fn", "24x768", "muon", "rows", "4+4+16"]
    assert next(line for line in lines if line.startswith("layers.0.attn.wo_a.weight ")).endswith("rows 2x96")


def test_adamw_algorithm_keeps_the_old_groups():
    """``algorithm="adamw"`` (and the default) is today's AdamW: "decay" = ndim >= 2 except biases and norm
    modules, "no_decay" the rest."""
    stage, _ = _nano_stage()
    named = list(stage.named_parameters())
    for opt in (build_optimizer(named, algorithm="adamw", lr=1e-3, weight_decay=0.1, eps=1e-20),
                build_optimizer(named, lr=1e-3, weight_decay=0.1, eps=1e-20)):
        assert type(opt) is torch.optim.AdamW
        expected = {"decay": [], "no_decay": []}
        for n, p in named:
            *path, leaf = n.split(".")
            old_rule = p.ndim >= 2 and leaf != "bias" and not any("norm" in part for part in path)
            expected["decay" if old_rule else "no_decay"].append(p)
        assert [g["name"] for g in opt.param_groups] == ["decay", "no_decay"]
        for group in opt.param_groups:
            assert [id(p) for p in group["params"]] == [id(p) for p in expected[group["name"]]]
            assert group["weight_decay"] == (0.1 if group["name"] == "decay" else 0.0)
    with pytest.raises(ValueError, match="algorithm='sgd'"):
        build_optimizer(named, algorithm="sgd", lr=1e-3, weight_decay=0.1, eps=1e-20)


# ----------------------------------------------------------------------------- HybridOptimizer state
def _small_stage() -> V4Stage:
    cfg = small_cfg(vocab_size=32, n_routed_experts=4, n_activated_experts=2, moe_inter_dim=32)
    stage = V4Stage(cfg, pp_rank=0, pp_size=1)
    stage.init_weights(0)
    stage.attention_mode = "dense"
    return stage


def _set_grads(stage: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in stage.parameters():
        p.grad = torch.randn(p.shape, generator=gen)


def _muon_optimizer(stage: nn.Module) -> HybridOptimizer:
    return build_optimizer(stage.named_parameters(), algorithm="muon", lr=1e-2, weight_decay=0.1, eps=1e-20)


def test_state_dict_round_trip_and_merged_state():
    stage, twin = _small_stage(), _small_stage()
    opt = _muon_optimizer(stage)
    for seed in (0, 1):
        _set_grads(stage, seed)
        opt.step()
    params = list(stage.parameters())
    assert len(opt.state) == len(params)
    for p in params:
        muon = isinstance(opt.owner(p), Muon)
        assert set(opt.state[p]) == ({"step", "momentum_buffer"} if muon else {"step", "exp_avg", "exp_avg_sq"})
        assert opt.state[p]["step"].item() == 2.0 and p in opt.state

    twin.load_state_dict(stage.state_dict())
    twin_opt = _muon_optimizer(twin)
    # a deep copy, as a checkpoint would be (torch's load_state_dict keeps same-device tensors by reference)
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for model, optimizer in ((stage, opt), (twin, twin_opt)):
        _set_grads(model, 2)
        optimizer.step()
    for (name, a), b in zip(stage.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), name

    # the trainer's lr assignment reaches both optimizers; zero_grad clears every gradient
    before = [p.detach().clone() for p in params]
    for group in opt.param_groups:
        group["lr"] = 0.0
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, before))
    opt.zero_grad()
    assert all(p.grad is None for p in params)
    with pytest.raises(ValueError, match="saved optimizers"):
        opt.load_state_dict({"kinds": ["AdamW"], "optimizers": []})
    foreign = nn.Parameter(torch.zeros(2, 2))
    assert opt.state.get(foreign) is None and foreign not in opt.state
    with pytest.raises(KeyError, match="no optimizer owns"):
        opt.state[foreign] = {}
    opt.state.clear()
    assert len(opt.state) == 0
    with pytest.raises(ValueError, match="belongs to both"):
        HybridOptimizer([torch.optim.AdamW([params[0]]), torch.optim.AdamW([params[0]])])


def test_initial_state_is_what_the_first_step_creates():
    """Materialising ``initial_state`` for every parameter (as the checkpoint does) changes nothing."""
    stage, twin = _small_stage(), _small_stage()
    opt, twin_opt = _muon_optimizer(stage), _muon_optimizer(twin)
    for p in twin.parameters():
        assert twin_opt.state.get(p) is None
        twin_opt.state[p] = initial_state(twin_opt, p)
    for (name, p), q in zip(stage.named_parameters(), twin.parameters()):
        init = initial_state(opt, p)
        assert set(init) == set(twin_opt.state[q]) and init["step"].item() == 0.0
        assert all(torch.count_nonzero(v) == 0 for v in init.values()), name
    for model, optimizer in ((stage, opt), (twin, twin_opt)):
        _set_grads(model, 3)
        optimizer.step()
    for (name, p), q in zip(stage.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), name
        for key, value in opt.state[p].items():
            assert value.dtype == twin_opt.state[q][key].dtype and torch.equal(value, twin_opt.state[q][key])
    adamw = build_optimizer(stage.named_parameters(), lr=1e-3, weight_decay=0.1, eps=1e-20)
    assert set(initial_state(adamw, stage.embed.weight)) == {"step", "exp_avg", "exp_avg_sq"}
    with pytest.raises(KeyError, match="not in AdamW"):
        initial_state(adamw, nn.Parameter(torch.zeros(2)))
