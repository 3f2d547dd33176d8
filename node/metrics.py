"""Per-step metrics: one JSON line per step, TensorBoard scalars, and a one-line live status."""

from __future__ import annotations

import json
import logging
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger(__name__)


class MetricsWriter:
    """Appends each step's metrics to `metrics.jsonl` (resumable) and mirrors the scalars to TensorBoard."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, trackers: Any = None) -> None:
        self.run_dir = Path(run_dir)
        self.trackers = trackers  # node.trackers.Trackers (wandb and others), or None
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / "metrics.jsonl"
        self._file = self.path.open("a", buffering=1)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
            except Exception as exc:  # TensorBoard is a convenience; JSONL is the record
                log.warning("TensorBoard disabled: %s", exc)

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        record = {"step": step, "time": time.time(), **metrics}
        self._file.write(json.dumps(record, default=_jsonable) + "\n")
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
        if self.trackers is not None:
            self.trackers.log(step, metrics)

    def write_table(self, step: int, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        """A small table (e.g. sample completions): one JSON line per row in `<name>.jsonl`, a Markdown text entry in
        TensorBoard, and a table in the trackers that have tables (wandb)."""
        with (self.run_dir / f"{name}.jsonl").open("a") as f:
            for row in rows:
                f.write(json.dumps({"step": step, **dict(zip(columns, row))}, default=_jsonable) + "\n")
        if self._tb is not None:
            lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
            lines += ["| " + " | ".join(_markdown_cell(v) for v in row) + " |" for row in rows]
            self._tb.add_text(name, "\n".join(lines), step)
        if self.trackers is not None:
            self.trackers.log_table(step, name, columns, rows)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self.trackers is not None:
            self.trackers.close()


def _markdown_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file (a torn last line from a crash is skipped)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class StatusLine:
    """A single self-overwriting terminal line on a TTY; a periodic log line otherwise."""

    def __init__(self, stream=None, every_s: float = 10.0, quiet: bool = False) -> None:
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.quiet = quiet
        self.every_s = every_s
        self._last = 0.0

    def update(self, text: str) -> None:
        if self.quiet:
            return
        if self.tty:
            self.stream.write("\r\x1b[2K" + text)
            self.stream.flush()
        elif time.monotonic() - self._last >= self.every_s:
            self._last = time.monotonic()
            log.info(text)

    def close(self) -> None:
        if self.tty and not self.quiet:
            self.stream.write("\n")
            self.stream.flush()


def quiet_transformers() -> None:
    """No per-file progress bars from transformers in our logs: the status line says what is going on."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except Exception:  # noqa: BLE001 - cosmetic only
        pass


class GracefulStop:
    """Ctrl-C or SIGTERM asks the loop to stop at the next step boundary; a second one aborts at once.

    Stopping between steps means a learner never checkpoints a half-applied optimizer step, and every process
    gets to shut its swarm daemons down.
    """

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> "GracefulStop":
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("%s: stopping after the current step (again to abort now)", signal.Signals(signum).name)
