"""`v4train report`: the PNG and the summary table of a run directory (synthetic runs: no rank starts)."""

from __future__ import annotations

import json
import math

import pytest

from v4train.orchestrator.tools.cli import main
from v4train.orchestrator.tools.report import attention_spans, read_run, summary


def _write_run(run, steps: int = 120) -> None:
    run.mkdir(parents=True, exist_ok=True)
    rows, events, t0 = [], [{"event": "start", "step": 0, "time": 1000.0}], 1000.0
    for s in range(1, steps + 1):
        seq = 128 if s <= 60 else 512
        batch = 16 if s <= 60 else 8
        loss = 9 * math.exp(-s / 40) + 3 + (1.5 if s == 70 else 0)
        mode = "dense" if s <= 60 else "indexer_warmup" if s <= 70 else "sparse"
        rows.append({"step": s, "loss": loss, "lr": 1e-3 * min(1, s / 10), "seq_len": seq, "attention_mode": mode,
                     "global_batch_tokens": seq * batch, "consumed_tokens": s * 2048,
                     "tokens_per_s": 3000 + 10 * (s % 7), "step_time_s": 0.7, "peak_rss_mb": 900 + s,
                     "stage_cpu_s/0": 0.8 + 0.1 * (s % 3), "stage_cpu_s/1": 1.2, "time": t0 + s})
    # step 40-45 replayed after a restart: the later records win
    rows[40:40] = [dict(r, loss=r["loss"] + 5) for r in rows[39:45]]
    events += [{"event": "checkpoint_committed", "step": s, "time": t0 + s} for s in (30, 60, 90, 120)]
    events += [{"event": "failure", "step": 45, "time": t0 + 46, "cause": "rank 2 died"},
               {"event": "restart", "step": 40, "time": t0 + 47},
               {"event": "stage_change", "step": 60, "time": t0 + 61, "stage": 1, "seq_len": 512},
               {"event": "spike", "step": 70, "time": t0 + 71},
               {"event": "rollback", "step": 70, "time": t0 + 71},
               {"event": "eval", "step": 120, "time": t0 + 125, "val_loss": 3.4},
               {"event": "finish", "step": 120, "time": t0 + 126}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 12')  # a cut last line
    (run / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))


def test_summary_keeps_the_last_record_of_a_replayed_step(tmp_path):
    _write_run(tmp_path / "run")
    metrics, events = read_run(tmp_path / "run")
    assert [m["step"] for m in metrics] == list(range(1, 121))
    s = summary(metrics, events)
    assert s["steps"] == 120 and s["restarts"] == 1 and s["failures"] == 1 and s["spikes"] == 1
    assert s["checkpoints"] == 4 and s["last_committed"] == 120 and s["val_loss"] == 3.4
    assert s["peak_rss_mb"] == 1020 and s["state"] == "finish"
    assert s["stage_cpu_s"] == pytest.approx([0.9, 1.2])  # per stage, the median over steps
    assert s["last_loss"] == pytest.approx(metrics[-1]["loss"])


def test_report_cli_writes_a_png_and_prints_the_table(tmp_path, capsys):
    run = tmp_path / "run"
    _write_run(run)
    assert main(["report", str(run)]) == 0
    out = capsys.readouterr().out
    png = run / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    for text in ("steps                     120", "restarts / failures       1 / 1", "validation loss           3.4000",
                 "peak RSS (largest rank)   1020 MiB", "stage CPU s (median)      0.90 / 1.20 (slowest / mean 1.14x)",
                 "attention (steps)         dense 1-60, indexer_warmup 61-70, sparse 71-120", str(png)):
        assert text in out


def test_attention_spans_follow_the_step_records():
    modes = ["dense"] * 3 + ["indexer_warmup"] + ["sparse"] * 2
    rows = [{"step": s, "attention_mode": m} for s, m in enumerate(modes, 1)]
    assert attention_spans(rows) == [(1, 3, "dense"), (4, 4, "indexer_warmup"), (5, 6, "sparse")]
    assert attention_spans([{"step": 1}]) == []


def test_report_refuses_a_directory_without_metrics(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_tensorboard_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    run = tmp_path / "run"
    _write_run(run)
    assert main(["report", str(run), "--tensorboard"]) == 0
    assert list((run / "tb").glob("events.out.tfevents.*"))
