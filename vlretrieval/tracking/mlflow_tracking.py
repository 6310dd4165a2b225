"""Record a (dataset, model) pair's results in MLflow: one parent run, one nested run per stage.

Layout of what :func:`track_pair` writes into an experiment::

    {dataset}/{model}                 stage=pair       params, metrics.json, validation report,
    │                                                  workflow files (benchmarks, logs)
    ├── {dataset}/{model}/finetune    stage=finetune   params, train_loss / learning_rate /
    │                                                  logit_scale per step (and train_loss_<part>
    │                                                  for a loss of parts), throughput, train_log.jsonl
    ├── {dataset}/{model}/zeroshot    stage=zeroshot   params, recall metrics (with <name>_ci_low and
    │                                                  <name>_ci_high), metrics.json, predictions
    └── {dataset}/{model}/finetuned   stage=finetuned  (same as zeroshot)

Every run carries the tags ``dataset``, ``model``, ``stage``, ``config_hash``, ``git_commit`` and
``dataset_checksum``; children also carry ``mlflow.parentRunId``, which is what makes MLflow nest them.
A sweep member is tracked as a pair (its model is the member's name) with the sweep's tags added;
:func:`vlretrieval.tracking.sweeps.track_sweep` later nests its pair run under the sweep's parent run.

Tracking is idempotent. A run is found again by its tags (dataset, model, stage, config hash and, for a
child, its parent), so re-running updates the same runs: only params that are missing are logged
(MLflow never lets a param change), only training steps missing from the stored history are logged,
summary metrics are logged again only when their value changed, and artifacts are written to the same
artifact paths, replacing the previous copies. A different config hash gives a new set of runs.

Several tracking jobs may share one SQLite file. Every MLflow call is retried on its own when SQLite
reports a lock, with exponential backoff and jitter, so work already done is not repeated; the schema
of a new database is created under a file lock so that two first jobs do not both migrate it.
Nothing under the results directory is ever written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

from ..errors import DataError, VLRetrievalError
from ..retrieval.evaluate import I2T_FILE, METRICS_FILE, T2I_FILE

_logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
TRAIN_LOG_ARTIFACT = "train_log.jsonl"
WORKFLOW_ARTIFACT_DIR = "workflow"
PAIR_STAGE = "pair"
FINETUNE_STAGE = "finetune"
IDENTITY_TAGS = ("dataset", "model", "stage", "config_hash")
RUN_TAGS = IDENTITY_TAGS + ("git_commit", "dataset_checksum")

# MLflow's limits (mlflow.utils.validation); a batch holds at most 1000 entities in all.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_KEY_LENGTH = 250
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
_TRUNCATION_MARK = "...[truncated]"

# metrics.json direction blocks and the metric-name prefix each one gets in MLflow.
_DIRECTIONS = (("text_to_image", "t2i"), ("image_to_text", "i2t"))
_RECALL_KEYS = ("r1", "r5", "r10", "mean_recall")
EVAL_METRIC_KEYS = tuple(f"{p}_{k}" for _, p in _DIRECTIONS for k in _RECALL_KEYS) + ("mean_recall",)
# Ends of each figure's 95% interval (metrics.json "ci95"), logged when the scorer recorded them.
EVAL_INTERVAL_KEYS = tuple(f"{key}_ci_{end}" for key in EVAL_METRIC_KEYS for end in ("low", "high"))

# Per-step curves of the finetune run: metric name -> field of a train record.
_STEP_METRICS = (("train_loss", "loss"), ("learning_rate", "lr"), ("logit_scale", "logit_scale"))

# A reachability probe must fail fast; the calls after it may wait a little for a busy server.
_PROBE_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
_WORK_HTTP_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}

_BUSY_MARKERS = ("database is locked", "database table is locked", "database schema is locked", "sqlite_busy")
_BACKOFF_BASE_SECONDS = 0.1
_BACKOFF_CAP_SECONDS = 8.0


class TrackingError(VLRetrievalError):
    """The MLflow tracking store could not be reached or refused what was sent to it."""


# --------------------------------------------------------------------------------------------------
# Tracking URI
# --------------------------------------------------------------------------------------------------


def resolve_tracking_uri(configured: str, workdir: Path) -> str:
    """The tracking URI to use: ``MLFLOW_TRACKING_URI`` if set, else ``configured``.

    A relative SQLite path (``sqlite:///mlflow.db``) is made absolute against ``workdir``, so every
    job of a workflow writes the same database whatever its current directory is.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip() or (configured or "").strip() or DEFAULT_TRACKING_URI
    db_path = _sqlite_path(uri)
    if db_path is None or db_path == ":memory:":
        return uri
    _, sep, query = uri.partition("?")
    expanded = os.path.expanduser(db_path)
    if not os.path.isabs(expanded):
        expanded = os.path.join(os.path.abspath(os.fspath(workdir)), expanded)
    return "sqlite:///" + os.path.normpath(expanded) + sep + query


def _sqlite_path(uri: str) -> str | None:
    """The database path of a ``sqlite:///`` URI (``/abs`` or ``rel``), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return uri[len("sqlite:///"):].split("?", 1)[0]


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _sqlite_artifact_location(uri: str) -> str | None:
    """``file://<dir of the database>/mlartifacts``, where ``mlflow ui`` started in that dir looks."""
    db_path = _sqlite_path(uri)
    if not db_path or db_path == ":memory:":
        return None
    return (Path(os.path.abspath(os.path.expanduser(db_path))).parent / "mlartifacts").as_uri()


# --------------------------------------------------------------------------------------------------
# Inputs (read and checked before anything is sent to MLflow)
# --------------------------------------------------------------------------------------------------


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> ``{"train.learning_rate": "0.0005", ...}`` as MLflow param strings.

    Lists and other non-mapping containers become JSON; scalars other than strings are JSON too
    (``true``, ``null``), so a value reads the same as in the YAML config. Values longer than MLflow
    allows are cut deterministically, so a rerun compares equal to what was stored.
    """
    flat: dict[str, str] = {}
    for raw_key, value in params.items():
        key = _clean_key(f"{prefix}{raw_key}")
        if isinstance(value, Mapping) and value:
            nested = flatten_params(value, prefix=f"{key}.")
            for nested_key, nested_value in nested.items():
                _put_param(flat, nested_key, nested_value)
            continue
        _put_param(flat, key, _param_value(value))
    return flat


def _clean_key(key: str) -> str:
    # MLflow accepts only these characters in param and metric names (POSIX rules).
    cleaned = "".join(ch if (ch.isalnum() or ch in "_-./ :") else "_" for ch in str(key))
    if not cleaned:
        raise TrackingError(f"param name {key!r} is empty after removing characters MLflow does not accept")
    if len(cleaned) > MAX_KEY_LENGTH:
        raise TrackingError(f"param name {cleaned[:60]!r}... is {len(cleaned)} characters; MLflow allows {MAX_KEY_LENGTH}")
    return cleaned


def _put_param(flat: dict[str, str], key: str, value: str) -> None:
    if key in flat:
        raise TrackingError(f"two params flatten to the same MLflow name {key!r}; rename one of them in the config")
    flat[key] = value


def _param_value(value: Any) -> str:
    if isinstance(value, str):
        text = value
    elif isinstance(value, (Mapping, list, tuple, bool, int, float)) or value is None:
        text = json.dumps(value, ensure_ascii=False, default=str)
    else:
        text = str(value)
    if len(text) > MAX_PARAM_VALUE_LENGTH:
        text = text[: MAX_PARAM_VALUE_LENGTH - len(_TRUNCATION_MARK)] + _TRUNCATION_MARK
    return text


def _number(value: Any, where: str, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(where, f"{what} must be a number, found {value!r}")
    return float(value)


def _interval(value: Any, where: str, what: str, name: str) -> dict[str, float]:
    if not isinstance(value, list) or len(value) != 2:
        raise DataError(where, f"{what} must be a [low, high] pair, found {value!r}")
    return {f"{name}_ci_low": _number(value[0], where, what), f"{name}_ci_high": _number(value[1], where, what)}


def read_stage_metrics(metrics_path: Path, *, dataset: str, model: str) -> dict[str, dict[str, float]]:
    """``{stage: {t2i_r1: ..., mean_recall: ...}}`` from a pair's ``metrics.json``, values unrounded, with
    ``t2i_r1_ci_low``, ``t2i_r1_ci_high``, ... ``mean_recall_ci_high`` where it records intervals."""
    where = str(metrics_path)
    try:
        with open(metrics_path, "r", encoding="utf-8") as handle:
            document = json.load(handle)
    except FileNotFoundError:
        raise DataError(where, "metrics file not found; the evaluate rule writes it before tracking") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}:{exc.lineno}", f"invalid JSON: {exc.msg}") from None
    if not isinstance(document, dict) or not isinstance(document.get("stages"), dict):
        raise DataError(where, 'expected an object with a "stages" object')
    for key, expected in (("dataset", dataset), ("model", model)):
        if key in document and document[key] != expected:
            raise DataError(where, f"{key} is {document[key]!r} but the pair being tracked is {dataset}/{model}")
    stages: dict[str, dict[str, float]] = {}
    for stage, block in document["stages"].items():
        if stage in (PAIR_STAGE, FINETUNE_STAGE):
            raise DataError(where, f"stage name {stage!r} is reserved for the {stage} run", record=f"stage={stage}")
        if not isinstance(block, dict):
            raise DataError(where, "expected an object of recall blocks", record=f"stage={stage}")
        values: dict[str, float] = {}
        for direction, prefix in _DIRECTIONS:
            recall = block.get(direction)
            if not isinstance(recall, dict):
                raise DataError(where, f'missing the "{direction}" block', record=f"stage={stage}")
            for key in _RECALL_KEYS:
                if key not in recall:
                    raise DataError(where, f'"{direction}" has no "{key}"', record=f"stage={stage}")
                values[f"{prefix}_{key}"] = _number(recall[key], f"{where} (stage={stage})", f"{direction}.{key}")
                if "ci95" in recall:
                    values.update(_interval(recall["ci95"].get(key), f"{where} (stage={stage})",
                                            f"{direction}.ci95.{key}", f"{prefix}_{key}"))
        if "mean_recall" not in block:
            raise DataError(where, 'missing "mean_recall"', record=f"stage={stage}")
        values["mean_recall"] = _number(block["mean_recall"], f"{where} (stage={stage})", "mean_recall")
        if "ci95_mean_recall" in block:
            values.update(_interval(block["ci95_mean_recall"], f"{where} (stage={stage})", "ci95_mean_recall",
                                    "mean_recall"))
        stages[str(stage)] = values
    return stages


@dataclass
class TrainingRecord:
    """What the finetune run shows: one point per logged step plus the run's throughput."""

    steps: dict[int, dict[str, tuple[float, int]]] = field(default_factory=dict)  # step -> name -> (value, ms)
    summary: dict[str, float] = field(default_factory=dict)


def read_training(train_log: Path) -> TrainingRecord:
    """Parse ``train_log.jsonl``; a record that cannot be read is an error naming its line."""
    where = str(train_log)
    record = TrainingRecord()
    speeds: list[float] = []
    end: dict[str, Any] | None = None
    duplicates = 0
    from ..training.checkpoints import iter_train_log

    try:
        entries = list(iter_train_log(train_log, strict=True))
    except FileNotFoundError:
        raise DataError(where, "training log not found; the finetune rule writes it") from None
    for line_where, obj in entries:
        event = obj.get("event")
        if event == "end":
            end = obj
            continue
        if event != "train":
            continue
        if isinstance(obj.get("step"), bool) or not isinstance(obj.get("step"), int):
            raise DataError(line_where, f"train record needs an integer step, found {obj.get('step')!r}")
        step = obj["step"]
        stamp = obj.get("time")
        millis = int(round(float(stamp) * 1000)) if isinstance(stamp, (int, float)) and not isinstance(stamp, bool) else None
        point: dict[str, tuple[float, int]] = {}
        for name, source in _STEP_METRICS:
            value = obj.get(source)
            if value is None:
                if source == "loss":
                    raise DataError(line_where, "train record has no loss", record=f"step={step}")
                continue
            point[name] = (_number(value, line_where, source), millis if millis is not None else 0)
        parts = obj.get("loss_parts", {})
        if not isinstance(parts, dict):
            raise DataError(line_where, f"loss_parts must map a part to its loss, found {parts!r}", record=f"step={step}")
        for part, value in parts.items():
            point[f"train_loss_{part}"] = (_number(value, line_where, f"loss_parts.{part}"), millis if millis is not None else 0)
        if step in record.steps:
            duplicates += 1
        record.steps[step] = point
        speed = obj.get("samples_per_second")
        if isinstance(speed, (int, float)) and not isinstance(speed, bool) and math.isfinite(speed):
            speeds.append(float(speed))
    if duplicates:
        _logger.warning("%s: %d steps appear more than once; the last record of each is tracked", where, duplicates)
    if not record.steps:
        _logger.warning("%s: no train records; the finetune run gets no training curves", where)
    if speeds:
        record.summary["mean_samples_per_second"] = sum(speeds) / len(speeds)
    if end is not None:
        for key in ("train_samples_per_second", "train_runtime"):
            if end.get(key) is not None:
                record.summary[key] = _number(end[key], where, f"end record {key}")
    return record


def _stage_prediction_files(results_dir: Path, stage: str) -> list[Path]:
    files = [results_dir / stage / T2I_FILE, results_dir / stage / I2T_FILE]
    for path in files:
        if not path.is_file():
            raise DataError(str(path), f"predictions of stage {stage!r} not found; metrics.json lists that stage")
    return files


def _workflow_artifacts(files: Sequence[Path]) -> tuple[list[tuple[Path, str]], list[str]]:
    """``(file, artifact dir)`` for each existing file, keeping the paths below their common parent."""
    present: list[Path] = []
    missing: list[str] = []
    seen: set[Path] = set()
    for item in files:
        path = Path(os.path.abspath(item))
        if path in seen:
            continue
        seen.add(path)
        if path.is_file():
            present.append(path)
        else:
            missing.append(str(item))
    if not present:
        return [], missing
    common = Path(os.path.commonpath([str(p.parent) for p in present]))
    placed = []
    for path in present:
        relative = path.parent.relative_to(common).as_posix()
        placed.append((path, WORKFLOW_ARTIFACT_DIR if relative == "." else f"{WORKFLOW_ARTIFACT_DIR}/{relative}"))
    return placed, missing


def _check_filter_value(name: str, value: str) -> str:
    # Values are matched inside quoted MLflow search filters; a quote would change the filter.
    if not isinstance(value, str) or not value:
        raise TrackingError(f"{name} must be a non-empty string, found {value!r}")
    if "'" in value or '"' in value or "\\" in value:
        raise TrackingError(f"{name} {value!r} contains a quote or backslash, which MLflow run search cannot match")
    return value


# --------------------------------------------------------------------------------------------------
# MLflow access with bounded retries
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _environment(values: Mapping[str, str], *, keep_user_values: bool) -> Iterator[None]:
    """Set environment variables for the duration of a block and restore them afterwards."""
    saved = {key: os.environ.get(key) for key in values}
    try:
        for key, value in values.items():
            if keep_user_values and saved[key] is not None:
                continue
            os.environ[key] = value
        yield
    finally:
        for key, old in saved.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


@contextlib.contextmanager
def _sqlite_init_lock(uri: str) -> Iterator[None]:
    """Serialise opening the store across processes, so only one of them creates a new schema."""
    db_path = _sqlite_path(uri)
    if not db_path or db_path == ":memory:":
        yield
        return
    try:
        import fcntl
    except ImportError:  # not POSIX: MLflow's own initialisation is all there is
        yield
        return
    db_file = Path(os.path.abspath(os.path.expanduser(db_path)))
    db_file.parent.mkdir(parents=True, exist_ok=True)
    lock_file = db_file.parent / f".{db_file.name}.init.lock"
    with open(lock_file, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _is_busy(exc: BaseException) -> bool:
    """True for SQLite lock contention, looking through wrapped causes."""
    seen = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if any(marker in str(current).lower() for marker in _BUSY_MARKERS):
            return True
        current = current.__cause__ or current.__context__
    return False


def _store_errors() -> tuple[type[BaseException], ...]:
    from mlflow.exceptions import MlflowException

    errors: list[type[BaseException]] = [MlflowException, OSError]
    with contextlib.suppress(ImportError):
        import requests

        errors.append(requests.exceptions.RequestException)
    with contextlib.suppress(ImportError):
        import sqlalchemy.exc

        errors.append(sqlalchemy.exc.SQLAlchemyError)
    return tuple(errors)


class _Store:
    """An MlflowClient whose every call is retried on SQLite lock contention.

    MLflow's SQLite sessions already wait up to 20 s for a lock before failing; the retries here carry
    a job through longer contention, such as many pairs finishing at once.
    """

    def __init__(self, uri: str, *, retries: int, results_dir: Path):
        self.uri = uri
        self.retries = max(1, int(retries))
        self.results_dir = results_dir
        self.errors = _store_errors()
        from mlflow import MlflowClient

        with _sqlite_init_lock(uri):
            self.client = self.call("open the tracking store", MlflowClient, uri)

    def failure(self, what: str, exc: BaseException) -> TrackingError:
        return TrackingError(
            f"MLflow tracking at {self.uri} failed to {what}: {type(exc).__name__}: {exc}. "
            f"Results in {self.results_dir} are untouched; re-running the track rule completes tracking."
        )

    def call(self, what: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        for attempt in range(1, self.retries + 1):
            try:
                return fn(*args, **kwargs)
            except self.errors as exc:
                if attempt < self.retries and _is_busy(exc):
                    delay = min(_BACKOFF_CAP_SECONDS, _BACKOFF_BASE_SECONDS * 2 ** (attempt - 1))
                    delay *= random.uniform(0.5, 1.5)
                    _logger.info("SQLite busy while trying to %s (attempt %d/%d); retrying in %.2f s",
                                 what, attempt, self.retries, delay)
                    time.sleep(delay)
                    continue
                raise self.failure(what, exc) from exc
        raise AssertionError("unreachable")  # the loop either returns or raises

    def probe(self) -> None:
        """Fail fast with a clear message when an HTTP tracking server does not answer."""
        with _environment(_PROBE_HTTP_ENV, keep_user_values=False):
            try:
                self.client.search_experiments(max_results=1)
            except self.errors as exc:
                raise TrackingError(
                    f"MLflow tracking server at {self.uri} did not answer ({type(exc).__name__}: {exc}). "
                    f"Results in {self.results_dir} are untouched; start the server (or point tracking.uri / "
                    f"MLFLOW_TRACKING_URI at a running one) and re-run the track rule to complete tracking."
                ) from exc

    def experiment_id(self, name: str, artifact_location: str | None) -> str:
        from mlflow.entities import LifecycleStage

        experiment = self.call(f"look up experiment {name!r}", self.client.get_experiment_by_name, name)
        if experiment is None:
            try:
                # Not retried here: a parallel job may create it first, then fetching it is the answer.
                return self.client.create_experiment(name, artifact_location=artifact_location)
            except self.errors as exc:
                experiment = self.call(f"look up experiment {name!r}", self.client.get_experiment_by_name, name)
                if experiment is None:
                    if _is_busy(exc):
                        return self.call(f"create experiment {name!r}", self.client.create_experiment,
                                         name, artifact_location=artifact_location)
                    raise self.failure(f"create experiment {name!r}", exc) from exc
        if experiment.lifecycle_stage == LifecycleStage.DELETED:
            raise TrackingError(
                f"experiment {name!r} at {self.uri} is deleted; restore it (mlflow experiments restore "
                f"--experiment-id {experiment.experiment_id}) or remove it for good (mlflow gc), then re-run "
                f"the track rule. Results in {self.results_dir} are untouched."
            )
        return experiment.experiment_id


# --------------------------------------------------------------------------------------------------
# Runs
# --------------------------------------------------------------------------------------------------


def _chunks(items: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class _PairTracker:
    """Finds or creates the runs of one tracked unit (a pair, or a sweep's parent) by their identity
    tags, and logs into them idempotently."""

    def __init__(self, store: _Store, experiment_id: str, *, base_tags: dict[str, str], params: dict[str, str],
                 run_prefix: str, identity_tags: Sequence[str] = IDENTITY_TAGS):
        self.store = store
        self.client = store.client
        self.experiment_id = experiment_id
        self.base_tags = base_tags
        self.params = params
        self.run_prefix = run_prefix
        self.identity_tags = tuple(identity_tags)
        self.touched: list[str] = []

    # -- finding or creating runs ------------------------------------------------------------------

    def run(self, stage: str, parent_id: str | None, run_name: str | None = None):
        from mlflow.entities import ViewType
        from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID

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
        else:
            tags = dict(identity)
            if parent_id is not None:
                tags[MLFLOW_PARENT_RUN_ID] = parent_id
            if identity.get("git_commit"):
                tags[MLFLOW_GIT_COMMIT] = identity["git_commit"]
            name = run_name or (self.run_prefix if stage == PAIR_STAGE else f"{self.run_prefix}/{stage}")
            run = self.store.call(f"create the {stage} run", self.client.create_run,
                                  self.experiment_id, tags=tags, run_name=name)
        self.touched.append(run.info.run_id)
        return run

    # -- logging ------------------------------------------------------------------------------------

    def sync_tags_and_params(self, run, stage: str) -> None:
        from mlflow.entities import Param, RunTag
        from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT

        run_id = run.info.run_id
        wanted_tags = dict(self.base_tags, stage=stage)
        if wanted_tags.get("git_commit"):
            wanted_tags[MLFLOW_GIT_COMMIT] = wanted_tags["git_commit"]
        # Provenance tags follow the latest tracking of the same config (e.g. a new commit).
        tags = [RunTag(k, v) for k, v in wanted_tags.items() if run.data.tags.get(k) != v]
        stored = run.data.params
        conflicts = {k: (stored[k], v) for k, v in self.params.items() if k in stored and stored[k] != v}
        if conflicts:
            detail = "; ".join(f"{k}: stored {old!r}, now {new!r}" for k, (old, new) in sorted(conflicts.items())[:5])
            raise TrackingError(
                f"run {run_id} ({stage}, config_hash={self.base_tags['config_hash']}) already holds different "
                f"values for {len(conflicts)} params ({detail}); MLflow never changes a logged param. A changed "
                f"config must change the config hash, which starts new runs."
            )
        params = [Param(k, v) for k, v in self.params.items() if k not in stored]
        for batch in _chunks(params, MAX_PARAMS_PER_BATCH):
            self.store.call(f"log params of the {stage} run", self.client.log_batch,
                            run_id, params=list(batch), synchronous=True)
        if tags:
            self.store.call(f"set tags of the {stage} run", self.client.log_batch,
                            run_id, tags=tags, synchronous=True)

    def log_changed_values(self, run, stage: str, values: Mapping[str, float]) -> None:
        """Single-valued metrics (step 0), logged again only when the stored value differs."""
        from mlflow.entities import Metric

        stored = run.data.metrics
        now = int(time.time() * 1000)
        metrics = [
            Metric(key, value, now, 0)
            for key, value in values.items()
            if not _same_value(stored.get(key), value)
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

    def finish(self, run_ids: Sequence[str]) -> None:
        for run_id in run_ids:
            self.store.call(f"finish run {run_id}", self.client.set_terminated, run_id, "FINISHED")

    def mark_failed(self) -> None:
        # Best effort: the store may be what failed, and the original error matters more.
        for run_id in self.touched:
            with contextlib.suppress(Exception):
                self.client.set_terminated(run_id, "FAILED")


def _same_value(stored: float | None, value: float) -> bool:
    if stored is None:
        return False
    if math.isnan(stored) and math.isnan(value):
        return True
    return stored == value


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------


def track_pair(
    *,
    tracking_uri: str,
    experiment: str,
    dataset: str,
    model: str,
    results_dir: Path,
    params: dict,
    config_hash: str,
    git_commit: str,
    dataset_checksum: str,
    train_log: Path | None,
    validation_report: Path | None,
    artifact_files: list[Path],
    extra_tags: Mapping[str, str] | None = None,
    retries: int = 8,
) -> dict:
    """Create or update the MLflow runs of one (dataset, model) pair; see the module docstring.

    ``extra_tags`` go on every run of the pair without being part of its identity (a sweep member's
    ``sweep``, ``sweep_configuration``, ``seed`` and ``base_model``).

    Returns ``{"experiment_id", "parent_run_id", "runs": {stage: run_id}, "missing_artifacts": [...]}``,
    where ``missing_artifacts`` lists entries of ``artifact_files`` that did not exist (they are skipped
    with a warning: workflow logs are supporting material, the results are not).
    Raises :class:`TrackingError` when the store cannot be reached or refuses an update, and
    :class:`~vlretrieval.errors.DataError` when an input file is missing or malformed; either way the
    results directory is left as it was.
    """
    results_dir = Path(results_dir)
    if not experiment:
        raise TrackingError("the MLflow experiment name is empty")
    base_tags = {
        "dataset": _check_filter_value("dataset", dataset),
        "model": _check_filter_value("model", model),
        "config_hash": _check_filter_value("config_hash", config_hash),
        "git_commit": str(git_commit or ""),
        "dataset_checksum": str(dataset_checksum or ""),
    }
    for key, value in (extra_tags or {}).items():
        if key in base_tags or key == "stage":
            raise TrackingError(f"extra tag {key!r} would replace a tag that identifies the pair's runs")
        base_tags[_check_filter_value(f"tag {key}", key)] = _check_filter_value(f"tag {key}", str(value))

    # Everything is read and checked first, so a bad input never leaves half-updated runs behind.
    metrics_path = results_dir / METRICS_FILE
    stage_metrics = read_stage_metrics(metrics_path, dataset=dataset, model=model)
    stage_files = {stage: _stage_prediction_files(results_dir, stage) for stage in stage_metrics}
    training = read_training(Path(train_log)) if train_log is not None else None
    if validation_report is not None and not Path(validation_report).is_file():
        raise DataError(str(validation_report), "validation report not found")
    workflow_files, missing = _workflow_artifacts([Path(p) for p in artifact_files])
    for item in missing:
        _logger.warning("%s: not found; it is not attached to the %s/%s run", item, dataset, model)
    flat_params = flatten_params(params or {})

    http = _is_http(tracking_uri)
    # MLflow prints a link on every finished run; one logged link to the pair's run says enough.
    work_env = {**(_WORK_HTTP_ENV if http else {}), "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
    with _environment(work_env, keep_user_values=True):
        store = _Store(tracking_uri, retries=retries, results_dir=results_dir)
        if http:
            store.probe()
        artifact_location = _sqlite_artifact_location(tracking_uri)
        experiment_id = store.experiment_id(experiment, artifact_location)
        tracker = _PairTracker(store, experiment_id, base_tags=base_tags, params=flat_params,
                               run_prefix=f"{dataset}/{model}")
        try:
            parent = tracker.run(PAIR_STAGE, None)
            parent_id = parent.info.run_id
            tracker.sync_tags_and_params(parent, PAIR_STAGE)
            tracker.log_file(parent, metrics_path)
            if validation_report is not None:
                tracker.log_file(parent, Path(validation_report))
            for path, artifact_dir in workflow_files:
                tracker.log_file(parent, path, artifact_dir)

            runs: dict[str, str] = {}
            if training is not None:
                run = tracker.run(FINETUNE_STAGE, parent_id)
                tracker.sync_tags_and_params(run, FINETUNE_STAGE)
                added = tracker.log_missing_steps(run, training)
                tracker.log_changed_values(run, FINETUNE_STAGE, training.summary)
                tracker.log_file(run, Path(train_log), name=TRAIN_LOG_ARTIFACT)
                _logger.info("%s/%s finetune run %s: %d new metric points", dataset, model, run.info.run_id, added)
                runs[FINETUNE_STAGE] = run.info.run_id
            for stage, values in stage_metrics.items():
                run = tracker.run(stage, parent_id)
                tracker.sync_tags_and_params(run, stage)
                tracker.log_changed_values(run, stage, values)
                tracker.log_file(run, metrics_path)
                for path in stage_files[stage]:
                    tracker.log_file(run, path)
                runs[stage] = run.info.run_id

            tracker.finish([*runs.values(), parent_id])
        except Exception:
            tracker.mark_failed()
            raise
    where = f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{parent_id}" if http else tracking_uri
    _logger.info("tracked %s/%s in experiment %r: run %s (%s), stages %s",
                 dataset, model, experiment, parent_id, where, ", ".join(runs))
    return {"experiment_id": experiment_id, "parent_run_id": parent_id, "runs": runs,
            "missing_artifacts": missing}
