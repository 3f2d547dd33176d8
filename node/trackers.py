"""Experiment trackers beside metrics.jsonl: `--report-to` through accelerate's tracker classes.

`--report-to` takes any of accelerate's trackers (wandb, comet_ml, mlflow, aim, clearml, dvclive, swanlab, trackio,
tensorboard), "all" (every one installed) or "none". TensorBoard is written by node.metrics.MetricsWriter itself (to
<run-dir>/tensorboard, as before); the others are created here with accelerate's classes, so each behaves as it does
under `Accelerator(log_with=...)`: wandb honours WANDB_MODE=offline (a run directory under <run-dir>/wandb, synced
later with `wandb sync`), mlflow MLFLOW_TRACKING_URI, and so on. A tracker that fails to start is a one-line error
at start-up; one that fails while logging is logged once and dropped, never stopping training.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Iterable, Mapping

log = logging.getLogger(__name__)

REPORT_TO_CHOICES = ("none", "all", "tensorboard", "wandb", "trackio", "comet_ml", "mlflow", "aim", "clearml",
                     "dvclive", "swanlab")


class TrackerError(ValueError):
    """A --report-to tracker is unknown, not installed, or cannot start."""


def wants_tensorboard(report_to: Iterable[str]) -> bool:
    names = set(report_to)
    return "tensorboard" in names or ("all" in names and _available(["tensorboard"]) == ["tensorboard"])


def _available(names: list[str]) -> list[str]:
    from accelerate.tracking import get_available_trackers

    installed = {str(t) for t in get_available_trackers()}
    return [n for n in names if n in installed]


def flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Finite numbers of a nested metrics record as {"a/b": value}; strings, lists and None are left out."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = value
    return out


class Trackers:
    """The external trackers of one run (TensorBoard excluded: MetricsWriter writes it)."""

    def __init__(self, report_to: Iterable[str], run_dir: str | Path, project: str,
                 config: Mapping[str, Any] | None = None) -> None:
        names = [n for n in dict.fromkeys(report_to) if n not in ("none", "tensorboard")]
        unknown = [n for n in names if n not in REPORT_TO_CHOICES]
        if unknown:
            raise TrackerError(f"--report-to: unknown tracker(s) {unknown}; choose from {list(REPORT_TO_CHOICES)}")
        if "all" in names:
            names = _available([n for n in REPORT_TO_CHOICES if n not in ("none", "all", "tensorboard")])
        self.run_dir = Path(run_dir)
        self.trackers: list[Any] = []
        if not names:
            return
        from accelerate import PartialState
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS

        PartialState()  # accelerate's trackers log through its logger, which needs the (single-process) state
        missing = [n for n in names if n not in _available(names)]
        if missing:
            raise TrackerError(f"--report-to {' '.join(missing)}: not installed (pip install {' '.join(missing)})")
        for name in names:
            cls = LOGGER_TYPE_TO_CLASS[name]
            try:
                if cls.requires_logging_directory:
                    tracker = cls(project, str(self.run_dir / "trackers"))
                elif name == "wandb":
                    tracker = cls(project, dir=str(self.run_dir), name=self.run_dir.name)
                else:
                    tracker = cls(project)
                if hasattr(tracker, "start"):  # accelerate >= 1.6 starts trackers separately
                    tracker.start()
                if config:
                    tracker.store_init_configuration(_plain_config(config))
            except Exception as exc:  # noqa: BLE001 - each integration raises its own types
                self.close()
                raise TrackerError(f"--report-to {name}: could not start: {' '.join(str(exc).split())[:300]}") \
                    from exc
            self.trackers.append(tracker)
            log.info("reporting to %s", name)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        values = flatten(metrics)
        if values:
            self._each("log", values, step=step)

    def log_table(self, step: int, name: str, columns: list[str], rows: list[list[Any]]) -> None:
        for tracker in list(self.trackers):
            if hasattr(tracker, "log_table"):
                self._call(tracker, "log_table", name, columns=columns, data=rows, step=step)

    def close(self) -> None:
        for tracker in self.trackers:
            try:
                tracker.finish()
            except Exception as exc:  # noqa: BLE001 - closing is best effort
                log.warning("tracker %s did not close cleanly: %s", tracker.name, exc)
        self.trackers = []

    def _each(self, method: str, *args: Any, **kwargs: Any) -> None:
        for tracker in list(self.trackers):
            self._call(tracker, method, *args, **kwargs)

    def _call(self, tracker: Any, method: str, *args: Any, **kwargs: Any) -> None:
        try:
            getattr(tracker, method)(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a tracker's failure must not stop training
            log.error("tracker %s failed in %s (%s); no longer reporting to it", tracker.name, method,
                      " ".join(str(exc).split())[:300])
            self.trackers.remove(tracker)


def _plain_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Hyperparameters as trackers accept them: str, int, float, bool or None (lists and others as text)."""
    return {k: v if v is None or isinstance(v, (str, int, float, bool)) else str(v) for k, v in config.items()}
