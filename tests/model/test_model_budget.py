"""model.budget: published sizes of Flash and Pro, KV-cache and attention-FLOP ratios to the V3.2
baseline at a 1M context (spec 1, 3.9)."""

import pytest

from v4train.model import ModelConfig
from v4train.model.budget import (
    V32_BASELINE, attention_flops_per_token, baseline_param_counts, comparison_table, kv_cache_bytes_per_token,
    param_counts,
)

M = 1 << 20


@pytest.mark.parametrize("name, total, active", [("pro", 1.6e12, 49e9), ("flash", 284e9, 13e9)])
def test_parameter_counts_within_3_percent_of_the_published_figures(name, total, active):
    counts = param_counts(ModelConfig.preset(name))
    assert abs(counts["total"] / total - 1) < 0.03
    assert abs(counts["active"] / active - 1) < 0.03
    assert counts["total_with_mtp"] == counts["total"] + counts["mtp"]
    assert counts["active_with_embedding"] - counts["active"] == 129280 * ModelConfig.preset(name).dim


def test_kv_cache_ratios_to_v32_at_1m():
    base = kv_cache_bytes_per_token(V32_BASELINE, M)
    assert base == pytest.approx(61 * (656 + 132))  # spec 3.9: 656 + 132 B per token and layer
    pro = kv_cache_bytes_per_token(ModelConfig.preset("pro"), M) / base
    flash = kv_cache_bytes_per_token(ModelConfig.preset("flash"), M) / base
    assert 0.07 <= pro <= 0.13 and 0.05 <= flash <= 0.10  # report: 10% and 7%


def test_entry_bytes_and_short_contexts():
    flash = ModelConfig.preset("flash")
    # one CSA layer's share at 1M: (576 + 7 scale bytes) / 4 for the entry plus (64 + 4) / 4 for the indexer key
    csa = ModelConfig.preset("flash", n_layers=1, mtp_depth=0, compress_ratios=(4,), n_hash_layers=0)
    assert kv_cache_bytes_per_token(csa, M) == pytest.approx(583 / 4 + 68 / 4 + 128 * 583 / M)
    # at a context shorter than the window every layer holds every token once
    swa = ModelConfig.preset("flash", n_layers=1, mtp_depth=0, compress_ratios=(0,), n_hash_layers=0)
    assert kv_cache_bytes_per_token(swa, 64) == pytest.approx(583)
    assert kv_cache_bytes_per_token(flash, 4096) > kv_cache_bytes_per_token(flash, M)


def test_attention_flops_are_far_below_v32_at_1m():
    base = attention_flops_per_token(V32_BASELINE, M)
    for name, upper in (("pro", 0.3), ("flash", 0.15)):
        ratio = attention_flops_per_token(ModelConfig.preset(name), M) / base
        assert 0.05 < ratio < upper, name
    rows = {r["model"]: r for r in comparison_table(M)}
    assert rows["v3.2"]["kv_vs_v32"] == 1 and 0.2 < rows["pro"]["token_flops_vs_v32"] < 0.35  # report: 27%


def test_baseline_is_v32_sized():
    counts = baseline_param_counts()
    assert abs(counts["total"] / 671e9 - 1) < 0.03 and abs(counts["active"] / 37e9 - 1) < 0.03
