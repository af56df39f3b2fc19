"""A run at a glance: ``v4train report RUN_DIR`` writes ``RUN_DIR/report.png`` and prints a summary table.

The PNG has four panels over optimizer steps, sharing the x axis: loss (and the validation loss of ``eval``
events), learning rate, sequence length with the global batch in tokens, and tokens/s. Events are drawn
across every panel: restarts and failures (red), spikes and rollbacks (orange), curriculum stage changes
(blue), committed checkpoints (grey ticks along the top of the loss panel); the loss panel's background
marks the attention mode of each step (``dense``, ``indexer_warmup``, ``sparse``: V4's recipe). The table
summarises steps, tokens, wall time, losses, throughput, peak resident memory, event counts and the
attention-mode stages.

With ``--tensorboard`` the same scalars are also written as TensorBoard event files in ``RUN_DIR/tb/``
(needs the ``tensorboard`` package: ``pip install 'v4train[tensorboard]'``).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from v4train.orchestrator.control.telemetry import read_jsonl

__all__ = ["read_run", "current_lineage", "summary", "attention_spans", "format_summary", "plot", "write_tensorboard",
           "add_cli_arguments", "run_cli"]

_RED_EVENTS = ("restart", "failure")
_ORANGE_EVENTS = ("spike", "rollback", "nonfinite_grad")
_BLUE_EVENTS = ("stage_change",)
_MODE_COLORS = {"dense": "#e6e6e6", "indexer_warmup": "#fbd9b0", "sparse": "#cfe8c9"}


def attention_spans(metrics: list[dict]) -> list[tuple[int, int, str]]:
    """``(first step, last step, mode)`` for each run of consecutive steps trained in one attention mode
    (the ``attention_mode`` of the step records; records without one are left out)."""
    spans: list[list] = []
    for m in metrics:
        mode = m.get("attention_mode")
        if mode is None:
            continue
        if spans and spans[-1][2] == mode:
            spans[-1][1] = m["step"]
        else:
            spans.append([m["step"], m["step"], mode])
    return [tuple(span) for span in spans]



def read_run(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """``(metrics, events)`` of a run directory, as of the run's current trajectory (:func:`current_lineage`).
    Raises FileNotFoundError when the directory has no ``metrics.jsonl``."""
    run = Path(run_dir)
    if not (run / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"{run}: no metrics.jsonl (not a run directory, or no step finished yet)")
    return current_lineage(read_jsonl(run / "metrics.jsonl"), read_jsonl(run / "events.jsonl"))


def current_lineage(metrics: list[dict], events: list[dict]) -> tuple[list[dict], list[dict]]:
    """The step records and events of the run's current trajectory, from the append-only streams.

    A restore to step k (a ``start`` event at step k: a resume, ``resume --step k``, a restart after a
    failure; or a ``rollback`` event to step k) abandons what the run had recorded after step k: those step
    records, and the ``checkpoint_committed`` and ``eval`` events of steps after k, are history, not the
    run's state, even before the restored run trains its first step. A step trained again replaces its
    earlier record and every later one. Returns ``(metrics, events)``: one record per step in step order, and
    the events without the abandoned commits and evaluations (failures, restarts and the rest are kept).
    """
    restores = [(e["time"], e["step"]) for e in events
                if e.get("event") in ("start", "rollback") and "time" in e and "step" in e]

    def abandoned(step: int, time: float | None) -> bool:
        return time is not None and any(time < t and step > k for t, k in restores)

    by_step: dict[int, dict] = {}
    last = None
    for record in metrics:
        if "step" not in record:
            continue
        step = record["step"]
        if last is not None and step <= last:
            by_step = {s: r for s, r in by_step.items() if s < step}
        by_step[step], last = record, step
    current = [by_step[s] for s in sorted(by_step) if not abandoned(s, by_step[s].get("time"))]
    kept = [e for e in events
            if e.get("event") not in ("checkpoint_committed", "eval") or not abandoned(e["step"], e.get("time"))]
    return current, kept


def summary(metrics: list[dict], events: list[dict]) -> dict:
    """The numbers of the summary table (None where the run has none)."""
    def count(*names):
        return sum(1 for e in events if e.get("event") in names)

    losses = [m["loss"] for m in metrics if m.get("loss") is not None]
    evals = [e for e in events if e.get("event") == "eval"]
    times = [m["step_time_s"] for m in metrics if "step_time_s" in m]
    stamps = [e["time"] for e in events if "time" in e] + [m["time"] for m in metrics if "time" in m]
    committed = [e["step"] for e in events if e.get("event") == "checkpoint_committed"]
    finish = next((e for e in reversed(events) if e.get("event") in ("finish", "stopped", "failure")), None)
    return {
        "steps": metrics[-1]["step"] if metrics else 0,
        "tokens": metrics[-1].get("consumed_tokens") if metrics else 0,
        "wall_s": (max(stamps) - min(stamps)) if len(stamps) > 1 else None,
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "min_loss": min(losses) if losses else None,
        "val_loss": evals[-1].get("val_loss") if evals else None,
        "median_step_s": statistics.median(times) if times else None,
        "mean_tokens_per_s": statistics.fmean(m["tokens_per_s"] for m in metrics) if metrics else None,
        "peak_rss_mb": max((m["peak_rss_mb"] for m in metrics if "peak_rss_mb" in m), default=None),
        "checkpoints": len(committed),
        "last_committed": committed[-1] if committed else None,
        "restarts": count("restart"),
        "failures": count("failure"),
        "spikes": count("spike"),
        "rollbacks": count("rollback"),
        "stage_changes": count("stage_change"),
        "attention": ", ".join(f"{mode} {a}-{b}" for a, b, mode in attention_spans(metrics)) or None,
        "stage_cpu_s": stage_balance(metrics),
        "router": router_health(metrics),
        "router_collapses": [f"layer {e['layer']} {e['reason']} at step {e['step']}"
                             for e in events if e.get("event") == "router_collapse"],
        "state": finish["event"] if finish else "running (or killed)",
    }


def stage_balance(metrics: list[dict]) -> list[float]:
    """Median over steps of each pipeline stage's CPU seconds of forward and backward (``stage_cpu_s/<stage>``,
    one rank per stage); empty when the steps do not report it."""
    stages = sorted({int(k.split("/")[1]) for m in metrics for k in m if k.startswith("stage_cpu_s/")})
    return [statistics.median(m[f"stage_cpu_s/{s}"] for m in metrics if f"stage_cpu_s/{s}" in m) for s in stages]


def router_health(metrics: list[dict]) -> dict[int, dict]:
    """Per MoE layer, over the run's steps (data-parallel group totals per step): ``max_load`` (worst
    max/mean expert load), ``dead_steps`` (steps with a dead expert), ``entropy`` (router entropy, nats, of
    the last step). Empty when no step reported router health."""
    out: dict[int, dict] = {}
    for m in metrics:
        for key, value in m.items():
            if key.startswith("router/"):
                _, layer, name = key.split("/")
                row = out.setdefault(int(layer), {"max_load": 0.0, "dead_steps": 0, "entropy": None})
                if name == "max_load":
                    row["max_load"] = max(row["max_load"], value)
                elif name == "dead_experts":
                    row["dead_steps"] += value > 0
                elif name == "entropy":
                    row["entropy"] = value
    return dict(sorted(out.items()))


def format_summary(run_dir: str | Path, s: dict) -> str:
    """The summary as an aligned two-column table."""
    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    rows = [
        ("run", str(run_dir)),
        ("state", s["state"]),
        ("steps", str(s["steps"])),
        ("tokens", num(s["tokens"], ",")),
        ("wall time", "-" if s["wall_s"] is None else f"{s['wall_s'] / 60:.1f} min"),
        ("loss first / last / min",
         " / ".join(num(s[k], ".4f") for k in ("first_loss", "last_loss", "min_loss"))),
        ("validation loss", num(s["val_loss"], ".4f")),
        ("step time (median)", "-" if s["median_step_s"] is None else f"{s['median_step_s']:.3f} s"),
        ("tokens/s (mean)", num(s["mean_tokens_per_s"], ",.0f")),
        ("peak RSS (largest rank)", "-" if s["peak_rss_mb"] is None else f"{s['peak_rss_mb']:.0f} MiB"),
        ("checkpoints (last)", f"{s['checkpoints']} ({num(s['last_committed'], 'd')})"),
        ("restarts / failures", f"{s['restarts']} / {s['failures']}"),
        ("spikes / rollbacks", f"{s['spikes']} / {s['rollbacks']}"),
        ("curriculum stage changes", str(s["stage_changes"])),
        ("attention (steps)", s["attention"] or "-"),
    ]
    stage_s = s.get("stage_cpu_s") or []
    if len(stage_s) > 1:
        rows.append(("stage CPU s (median)", " / ".join(f"{t:.2f}" for t in stage_s)
                     + f" (slowest / mean {max(stage_s) * len(stage_s) / sum(stage_s):.2f}x)"))
    rows += [(f"router layer {layer}", f"max load {r['max_load']:.2f}, dead expert in {r['dead_steps']} steps, "
                                       f"entropy {num(r['entropy'], '.3f')} nats")
             for layer, r in s.get("router", {}).items()]
    rows.append(("router collapses", "; ".join(s.get("router_collapses", [])) or "-"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _shade_attention_modes(ax, metrics: list[dict]) -> None:
    """Shade each run of steps trained in one attention mode (one legend entry per mode)."""
    shaded = set()
    for first, last, mode in attention_spans(metrics):
        ax.axvspan(first - 0.5, last + 0.5, color=_MODE_COLORS.get(mode, "#dddddd"), alpha=0.6, lw=0, zorder=0,
                   label=None if mode in shaded else f"attention: {mode}")
        shaded.add(mode)


def plot(run_dir: str | Path, metrics: list[dict], events: list[dict], out: str | Path) -> Path:
    """Write the four-panel PNG to ``out``; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    fig, axes = plt.subplots(4, 1, figsize=(11, 10), sharex=True, gridspec_kw={"height_ratios": [3, 1.3, 1.3, 1.3]})
    loss_ax, lr_ax, seq_ax, tps_ax = axes
    loss_ax.plot(steps, [m["loss"] for m in metrics], color="#1f77b4", lw=1.2, label="train loss")
    evals = [e for e in events if e.get("event") == "eval" and e.get("val_loss") is not None]
    if evals:
        loss_ax.plot([e["step"] for e in evals], [e["val_loss"] for e in evals], "o", color="#2ca02c", ms=7,
                     label="validation loss")
    loss_ax.set_ylabel("loss (nats)")
    _shade_attention_modes(loss_ax, metrics)
    lr_ax.plot(steps, [m["lr"] for m in metrics], color="#9467bd", lw=1.2)
    lr_ax.set_ylabel("learning rate")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    seq_ax.step(steps, [m["seq_len"] for m in metrics], where="post", color="#8c564b", lw=1.5, label="sequence length")
    seq_ax.set_ylabel("seq length (tokens)")
    seq_ax.set_ylim(0, 1.25 * max(m["seq_len"] for m in metrics))
    handles = seq_ax.get_legend_handles_labels()
    if any("global_batch_tokens" in m for m in metrics):
        batch_ax = seq_ax.twinx()
        batch = [m.get("global_batch_tokens", 0) / 1e3 for m in metrics]
        batch_ax.step(steps, batch, where="post", color="#7f7f7f", lw=1.2, ls="--", label="global batch (k tokens)")
        batch_ax.set_ylabel("batch (k tokens)", color="#7f7f7f")
        batch_ax.set_ylim(0, 1.6 * max(batch))
        more = batch_ax.get_legend_handles_labels()
        handles = (handles[0] + more[0], handles[1] + more[1])
    seq_ax.legend(*handles, loc="lower right", fontsize=9, ncol=2)
    tps_ax.plot(steps, [m["tokens_per_s"] for m in metrics], color="#ff7f0e", lw=0.8, alpha=0.5, label="per step")
    window = max(1, len(steps) // 50)
    if window > 1:
        tps = [m["tokens_per_s"] for m in metrics]
        smooth = [statistics.fmean(tps[max(0, i - window + 1): i + 1]) for i in range(len(tps))]
        tps_ax.plot(steps, smooth, color="#d62728", lw=1.5, label=f"mean of {window}")
    tps_ax.set_ylabel("tokens/s")
    tps_ax.set_xlabel("optimizer step")
    tps_ax.set_ylim(bottom=0)
    tps_ax.legend(loc="lower right", fontsize=9, ncol=2)

    _mark_events(axes, events)
    loss_ax.legend(loc="upper right", fontsize=9, ncol=2)
    for ax in axes:
        ax.grid(alpha=0.3)
    s = summary(metrics, events)
    fig.suptitle(f"{Path(run_dir).resolve().name}: {s['steps']} steps, {s['tokens'] or 0:,} tokens, last loss "
                 f"{s['last_loss']:.3f}" + (f", val {s['val_loss']:.3f}" if s["val_loss"] is not None else "")
                 + f", {s['restarts']} restarts", fontsize=12)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _mark_events(axes, events: list[dict]) -> None:
    """Vertical lines at failures, restarts, rollbacks and routing changes on every panel; a marker at each
    committed checkpoint on the loss panel (the first of ``axes``)."""
    loss_ax = axes[0]
    labelled = set()
    for e in events:
        name, step = e.get("event"), e.get("step")
        if step is None:
            continue
        if name in _RED_EVENTS + _ORANGE_EVENTS + _BLUE_EVENTS:
            color = "#d62728" if name in _RED_EVENTS else "#ff7f0e" if name in _ORANGE_EVENTS else "#17becf"
            for ax in axes:
                ax.axvline(step, color=color, lw=1.2, ls="--" if name in _BLUE_EVENTS else "-", alpha=0.8,
                           label=name if ax is loss_ax and name not in labelled else None)
            labelled.add(name)
        elif name == "checkpoint_committed":
            loss_ax.plot([step], [1.0], marker="v", color="#555555", ms=7, transform=loss_ax.get_xaxis_transform(),
                         clip_on=False, label="checkpoint" if "ckpt" not in labelled else None, ls="none")
            labelled.add("ckpt")


def write_tensorboard(run_dir: str | Path, metrics: list[dict], events: list[dict]) -> Path:
    """Scalars of every step (and the events' validation losses) as TensorBoard event files in ``RUN_DIR/tb``."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise RuntimeError(f"--tensorboard needs the tensorboard package ({exc}); "
                           "pip install 'v4train[tensorboard]'") from None
    out = Path(run_dir) / "tb"
    writer = SummaryWriter(str(out))
    for m in metrics:
        for key, value in m.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                writer.add_scalar(f"train/{key}", value, m["step"])
    for e in events:
        if e.get("event") == "eval" and e.get("val_loss") is not None:
            writer.add_scalar("eval/val_loss", e["val_loss"], e["step"])
    writer.close()
    return out


def add_cli_arguments(sub) -> None:
    """Add ``report`` to the ``v4train`` subcommands."""
    p = sub.add_parser("report", help="a run at a glance: PNG of loss, LR, sequence length, tokens/s and events; "
                                      "summary table")
    p.add_argument("run_dir", help="run directory (holds metrics.jsonl and events.jsonl)")
    p.add_argument("--out", help="PNG path (default RUN_DIR/report.png)")
    p.add_argument("--tensorboard", action="store_true", help="also write TensorBoard event files to RUN_DIR/tb")


def run_cli(args) -> int:
    """``v4train report``: exit 2 when the directory holds no metrics."""
    try:
        metrics, events = read_run(args.run_dir)
    except FileNotFoundError as exc:
        print(f"v4train: error: {exc}", file=sys.stderr)
        return 2
    if not metrics:
        print(f"v4train: error: {args.run_dir}/metrics.jsonl holds no step", file=sys.stderr)
        return 2
    out = plot(args.run_dir, metrics, events, args.out or Path(args.run_dir) / "report.png")
    print(format_summary(args.run_dir, summary(metrics, events)))
    print(f"{'plot':<24}  {out}")
    if args.tensorboard:
        try:
            print(f"{'tensorboard':<24}  {write_tensorboard(args.run_dir, metrics, events)}")
        except RuntimeError as exc:
            print(f"v4train: error: {exc}", file=sys.stderr)
            return 1
    return 0
