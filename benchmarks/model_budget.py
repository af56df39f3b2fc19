"""Budget table: parameters, KV cache and attention FLOPs of V4 Flash / Pro vs a V3.2 baseline.

Pure arithmetic from ``model.budget`` (no model is built):

    python benchmarks/model_budget.py                 # at a 1M context
    python benchmarks/model_budget.py --context 131072
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from v4train.model import ModelConfig  # noqa: E402
from v4train.model.budget import comparison_table, param_counts  # noqa: E402

PUBLISHED = {"flash": ("284B", "13B", "7%", "10%"), "pro": ("1.6T", "49B", "10%", "27%"),
             "v3.2": ("671B", "37B", "", "")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--context", type=int, default=1 << 20)
    args = parser.parse_args(argv)
    print(f"context {args.context:,} tokens\n")
    print("| model | total (published) | active (published) | active incl. embedding | KV cache B/token | KV vs V3.2 "
          "(report) | attention GFLOP/token | attention vs V3.2 | attention + 2*active vs V3.2 (report) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in comparison_table(args.context):
        total, active, kv_pub, fl_pub = PUBLISHED[row["model"]]
        print(f"| {row['model']} | {row['total'] / 1e9:,.1f}B ({total}) | {row['active'] / 1e9:.2f}B ({active}) | "
              f"{row['active_with_embedding'] / 1e9:.2f}B | {row['kv_bytes_per_token']:,.0f} | "
              f"{row['kv_vs_v32']:.1%} ({kv_pub}) | {row['attn_flops_per_token'] / 1e9:.1f} | "
              f"{row['attn_flops_vs_v32']:.1%} | {row['token_flops_vs_v32']:.1%} ({fl_pub}) |")
    print("\n| preset | total | with MTP | active |")
    print("|---|---|---|---|")
    for name in ("nano", "small"):
        c = param_counts(ModelConfig.preset(name))
        print(f"| {name} | {c['total'] / 1e6:.2f}M | {c['total_with_mtp'] / 1e6:.2f}M | {c['active'] / 1e6:.2f}M |")


if __name__ == "__main__":
    main()
