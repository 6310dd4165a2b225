"""System metrics of the fine-tuning job, sampled while it trains and logged later with their times.

MLflow samples system metrics only into a live run, and the runs here are created after the jobs
end. So the fine-tuning job samples with MLflow's own monitors (CPU and memory, disk, network) into
``system_metrics.jsonl`` beside its ``train_log.jsonl``, one JSON line per sample (``time`` in unix
seconds, then MLflow's metric names such as ``system/cpu_utilization_percentage``), every
``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` seconds (MLflow's setting, 10 s unless set); the track
rule logs the samples into the training run under those names and times, as MLflow would have.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from pathlib import Path
from typing import Any

from ...errors import DataError

_logger = logging.getLogger(__name__)

SYSTEM_METRICS_FILE = "system_metrics.jsonl"
SYSTEM_PREFIX = "system/"


def system_metrics_path(train_log: Path) -> Path:
    return Path(train_log).with_name(SYSTEM_METRICS_FILE)


class SystemSampler:
    """Samples the machine on a background thread for the duration of a ``with`` block."""

    def __init__(self, out_path: Path, *, interval_seconds: float | None = None):
        from mlflow.environment_variables import MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL

        self.out_path = Path(out_path)
        self.interval = float(interval_seconds if interval_seconds is not None
                              else MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL.get() or 10)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "SystemSampler":
        import psutil
        from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
        from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
        from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

        self.monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
        psutil.cpu_percent()  # the first sample's utilisation is measured from here
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        # A rerun samples afresh: the samples describe the attempt that produced the model.
        self._handle = open(self.out_path, "w", encoding="utf-8")
        self._thread = threading.Thread(target=self._run, name="system-metrics", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._handle.close()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        record: dict[str, float] = {"time": round(time.time(), 3)}
        for monitor in self.monitors:
            try:
                monitor.collect_metrics()
                record.update({f"{SYSTEM_PREFIX}{k}": float(v) for k, v in monitor.aggregate_metrics().items()})
            except Exception as exc:  # a monitor the platform lacks must not stop training
                _logger.warning("system metrics: %s failed (%s); its metrics are left out", type(monitor).__name__, exc)
            finally:
                monitor.clear_metrics()
        self._handle.write(json.dumps(record) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())


def read_system_samples(path: Path) -> list[tuple[int, dict[str, float]]]:
    """``[(unix ms, {metric: value})]`` from a samples file; a line cut short by a kill is skipped."""
    samples = []
    with open(path, "r", encoding="utf-8") as handle:
        lines = handle.readlines()
    for number, line in enumerate(lines, start=1):
        if not line.endswith("\n"):
            break
        try:
            record = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{path}:{number}", f"invalid JSON: {exc}") from None
        stamp = record.pop("time", None) if isinstance(record, dict) else None
        if not isinstance(stamp, (int, float)) or isinstance(stamp, bool):
            raise DataError(f"{path}:{number}", "a sample needs a numeric time")
        values = {}
        for name, value in record.items():
            if not name.startswith(SYSTEM_PREFIX) or isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not math.isfinite(value):
                raise DataError(f"{path}:{number}", f"{name!r} is not a system metric with a finite value")
            values[name] = float(value)
        samples.append((int(round(stamp * 1000)), values))
    return samples
