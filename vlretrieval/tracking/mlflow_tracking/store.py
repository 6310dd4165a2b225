"""The MLflow store: where it is, how its experiment is opened, and every call retried on SQLite locks."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import sqlite3
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, TypeVar

from ...errors import VLRetrievalError

_logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
ARTIFACT_DIR_NAME = "mlartifacts"

# The experiment tag MLflow's UI writes when a user picks the experiment's kind; this value is its
# "Machine learning" (model training) kind, as opposed to "genai_development".
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
# MLflow 3.17's UI takes the view from this query parameter (else from the browser's last choice).
MODEL_TRAINING_VIEW_QUERY = "workflowType=machine_learning"

# The runs table shows no metric columns by default. A link with ``viewStateShareKey=<key>`` makes
# the UI load its view from the experiment tag ``mlflow.sharedViewState.<key>``: the JSON of the
# table's state, keys left out keeping their defaults. This one adds the parents' headline figures
# and the evaluation runs' mean recall to the default columns, ahead of them and wide enough for
# their names so they show without scrolling; newest run first.
RUNS_VIEW_KEY = "vlretrieval-pairs"
RUNS_VIEW_TAG = f"mlflow.sharedViewState.{RUNS_VIEW_KEY}"
RUNS_VIEW_METRICS = ("finetuned_mean_recall", "zeroshot_mean_recall", "mean_recall_gain", "mean_recall")
_DEFAULT_ATTRIBUTE_COLUMNS = ("Source", "Models", "Dataset")

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


def runs_view_state() -> str:
    """The value of :data:`RUNS_VIEW_TAG`; the UI names columns ``attributes.`Name``` and ``metrics.`name```."""
    metrics = [f"metrics.`{name}`" for name in RUNS_VIEW_METRICS]
    state = {
        "selectedColumns": [f"attributes.`{name}`" for name in _DEFAULT_ATTRIBUTE_COLUMNS] + metrics,
        "columnOrder": metrics,
        "columnWidths": {column: 20 + 8 * len(name) for column, name in zip(metrics, RUNS_VIEW_METRICS)},
        "orderByKey": "attributes.start_time",
        "orderByAsc": False,
    }
    return json.dumps(state, separators=(",", ":"))


class TrackingError(VLRetrievalError):
    """The MLflow tracking store could not be reached or refused what was sent to it."""


# --------------------------------------------------------------------------------------------------
# Tracking URI and artifact root
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


def sqlite_artifact_location(uri: str) -> str | None:
    """Where a SQLite store's experiment keeps its artifacts: ``mlartifacts`` beside the database.

    The path is relative to the current directory when the database lies below it (the workflow's
    directory, where ``mlflow ui`` is started), so a checkout moved or copied elsewhere still opens
    its artifacts; otherwise it is an absolute ``file://`` URI.
    """
    db_path = _sqlite_path(uri)
    if not db_path or db_path == ":memory:":
        return None
    root = Path(os.path.abspath(os.path.expanduser(db_path))).parent / ARTIFACT_DIR_NAME
    relative = os.path.relpath(root, Path.cwd())
    if relative == os.pardir or relative.startswith(os.pardir + os.sep):
        return root.as_uri()
    return Path(relative).as_posix()


# --------------------------------------------------------------------------------------------------
# Environment and locks
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


def work_environment(uri: str) -> Mapping[str, str]:
    """Settings for the tracking calls: bounded HTTP retries, and no link printed per finished run
    (one logged link to the pair's run says enough)."""
    return {**(_WORK_HTTP_ENV if _is_http(uri) else {}), "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}


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

    errors: list[type[BaseException]] = [MlflowException, OSError, sqlite3.Error]
    with contextlib.suppress(ImportError):
        import requests

        errors.append(requests.exceptions.RequestException)
    with contextlib.suppress(ImportError):
        import sqlalchemy.exc

        errors.append(sqlalchemy.exc.SQLAlchemyError)
    return tuple(errors)


# --------------------------------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------------------------------


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
        if not _is_http(self.uri):
            return
        with _environment(_PROBE_HTTP_ENV, keep_user_values=False):
            try:
                self.client.search_experiments(max_results=1)
            except self.errors as exc:
                raise TrackingError(
                    f"MLflow tracking server at {self.uri} did not answer ({type(exc).__name__}: {exc}). "
                    f"Results in {self.results_dir} are untouched; start the server (or point tracking.uri / "
                    f"MLFLOW_TRACKING_URI at a running one) and re-run the track rule to complete tracking."
                ) from exc

    def experiment_id(self, name: str) -> str:
        """The experiment's id, created when missing (model-training kind, artifacts beside a SQLite
        database); a deleted experiment is an error that says how to restore it."""
        from mlflow.entities import LifecycleStage

        experiment = self.call(f"look up experiment {name!r}", self.client.get_experiment_by_name, name)
        if experiment is None:
            artifact_location = sqlite_artifact_location(self.uri)
            try:
                # Not retried here: a parallel job may create it first, then fetching it is the answer.
                experiment_id = self.client.create_experiment(name, artifact_location=artifact_location)
            except self.errors as exc:
                experiment = self.call(f"look up experiment {name!r}", self.client.get_experiment_by_name, name)
                if experiment is None:
                    if not _is_busy(exc):
                        raise self.failure(f"create experiment {name!r}", exc) from exc
                    experiment_id = self.call(f"create experiment {name!r}", self.client.create_experiment,
                                              name, artifact_location=artifact_location)
                else:
                    experiment_id = experiment.experiment_id
            else:
                self._keep_relative(experiment_id, artifact_location)
            experiment = self.call(f"read experiment {name!r}", self.client.get_experiment, experiment_id)
        if experiment.lifecycle_stage == LifecycleStage.DELETED:
            raise TrackingError(
                f"experiment {name!r} at {self.uri} is deleted; restore it (mlflow experiments restore "
                f"--experiment-id {experiment.experiment_id}) or remove it for good (mlflow gc), then re-run "
                f"the track rule. Results in {self.results_dir} are untouched."
            )
        if experiment.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING_KIND:
            self.call(f"mark experiment {name!r} as model training", self.client.set_experiment_tag,
                      experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
        view = runs_view_state()
        if experiment.tags.get(RUNS_VIEW_TAG) != view:
            self.call(f"set the runs view of experiment {name!r}", self.client.set_experiment_tag,
                      experiment.experiment_id, RUNS_VIEW_TAG, view)
        return experiment.experiment_id

    def _keep_relative(self, experiment_id: str, artifact_location: str | None) -> None:
        """Store a relative artifact location as given.

        MLflow makes every local artifact location absolute when it creates an experiment, which ties
        the store to the checkout's path. Its runs take their artifact URI from the experiment's
        location when they are created, so the experiment's row is set back to the relative path
        before any run exists; MLflow then resolves it against the current directory.
        """
        db_path = _sqlite_path(self.uri)
        if not artifact_location or "://" in artifact_location or db_path is None:
            return

        def update() -> None:
            with contextlib.closing(sqlite3.connect(os.path.expanduser(db_path), timeout=20)) as connection:
                with connection:
                    connection.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?",
                                       (artifact_location, int(experiment_id)))

        self.call("keep the experiment's artifact location relative", update)
