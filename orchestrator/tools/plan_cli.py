"""``v4train plan``: load a job for planning, print a plan (or JSON), suggest layouts that fit.

The estimates themselves are :mod:`orchestrator.tools.plan`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from pydantic import ValidationError

from v4train.orchestrator.spec import JobSpec, ParallelSpec, SpecError, apply_overrides, load_cluster
from v4train.orchestrator.spec.files import _dataset_vocab, _format_validation_error, _read_yaml
from v4train.orchestrator.tools.placement import format_placement
from v4train.orchestrator.tools.plan import (FIT_FRACTION, RECOMPUTE_MODES, GiB, Layout, MiB, Plan, plan_job,
                                              suggest)

__all__ = ["load_job_for_plan", "format_plan", "add_cli_arguments", "run_cli"]


def load_job_for_plan(path: str, overrides: list[str]):
    """``(job, model config, parallel section)``: the job validated with tp = ep = 1, so that a layout the
    job's own checks would refuse can still be planned (the parallel section is validated on its own), and
    a dataset that need not exist here (the preset's vocabulary is used then)."""

    raw = apply_overrides(_read_yaml(path), overrides)
    par = dict(raw.get("parallel") or {})
    try:
        parallel = ParallelSpec.model_validate(par)
        job = JobSpec.model_validate({**raw, "parallel": {**par, "tp": 1, "ep": 1}})
    except ValidationError as exc:
        raise SpecError(_format_validation_error(str(path), exc)) from None
    vocab = _dataset_vocab(job.data.path, str(path)) if (Path(job.data.path) / "dataset.json").is_file() else None
    return job, job.model.build(vocab_size=vocab), parallel


def _gib(x: float) -> str:
    return f"{x / GiB:.2f} GiB" if x >= GiB else f"{x / MiB:.0f} MiB"


def format_plan(plan: Plan, title: str = "") -> str:
    """The plan as a table: memory per stage by part, bubble, communication and step time."""
    lay, sh = plan.layout, plan.shape
    lines = [title or f"layout {lay}", f"  shape: seq_len {sh.seq_len}, global batch {sh.global_batch} sequences, "
             f"micro-batch {lay.micro_batch_size}, attention {sh.attention}; "
             f"{max(1, sh.global_batch // (lay.micro_batch_size * lay.dp))} micro-batches per data-parallel rank"]
    names = list(plan.stages[0].parts)
    show = plan.stages if len(plan.stages) <= 4 else [plan.stages[0], plan.stages[1], plan.stages[-2], plan.stages[-1]]
    header = f"  {'per rank':<20}" + "".join(f"{'stage ' + str(s.pp_rank):>14}" for s in show)
    lines.append(header)
    lines.append(f"  {'  layers':<20}" + "".join(f"{f'{s.layers.start}-{s.layers.stop - 1}':>14}" for s in show))
    if plan.stage_time_s:
        times = [plan.stage_time_s[s.pp_rank] for s in show]
        lines.append(f"  {'  s per micro-batch':<20}" + "".join(f"{t:>14.3g}" for t in times))
    params = [f"{s.dense_params / 1e6:.0f}M/{s.expert_params / 1e6:.0f}M" for s in show]
    lines.append(f"  {'  params (dense/exp)':<20}" + "".join(f"{p:>14}" for p in params))
    for name in names:
        lines.append(f"  {name:<20}" + "".join(f"{_gib(s.parts.get(name, 0)):>14}" for s in show))
    lines.append(f"  {'TOTAL':<20}" + "".join(f"{_gib(s.total):>14}" for s in show))
    if any(s.host_staging for s in plan.stages):
        lines.append(f"  {'host ckpt staging':<20}" + "".join(f"{_gib(s.host_staging):>14}" for s in show))
    peak = plan.peak
    verdict = "fits" if plan.fits else "does NOT fit"
    lines.append(f"  peak: stage {peak.pp_rank} {_gib(peak.total)} of {_gib(plan.capacity)} per device "
                 f"({100 * peak.total / plan.capacity:.0f}%; a layout fits up to {100 * FIT_FRACTION:.0f}%): {verdict}")
    lines.append(f"  pipeline bubble (1F1B): {100 * plan.bubble:.1f}%")
    comm = "  ".join(f"{k.upper()} {_gib(v)}" for k, v in plan.comm_bytes.items() if v)
    lines.append(f"  communication per step per rank: {comm or 'none'}")
    t = plan.time_parts
    lines.append(f"  estimated step time: {plan.step_time_s:.3g} s (compute {t['compute']:.3g} s, TP/EP/PP "
                 f"{t['tp_ep_pp_comm']:.3g} s, DP sync {t['dp_sync']:.3g} s); "
                 f"{plan.tokens_per_step / max(plan.step_time_s, 1e-12):,.0f} tokens/s")
    return "\n".join(lines)


def _plan_dict(plan: Plan) -> dict:
    return {"layout": dataclasses.asdict(plan.layout), "shape": dataclasses.asdict(plan.shape), "fits": plan.fits,
            "capacity_bytes": plan.capacity, "bubble": plan.bubble, "comm_bytes": plan.comm_bytes,
            "step_time_s": plan.step_time_s, "time_parts": plan.time_parts, "stage_time_s": plan.stage_time_s,
            "stages": [{"pp_rank": s.pp_rank, "layers": [s.layers.start, s.layers.stop], "dense_params": s.dense_params,
                        "expert_params": s.expert_params, "parts": s.parts, "total_bytes": s.total,
                        "host_staging_bytes": s.host_staging} for s in plan.stages]}


def add_cli_arguments(sub) -> None:
    """Add ``plan`` to the ``v4train`` subcommands."""
    p = sub.add_parser("plan", help="per-rank memory, bubble, communication and step time of a layout; "
                                    "suggests layouts that fit")
    p.add_argument("job", help="job YAML")
    p.add_argument("--cluster", required=True, help="cluster YAML (its hardware section: memory, TFLOP/s, bandwidth)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a job field")
    p.add_argument("--layout", help="plan this layout instead of the job's, e.g. tp=1,pp=16,ep=64,dp=64,mbs=1")
    p.add_argument("--recompute", choices=RECOMPUTE_MODES, default=None,
                   help="activation recompute for the job's layout (default: the job's train.recompute)")
    p.add_argument("--suggest", type=int, default=3, metavar="N", help="layouts that fit to list (0: none)")
    p.add_argument("--json", action="store_true", help="print the plans as JSON")


def _parse_layout(text: str, default) -> Layout:

    values = {"tp": default.tp, "cp": default.cp, "pp": default.pp, "ep": default.ep, "dp": default.dp,
              "mbs": default.micro_batch_size}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key.strip() not in values or not value.strip().isdigit() or int(value) < 1:
            raise SpecError(f"--layout {item!r}: expected tp|cp|pp|ep|dp|mbs=<positive int>")
        values[key.strip()] = int(value)
    return Layout(values["tp"], values["pp"], values["ep"], values["dp"], values["mbs"], default.recompute,
                  cp=values["cp"])


def run_cli(args) -> int:
    """``v4train plan``: exit 0 when the planned layout fits, 1 when it does not (suggestions are printed)."""

    job, cfg, par = load_job_for_plan(args.job, args.overrides)
    cluster = load_cluster(args.cluster)
    layout = Layout(par.tp, par.pp, par.ep, par.dp, job.train.micro_batch_size,
                    args.recompute or job.train.recompute, cp=par.cp)
    if args.layout:
        layout = _parse_layout(args.layout, layout)
    world = layout.tp * layout.cp * layout.pp * layout.dp
    try:
        shares = cluster.ranks_per_node(world, layout.tp)
    except SpecError as exc:
        raise SpecError(f"layout {layout}: {exc}") from None
    if (layout.tp * layout.cp * layout.dp) % layout.ep or cfg.n_routed_experts % layout.ep or layout.pp > cfg.n_layers:
        raise SpecError(f"layout {layout}: ep must divide tp x cp x dp and n_routed_experts; pp at most n_layers")
    plan = plan_job(cfg, job, cluster, layout)
    others = suggest(cfg, job, cluster, args.suggest) if args.suggest else []
    if args.json:
        print(json.dumps({"plan": _plan_dict(plan), "suggestions": [_plan_dict(p) for p in others]}, indent=1))
        return 0 if plan.fits else 1
    from v4train.model.budget import param_counts

    counts = param_counts(cfg)
    print(f"{job.name}: model {job.model.preset} ({counts['total_with_mtp'] / 1e9:.3g}B parameters with MTP, "
          f"{counts['active'] / 1e9:.3g}B active) on {cluster.name}: {cluster.nodes} x {cluster.devices_per_node} "
          f"{cluster.device} devices")
    print(format_plan(plan, f"layout {layout} (the job's)" if not args.layout else f"layout {layout}"))
    hw = cluster.hardware
    print(format_placement(layout.tp, layout.pp, layout.ep, layout.dp, shares, plan.comm_bytes,
                           hw.intra_node_gbps, hw.inter_node_gbps, cp=layout.cp))
    if not plan.fits and layout.recompute != "full":
        full = plan_job(cfg, job, cluster, dataclasses.replace(layout, recompute="full"))
        verdict = "fits" if full.fits else "does not fit either"
        print(f"  with train.recompute full: peak {_gib(full.peak.total)}, {verdict}, "
              f"step {full.step_time_s:.3g} s")
    if others:
        print("\nlayouts that fit, fastest first:")
        for p in others:
            print(f"  {str(p.layout):<44} peak {_gib(p.peak.total):>10}  bubble {100 * p.bubble:4.1f}%  "
                  f"step {p.step_time_s:.3g} s")
    elif not plan.fits and args.suggest:
        print("\nno layout of this cluster fits: more devices, a shorter sequence or a smaller model")
    return 0 if plan.fits else 1
