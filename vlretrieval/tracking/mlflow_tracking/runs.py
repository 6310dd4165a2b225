"""Finding or creating the runs of one tracked unit by their identity tags, and logging into them
idempotently: params once, metrics when they change, curves by missing step, files by fixed path."""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator, Mapping, Sequence, TypeVar

from .records import JobSpan, SplitIdentity, TrainingRecord, rounded
from .store import TrackingError, _Store

_logger = logging.getLogger(__name__)

T = TypeVar("T")

IDENTITY_TAGS = ("dataset", "model", "stage", "config_hash")
RUN_TAGS = IDENTITY_TAGS + ("git_commit", "dataset_checksum")
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
# The input tag MLflow's UI shows as a dataset's context.
DATASET_CONTEXT_TAG = "mlflow.data.context"
EVALUATION_CONTEXT = "evaluation"


def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _same_value(stored: float | None, value: float) -> bool:
    if stored is None:
        return False
    if math.isnan(stored) and math.isnan(value):
        return True
    return stored == value


class _PairTracker:
    """Finds or creates the runs of one tracked unit (a pair, or a sweep's parent) by their identity
    tags, and logs into them idempotently."""

    def __init__(self, store: _Store, experiment_id: str, *, base_tags: dict[str, str],
                 identity_tags: Sequence[str] = IDENTITY_TAGS):
        self.store = store
        self.client = store.client
        self.experiment_id = experiment_id
        self.base_tags = base_tags
        self.identity_tags = tuple(identity_tags)
        self.touched: list[str] = []

    # -- finding or creating runs ------------------------------------------------------------------

    def run(self, stage: str, parent_id: str | None, *, name: str, span: JobSpan | None = None):
        """The run of ``stage`` (under ``parent_id``), created with ``name`` and, when known, the start
        time of the jobs it stands for; a run found again gets ``name`` if it had another."""
        from mlflow.entities import ViewType
        from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

        identity = dict(self.base_tags, stage=stage)
        clauses = [f"tags.{key} = '{identity[key]}'" for key in self.identity_tags]
        if parent_id is not None:
            clauses.append(f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_id}'")
        found = self.store.call(
            f"search the {stage} run", self.client.search_runs,
            [self.experiment_id], " and ".join(clauses),
            run_view_type=ViewType.ACTIVE_ONLY, max_results=50, order_by=["attributes.start_time ASC"],
        )
        if found:
            if len(found) > 1:
                _logger.warning("%d active %s runs match %s; updating the oldest, %s",
                                len(found), stage, identity, found[0].info.run_id)
            run = found[0]
            if run.info.run_name != name:
                self.store.call(f"rename the {stage} run", self.client.set_tag, run.info.run_id, MLFLOW_RUN_NAME, name)
        else:
            tags = dict(identity)
            if parent_id is not None:
                tags[MLFLOW_PARENT_RUN_ID] = parent_id
            if identity.get("git_commit"):
                tags[MLFLOW_GIT_COMMIT] = identity["git_commit"]
            run = self.store.call(f"create the {stage} run", self.client.create_run, self.experiment_id,
                                  start_time=span.start_ms if span is not None else None, tags=tags, run_name=name)
        self.touched.append(run.info.run_id)
        return run

    # -- logging ------------------------------------------------------------------------------------

    def sync_tags_and_params(self, run, stage: str, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param, RunTag
        from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT

        run_id = run.info.run_id
        wanted_tags = dict(self.base_tags, stage=stage)
        if wanted_tags.get("git_commit"):
            wanted_tags[MLFLOW_GIT_COMMIT] = wanted_tags["git_commit"]
        # Provenance tags follow the latest tracking of the same config (e.g. a new commit).
        tags = [RunTag(k, v) for k, v in wanted_tags.items() if run.data.tags.get(k) != v]
        stored = run.data.params
        conflicts = {k: (stored[k], v) for k, v in params.items() if k in stored and stored[k] != v}
        if conflicts:
            detail = "; ".join(f"{k}: stored {old!r}, now {new!r}" for k, (old, new) in sorted(conflicts.items())[:5])
            raise TrackingError(
                f"run {run_id} ({stage}, config_hash={self.base_tags['config_hash']}) already holds different "
                f"values for {len(conflicts)} params ({detail}); MLflow never changes a logged param. A changed "
                f"config must change the config hash, which starts new runs."
            )
        missing = [Param(k, v) for k, v in params.items() if k not in stored]
        for batch in _chunks(missing, MAX_PARAMS_PER_BATCH):
            self.store.call(f"log params of the {stage} run", self.client.log_batch,
                            run_id, params=list(batch), synchronous=True)
        if tags:
            self.store.call(f"set tags of the {stage} run", self.client.log_batch,
                            run_id, tags=tags, synchronous=True)

    def log_changed_values(self, run, stage: str, values: Mapping[str, float], *, at_ms: int | None = None) -> None:
        """Single-valued metrics (step 0), rounded as the leaderboard rounds them, logged again only
        when the stored value differs; stamped ``at_ms`` (the end of the jobs that produced them)."""
        from mlflow.entities import Metric

        stored = run.data.metrics
        stamp = at_ms if at_ms is not None else int(time.time() * 1000)
        metrics = [
            Metric(key, rounded(value), stamp, 0)
            for key, value in values.items()
            if not _same_value(stored.get(key), rounded(value))
        ]
        for batch in _chunks(metrics, MAX_METRICS_PER_BATCH):
            self.store.call(f"log metrics of the {stage} run", self.client.log_batch,
                            run.info.run_id, metrics=list(batch), synchronous=True)

    def log_missing_steps(self, run, training: TrainingRecord) -> int:
        """Per-step curves: only steps absent from the stored history of each metric are sent."""
        from mlflow.entities import Metric

        run_id = run.info.run_id
        # The fixed curves, then any loss parts (train_loss_itc, ...) in the order the log names them.
        names = list(dict.fromkeys(name for point in training.steps.values() for name in point))
        metrics = []
        for name in names:
            if name in run.data.metrics:
                history = self.store.call(f"read the {name} history", self.client.get_metric_history, run_id, name)
                logged = {m.step for m in history}
            else:
                logged = set()
            now = int(time.time() * 1000)
            for step in sorted(training.steps):
                point = training.steps[step].get(name)
                if point is not None and step not in logged:
                    value, millis = point
                    metrics.append(Metric(name, value, millis or now, step))
        for batch in _chunks(metrics, MAX_METRICS_PER_BATCH):
            self.store.call("log training curves", self.client.log_batch,
                            run_id, metrics=list(batch), synchronous=True)
        return len(metrics)

    def log_system_samples(self, run, samples: Sequence[tuple[int, Mapping[str, float]]]) -> None:
        """System metrics sampled during the job, one step per sample at its own time; a run that
        already holds them is left as it is."""
        from mlflow.entities import Metric

        if not samples or any(name.startswith("system/") for name in run.data.metrics):
            return
        metrics = [Metric(name, value, stamp, step)
                   for step, (stamp, values) in enumerate(samples) for name, value in values.items()]
        for batch in _chunks(metrics, MAX_METRICS_PER_BATCH):
            self.store.call("log system metrics", self.client.log_batch, run.info.run_id, metrics=list(batch),
                            synchronous=True)

    def log_split(self, run, split: SplitIdentity) -> None:
        """The evaluation split as the run's dataset input, unless the run already has it."""
        import json

        from mlflow.entities import Dataset, DatasetInput, InputTag

        current = self.store.call("read the run's inputs", self.client.get_run, run.info.run_id)
        for logged in current.inputs.dataset_inputs if current.inputs else []:
            if logged.dataset.name == split.name and logged.dataset.digest == split.digest:
                return
        dataset = Dataset(name=split.name, digest=split.digest, source_type="local",
                          source=json.dumps({"uri": split.source}), profile=json.dumps(split.profile))
        self.store.call("log the evaluation split", self.client.log_inputs, run.info.run_id,
                        datasets=[DatasetInput(dataset, tags=[InputTag(DATASET_CONTEXT_TAG, EVALUATION_CONTEXT)])])

    def log_file(self, run, path: Path, artifact_path: str | None = None, *, name: str | None = None) -> None:
        """Write one file into the run's artifacts, replacing the copy a previous tracking left there."""
        run_id = run.info.run_id
        if name is None or name == path.name:
            self.store.call(f"upload {path}", self.client.log_artifact, run_id, str(path), artifact_path)
            return
        # log_artifact keeps the file's own name; a copy gives the artifact its fixed name.
        with tempfile.TemporaryDirectory(prefix="vlretrieval-track-") as tmp:
            staged = Path(tmp) / name
            shutil.copyfile(path, staged)
            self.store.call(f"upload {path}", self.client.log_artifact, run_id, str(staged), artifact_path)

    def finish(self, run_id: str, span: JobSpan | None = None) -> None:
        """Mark the run finished at the end of the jobs it stands for (now when they are unknown)."""
        self.store.call(f"finish run {run_id}", self.client.set_terminated, run_id, "FINISHED",
                        end_time=span.end_ms if span is not None else None)

    def mark_failed(self) -> None:
        # Best effort: the store may be what failed, and the original error matters more.
        for run_id in self.touched:
            with contextlib.suppress(Exception):
                self.client.set_terminated(run_id, "FAILED")


__all__ = ["IDENTITY_TAGS", "RUN_TAGS", "_PairTracker"]
