"""Check and time the V4 sparse-attention and indexer kernels on one Hopper GPU.

For each T (default 4k..128k) it builds a CSA-layer problem as the model lays it out (spec 3.3, 3.6):
KV = [T window entries | NC = T / ratio compressed entries], and per token the ``window`` most recent
raw entries plus the indexer's top-k compressed entries (offset by T), ``-1`` where invisible. Then:

* ``kernels.indexer_topk`` (Triton) picks the compressed entries: timed, and checked against
  ``kernels.reference.indexer_topk`` for T <= --ref-max-T (identical picks, score error).
* ``kernels.sparse_attention`` (Triton) forward and forward+backward: timed, and checked against
  ``kernels.reference.sparse_attention`` (output, dq, dkv, dsink) for T <= --ref-max-T.
* FlexAttention (``torch.compile``d ``flex_attention``) on the same problem for T <= --flex-max-T:
  the block mask lists, per 128-query block, the window blocks, every compressed block any of its
  queries picked and one sink block; ``mask_mod`` makes it exact per token, and the sink is one extra
  KV row with a zero value whose score ``score_mod`` replaces by attn_sink[h] (so it enters only the
  denominator, unscaled). Its output is compared to the Triton output. Block sparsity cannot express
  per-token top-k, so Flex computes every picked block for all 128 queries of a block.
* The reference path (plain torch) is timed where it is checked.

Timings are medians over --repeats runs after one warm-up, with CUDA events; "fwd+bwd" is forward
plus ``backward`` of a fixed random upstream gradient. TFLOP/s counts 4*B*T*H*K*D for the forward and
2.5x that for the backward (5 products). Prints one table (markdown) for BENCHMARKS.md.

Status: written without a GPU and not yet run on one; ``--device cpu`` runs the same logic at small T
under ``TRITON_INTERPRET=1`` (FlexAttention forward only on CPU).

Shape letters: B batch, T tokens, H heads, D head dim, W window, NC compressed entries, K = W + topk
entries per token, HI indexer heads, DI indexer head dim.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from v4train import kernels  # noqa: E402
from v4train.kernels import reference  # noqa: E402

FLEX_BLOCK = 128


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Check and time the V4 sparse-attention / indexer Triton kernels "
                                            "against the torch reference and FlexAttention (H100/H200).")
    p.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536, 131072],
                   help="T values (default 4k..128k)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=64, help="attention heads H (V4-Flash: 64)")
    p.add_argument("--head-dim", type=int, default=512, help="D (V4: 512)")
    p.add_argument("--window", type=int, default=128, help="sliding window W (V4: 128)")
    p.add_argument("--ratio", type=int, default=4, help="CSA compression ratio m (V4: 4)")
    p.add_argument("--topk", type=int, default=512, help="index_topk (V4-Flash: 512)")
    p.add_argument("--indexer-heads", type=int, default=64, help="HI (V4: 64)")
    p.add_argument("--indexer-dim", type=int, default=128, help="DI (V4: 128)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median)")
    p.add_argument("--ref-max-t", type=int, default=8192, help="largest T for the torch reference (memory)")
    p.add_argument("--flex-max-t", type=int, default=32768,
                   help="largest T for FlexAttention (it computes whole picked blocks: slow at long T)")
    p.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (small T, TRITON_INTERPRET=1)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------- problem

def make_problem(args, T: int, device: torch.device) -> dict:
    """Random CSA inputs at length T; the compressed picks come from the Triton indexer (timed here)."""
    g = torch.Generator(device=device).manual_seed(args.seed + T)
    dt = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    B, H, D, W, m = args.batch, args.heads, args.head_dim, args.window, args.ratio
    NC = T // m

    def randn(*shape, dtype=dt):
        return torch.randn(*shape, generator=g, device=device).to(dtype)

    q_idx, k_idx, w_idx = randn(B, T, args.indexer_heads, args.indexer_dim), randn(B, NC, args.indexer_dim), \
        randn(B, T, args.indexer_heads, dtype=torch.float32) * (args.indexer_dim * args.indexer_heads) ** -0.5
    ms_idx, picks = timed(lambda: kernels.indexer_topk(q_idx, k_idx, w_idx, m, args.topk), args.repeats, device)
    t_T = torch.arange(T, device=device)[:, None]
    win_TW = t_T - (W - 1) + torch.arange(W, device=device)[None, :]
    win_BTW = torch.where(win_TW >= 0, win_TW, -1).expand(B, T, W)
    comp_BTK = torch.where(picks.indices >= 0, picks.indices + T, -1)
    indices = torch.cat((win_BTW.to(torch.int32), comp_BTK.to(torch.int32)), dim=-1).contiguous()
    q = randn(B, T, H, D)
    q = q * torch.rsqrt(q.float().square().mean(-1, keepdim=True) + 1e-6).to(dt)   # V4's query norm
    kv = randn(B, T + NC, D)
    sink = torch.randn(H, generator=g, device=device) * 0.5
    do = randn(B, T, H, D)
    return dict(q=q, kv=kv, sink=sink, indices=indices, do=do, scale=D ** -0.5, picks=picks, ms_idx=ms_idx,
                indexer_inputs=(q_idx, k_idx, w_idx), T=T, NC=NC)


# ---------------------------------------------------------------------------------------------- timing

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, repeats: int, device: torch.device):
    """(median ms over ``repeats`` runs after one warm-up, result of the last run)."""
    out = fn()
    sync(device)
    times = []
    for _ in range(max(1, repeats)):
        out = None                                      # free the previous result before the next run
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            out = fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), out


def fwd_bwd(attn, prob):
    """Forward + backward of ``attn``; returns (out, dq, dkv, dsink)."""
    q, kv, sink = (prob[k].detach().requires_grad_(True) for k in ("q", "kv", "sink"))
    out = attn(q, kv, sink, prob)
    out.backward(prob["do"])
    return out.detach(), q.grad, kv.grad, sink.grad


def triton_attn(q, kv, sink, prob):
    return kernels.sparse_attention(q, kv, sink, prob["indices"], prob["scale"])


def reference_attn(q, kv, sink, prob):
    return reference.sparse_attention(q, kv, sink, prob["indices"], prob["scale"])


# ---------------------------------------------------------------------------------------------- flex

def flex_setup(prob, device: torch.device):
    """Compiled flex_attention and a BlockMask equivalent to ``indices`` + sink (see the module docstring)."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    import torch._dynamo
    torch._dynamo.config.recompile_limit = max(64, torch._dynamo.config.recompile_limit)
    T, NC, B = prob["T"], prob["NC"], prob["q"].shape[0]                # T: a multiple of FLEX_BLOCK
    picks = prob["picks"].indices                                       # [B, T, topk], -1 padded
    W = prob["indices"].shape[-1] - picks.shape[-1]
    QB = math.ceil(T / FLEX_BLOCK)
    n_raw, n_comp = math.ceil(T / FLEX_BLOCK), math.ceil(NC / FLEX_BLOCK)
    sink_pos = n_raw * FLEX_BLOCK + n_comp * FLEX_BLOCK                  # own block after the compressed ones
    kv_len = sink_pos + FLEX_BLOCK
    # dense per-token selection of compressed entries (bool [B, T, NC]) for mask_mod
    sel = torch.zeros(B, T, NC + 1, dtype=torch.bool, device=device)
    sel.scatter_(2, torch.where(picks >= 0, picks, NC).long(), True)
    sel = sel[..., :NC].contiguous()
    # per query block: window blocks (this and previous), picked compressed blocks, the sink block
    blk = torch.zeros(B, QB, n_raw + n_comp + 1, dtype=torch.bool, device=device)
    qb_T = torch.arange(T, device=device) // FLEX_BLOCK
    q_blocks = torch.arange(QB, device=device)
    for back in range((W - 1) // FLEX_BLOCK + 2):                      # blocks the window can reach
        if back < QB:
            blk[:, q_blocks[back:], q_blocks[back:] - back] = True
    cb = torch.where(picks >= 0, picks // FLEX_BLOCK + n_raw, n_raw + n_comp).long()       # [B, T, topk]
    blk.view(B, -1).scatter_(1, (qb_T[None, :, None] * blk.shape[-1] + cb).view(B, -1), True)
    blk[..., -1] = True
    # blk's column j is KV block j: raw blocks, then compressed blocks, then the sink block
    counts = blk.sum(-1).to(torch.int32)                                 # [B, QB]
    kv_blocks = torch.argsort((~blk).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    sink_h = prob["sink"].float()

    def mask_mod(b, h, q_idx, kv_idx):
        in_win = (kv_idx < T) & (kv_idx <= q_idx) & (kv_idx > q_idx - W)
        c = kv_idx - n_raw * FLEX_BLOCK
        c_ok = (c >= 0) & (c < NC)
        in_comp = c_ok & sel[b, q_idx, torch.where(c_ok, c, 0)]
        return in_win | in_comp | (kv_idx == sink_pos)

    def score_mod(score, b, h, q_idx, kv_idx):
        return torch.where(kv_idx == sink_pos, sink_h[h], score)

    block_mask = BlockMask.from_kv_blocks(counts[:, None], kv_blocks[:, None], BLOCK_SIZE=FLEX_BLOCK,
                                          mask_mod=mask_mod, seq_lengths=(T, kv_len))
    flex = torch.compile(flex_attention, dynamic=False)

    def layout(kv):
        """[B, N, D] -> [B, 1, kv_len, D]: raw rows, pad to a block, compressed rows, pad, zero sink block."""
        Bk, _, D = kv.shape
        out = kv.new_zeros(Bk, kv_len, D)
        out[:, :T] = kv[:, :T]
        out[:, n_raw * FLEX_BLOCK:n_raw * FLEX_BLOCK + NC] = kv[:, T:]
        return out[:, None]

    def attn(q, kv, sink, prob_):
        kvl = layout(kv)
        o = flex(q.transpose(1, 2).contiguous(), kvl, kvl, score_mod=score_mod, block_mask=block_mask,
                 scale=prob_["scale"], enable_gqa=True)
        return o.transpose(1, 2)

    return attn


# ---------------------------------------------------------------------------------------------- run

def max_err(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def run_one(args, T: int, device: torch.device) -> dict:
    prob = make_problem(args, T, device)
    B, H, D, K = args.batch, args.heads, args.head_dim, prob["indices"].shape[-1]
    flops = 4 * B * T * H * K * D
    row = {"T": T, "K": K, "idx_ms": prob["ms_idx"]}
    row["tri_fwd"], out = timed(lambda: triton_attn(prob["q"], prob["kv"], prob["sink"], prob), args.repeats,
                                device)
    row["tri_all"], grads = timed(lambda: fwd_bwd(triton_attn, prob), args.repeats, device)
    row["tflops_fwd"] = flops / row["tri_fwd"] / 1e9
    row["tflops_all"] = 3.5 * flops / row["tri_all"] / 1e9
    if T <= args.ref_max_t:
        q_idx, k_idx, w_idx = prob["indexer_inputs"]
        ref_pick = reference.indexer_topk(q_idx, k_idx, w_idx, args.ratio, args.topk)
        row["idx_same"] = (ref_pick.indices == prob["picks"].indices).float().mean().item()
        row["ref_fwd"], ref_out = timed(lambda: reference_attn(prob["q"], prob["kv"], prob["sink"], prob),
                                        args.repeats, device)
        row["ref_all"], ref_grads = timed(lambda: fwd_bwd(reference_attn, prob), args.repeats, device)
        row["err_ref"] = [max_err(a, b) for a, b in zip(grads, ref_grads)]
        row["ref_scale"] = [b.float().abs().max().item() for b in ref_grads]   # for relative tolerances
        del ref_out, ref_grads
    if not args.no_flex and T <= args.flex_max_t and T % FLEX_BLOCK == 0:
        try:
            flex = flex_setup(prob, device)
            row["flex_fwd"], flex_out = timed(lambda: flex(prob["q"], prob["kv"], prob["sink"], prob),
                                              args.repeats, device)
            row["err_flex"] = max_err(flex_out, out)
            del flex_out
            row["flex_all"], _ = timed(lambda: fwd_bwd(flex, prob), args.repeats, device)
        except Exception as exc:  # noqa: BLE001 - report it under the table, keep benchmarking
            row["flex_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    return row


def fmt(x, spec=".1f") -> str:
    return "-" if x is None else format(x, spec)


def print_table(rows: list[dict], args) -> None:
    print(f"\nsparse attention: B={args.batch} H={args.heads} D={args.head_dim} W={args.window} "
          f"topk={args.topk} ratio={args.ratio} {args.dtype}; indexer HI={args.indexer_heads} DI={args.indexer_dim}")
    print("| T | K | indexer ms | triton fwd ms | triton fwd+bwd ms | TFLOP/s fwd / all | flex fwd ms | "
          "flex fwd+bwd ms | ref fwd ms | ref fwd+bwd ms | err vs ref o/dq/dkv/dsink | err vs flex | "
          "same picks |")
    print("|" + "---|" * 13)
    notes = []
    for r in rows:
        err_ref = "/".join(f"{e:.1e}" for e in r["err_ref"]) if "err_ref" in r else "-"
        flex_all = fmt(r.get("flex_all"))
        if "flex_error" in r:
            notes.append(f"T={r['T']}: FlexAttention stopped: {r['flex_error']}")
            flex_all = f"error ({len(notes)})"
        print(f"| {r['T']} | {r['K']} | {fmt(r['idx_ms'])} | {fmt(r['tri_fwd'])} | {fmt(r['tri_all'])} | "
              f"{fmt(r['tflops_fwd'], '.0f')} / {fmt(r['tflops_all'], '.0f')} | {fmt(r.get('flex_fwd'))} | "
              f"{flex_all} | {fmt(r.get('ref_fwd'))} | {fmt(r.get('ref_all'))} | {err_ref} | "
              f"{fmt(r.get('err_flex'), '.1e')} | {fmt(r.get('idx_same'), '.4f')} |")
    for i, note in enumerate(notes, 1):
        print(f"({i}) {note}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("no CUDA device: run on an H100/H200, or use --device cpu with TRITON_INTERPRET=1 and small "
                  "--seq-lens", file=sys.stderr)
            return 2
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    elif not kernels.interpret_requested():
        print("--device cpu needs TRITON_INTERPRET=1 (otherwise both sides are the reference)", file=sys.stderr)
        return 2
    rows = []
    for T in args.seq_lens:
        rows.append(run_one(args, T, device))
        print(f"T={T} done: {rows[-1]}", file=sys.stderr, flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(rows, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
