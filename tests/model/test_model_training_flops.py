"""model.budget.training_flops_per_sequence: the MFU numerator, against an explicit per-token enumeration."""

import pytest

from v4train.model.budget import layer_params, param_counts, training_flops_per_sequence
from v4train.model.config import ModelConfig


def _enumerated(cfg: ModelConfig, L: int, mode: str) -> float:
    """Token by token and layer by layer: the entries each query attends, listed as sets."""
    total = 0.0
    for t in range(L):
        for ratio in cfg.compress_ratios:
            raw = {s for s in range(L) if t - cfg.window < s <= t}
            comp = {j for j in range(L) if ratio and (j + 1) * ratio - 1 <= t}     # complete blocks only
            scores = 0
            if ratio == 4 and mode == "sparse":
                picked = sorted(comp)[: cfg.index_topk]
                scores = len(comp) + 3 * len(picked)
                comp = set(picked)
            elif ratio == 4 and mode == "indexer_warmup":
                scores = 4 * len(comp)
            total += 12 * cfg.n_heads * cfg.head_dim * (len(raw) + len(comp))
            total += 2 * cfg.index_n_heads * cfg.index_head_dim * scores
    d, n = cfg.dim, cfg.hc_mult
    per_token = param_counts(cfg)["active"]
    for ratio in cfg.compress_ratios[cfg.n_layers:]:
        fixed, expert = layer_params(cfg, ratio)
        per_token += (fixed + cfg.n_activated_experts * expert + 2 * d * d + 3 * d + n * n * d + n + 1
                      + cfg.vocab_size * d)
    return total + 6 * L * per_token


@pytest.mark.parametrize("mode", ["dense", "indexer_warmup", "sparse"])
def test_matches_an_explicit_enumeration(mode):
    cfg = ModelConfig.preset("nano", window=5, index_topk=3)
    for L in (1, 7, 40):
        assert training_flops_per_sequence(cfg, L, mode) == pytest.approx(_enumerated(cfg, L, mode), rel=1e-12)


def test_sparse_costs_less_than_dense_once_the_topk_is_full():
    cfg = ModelConfig.preset("small")
    short, long = 16 * cfg.index_topk, 64 * cfg.index_topk
    assert training_flops_per_sequence(cfg, 4, "sparse") > training_flops_per_sequence(cfg, 4, "dense")  # indexer
    assert training_flops_per_sequence(cfg, long, "sparse") < training_flops_per_sequence(cfg, long, "dense")
    # in sparse mode the per-token cost grows only through HCA's and the indexer's visible entries
    per_short = training_flops_per_sequence(cfg, short, "sparse") / short
    per_long = training_flops_per_sequence(cfg, long, "sparse") / long
    assert per_short < per_long < 2 * per_short


def test_rejects_bad_input():
    cfg = ModelConfig.preset("nano")
    with pytest.raises(ValueError, match="seq_len=0"):
        training_flops_per_sequence(cfg, 0)
    with pytest.raises(ValueError, match="attention_mode='full'"):
        training_flops_per_sequence(cfg, 8, "full")
