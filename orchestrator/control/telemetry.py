"""Run telemetry: ``metrics.jsonl``, ``events.jsonl`` and a ``rich`` live view.

Each optimizer step appends one JSON object to ``metrics.jsonl`` (docs/architecture.md section 5: ``step``,
``loss``, ``lr``, ``seq_len``, ``global_batch_tokens``, ``consumed_tokens``, ``grad_norm``, ``tokens_per_s``,
``step_time_s`` and auxiliary fields); each event (``start``, ``checkpoint_committed``, ``eval``, ``stopped``,
``failure``, ``finish``...) appends one object with ``event``, ``step`` and ``time`` (Unix seconds) to
``events.jsonl``. Lines are flushed as written, so a killed driver loses nothing already reported. On a
terminal, a live view shows step, loss, tokens/s and ETA; elsewhere a plain line is printed every
``print_every`` steps. The run directory and the two files are created at the first record, not before, so
a launcher can prepare the directory after constructing its telemetry.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

__all__ = ["Telemetry", "NullTelemetry", "read_jsonl"]


def read_jsonl(path: Path) -> list[dict]:
    """The records of one of the run's JSONL streams, oldest first; ``[]`` when the file does not exist. A line
    cut by a killed writer (the last one) is left out."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


class Telemetry:
    """Writes the run's JSONL streams and renders progress.

    Args:
        run_dir: the run directory (created at the first record if missing).
        total_steps: the last step of the run, for the ETA.
        live: force the live view on or off (default: on when stdout is a terminal).
        print_every: in plain mode, print one line every this many steps.
    """

    def __init__(self, run_dir: str | Path, total_steps: int, *, live: bool | None = None, print_every: int = 10):
        self.run_dir = Path(run_dir)
        self._streams: dict[str, object] = {}
        self.console = Console()
        self.print_every = print_every
        self.live = sys.stdout.isatty() if live is None else live
        self._progress = None
        self._task = None
        if self.live:
            self._progress = Progress(
                TextColumn("[bold]step {task.completed}/{task.total}"),
                BarColumn(),
                TextColumn("loss {task.fields[loss]}  {task.fields[tps]} tok/s"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._task = self._progress.add_task("train", total=total_steps, loss="-", tps="-")
            self._progress.start()

    def metrics(self, record: dict) -> None:
        """Append one step's metrics and update the view."""
        self._append("metrics.jsonl", record)
        step = record["step"]
        if self._progress is not None:
            self._progress.update(
                self._task, completed=step, loss=f"{record['loss']:.4f}", tps=f"{record['tokens_per_s']:.0f}"
            )
        elif step % self.print_every == 0 or step == 1:
            self.console.print(
                f"step {step:>6}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
                f"grad_norm {record['grad_norm']:.3f}  {record['tokens_per_s']:.0f} tok/s  "
                f"{record['step_time_s']:.2f} s/step",
                highlight=False,
            )

    def resume_at(self, step: int) -> None:
        """Start the live view's counter at ``step`` (after a resume)."""
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    def event(self, event: str, step: int, **fields) -> None:
        """Append one event and echo it as a line."""
        record = {"event": event, "step": step, "time": time.time(), **fields}
        self._append("events.jsonl", record)
        detail = "  ".join(f"{k}={v}" for k, v in fields.items())
        self.console.print(f"[{event}] step {step}  {detail}".rstrip(), highlight=False, markup=False)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        for stream in self._streams.values():
            stream.close()
        self._streams.clear()

    def _append(self, name: str, record: dict) -> None:
        stream = self._streams.get(name)
        if stream is None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            stream = self._streams[name] = (self.run_dir / name).open("a", buffering=1)
        stream.write(json.dumps(record) + "\n")


class NullTelemetry:
    """Telemetry of a process that does not report (a torchrun rank other than 0): records nothing."""

    def metrics(self, record: dict) -> None:
        pass

    def event(self, event: str, step: int, **fields) -> None:
        pass

    def resume_at(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass
