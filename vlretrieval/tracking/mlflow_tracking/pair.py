"""Track one (dataset, model) pair: a parent run with the pair's headline figures and shared config, a
training run with the settings the trainer resolved, and one evaluation run per evaluated stage."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

from ...errors import DataError
from .records import (
    FINETUNE_STAGE,
    METRICS_FILE,
    PAIR_STAGE,
    JobSpan,
    check_filter_value,
    enclosing_span,
    flatten_params,
    headline_metrics,
    read_benchmark_span,
    read_evaluation_facts,
    read_stage_metrics,
    read_training,
    split_identity,
    stage_prediction_files,
    workflow_artifacts,
)
from .runs import _PairTracker
from .system import read_system_samples, system_metrics_path
from .store import MODEL_TRAINING_VIEW_QUERY, RUNS_VIEW_KEY, TrackingError, _environment, _is_http, _Store, work_environment

_logger = logging.getLogger(__name__)

TRAIN_LOG_ARTIFACT = "train_log.jsonl"
FIGURES_ARTIFACT_DIR = "figures"
# How a stage reads in a run name; training and evaluation are told apart by a word of their own.
_STAGE_LABELS = {"zeroshot": "zero-shot", "finetuned": "fine-tuned"}


def pair_run_name(dataset: str, model: str) -> str:
    return f"{dataset} / {model}"


def training_run_name(model: str) -> str:
    return f"{model} · train"


def evaluation_run_name(model: str, stage: str) -> str:
    return f"{model} · eval {_STAGE_LABELS.get(stage, stage)}"


def experiment_link(tracking_uri: str, experiment_id: str) -> str:
    """Where the experiment opens in the model-training view of ``mlflow ui`` (or the server), its runs
    table showing the headline metrics (the view stored under :data:`~.store.RUNS_VIEW_KEY`)."""
    base = tracking_uri.rstrip("/") if _is_http(tracking_uri) else "http://127.0.0.1:5000"
    return f"{base}/#/experiments/{experiment_id}/runs?{MODEL_TRAINING_VIEW_QUERY}&viewStateShareKey={RUNS_VIEW_KEY}"


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
    split_dir: Path | None = None,
    stage_benchmarks: Mapping[str, Sequence[Path]] | None = None,
    figures: Sequence[Path] = (),
    finetuned_model: Path | None = None,
    model_max_len: int | None = None,
    registered_model: str | None = None,
    extra_tags: Mapping[str, str] | None = None,
    retries: int = 8,
) -> dict:
    """Create or update the MLflow runs of one (dataset, model) pair; see the package docstring.

    ``params`` (the pair's effective config) go on the parent run only. ``split_dir`` is the serialized
    evaluation split, logged as the evaluation runs' dataset input. ``stage_benchmarks`` maps each
    evaluated stage to the Snakemake benchmark files of its jobs (extraction and ranking, or
    re-ranking), which give the evaluation run its start and end; the training run takes its own
    from ``train_log``, and the system metrics sampled during training from the
    ``system_metrics.jsonl`` beside it, when there is one (:mod:`.system`). ``figures`` are attached
    to the parent under ``figures/``. ``finetuned_model``, a saved dual encoder, is logged as the
    training run's pyfunc model (:mod:`.model`; texts truncated to ``model_max_len``, default the
    model's own) and registered as ``registered_model`` when that is given. ``extra_tags`` go on every run of the pair without being part of
    its identity (a sweep member's ``sweep``, ``sweep_configuration``, ``seed`` and ``base_model``).

    Returns ``{"experiment_id", "parent_run_id", "runs": {stage: run_id}, "model_uri", "missing_artifacts"}``
    (``model_uri`` is None when no model is logged),
    where ``missing_artifacts`` lists entries of ``artifact_files`` and ``figures`` that did not exist
    (they are skipped with a warning: workflow logs are supporting material, the results are not).
    Raises :class:`TrackingError` when the store cannot be reached or refuses an update, and
    :class:`~vlretrieval.errors.DataError` when an input file is missing or malformed; either way the
    results directory is left as it was.
    """
    results_dir = Path(results_dir)
    if not experiment:
        raise TrackingError("the MLflow experiment name is empty")
    base_tags = {
        "dataset": check_filter_value("dataset", dataset),
        "model": check_filter_value("model", model),
        "config_hash": check_filter_value("config_hash", config_hash),
        "git_commit": str(git_commit or ""),
        "dataset_checksum": str(dataset_checksum or ""),
    }
    for key, value in (extra_tags or {}).items():
        if key in base_tags or key == "stage":
            raise TrackingError(f"extra tag {key!r} would replace a tag that identifies the pair's runs")
        base_tags[check_filter_value(f"tag {key}", key)] = check_filter_value(f"tag {key}", str(value))

    # Everything is read and checked first, so a bad input never leaves half-updated runs behind.
    metrics_path = results_dir / METRICS_FILE
    stage_metrics = read_stage_metrics(metrics_path, dataset=dataset, model=model)
    evaluation = read_evaluation_facts(metrics_path)
    facts = flatten_params(evaluation)
    stage_files = {stage: stage_prediction_files(results_dir, stage) for stage in stage_metrics}
    stage_spans = {stage: read_benchmark_span((stage_benchmarks or {}).get(stage, ())) for stage in stage_metrics}
    training = read_training(Path(train_log)) if train_log is not None else None
    samples_path = system_metrics_path(Path(train_log)) if train_log is not None else None
    system_samples = read_system_samples(samples_path) if samples_path is not None and samples_path.is_file() else []
    training_span = None
    if training is not None and training.started_ms is not None and training.ended_ms is not None:
        training_span = JobSpan(training.started_ms, training.ended_ms)
    if validation_report is not None and not Path(validation_report).is_file():
        raise DataError(str(validation_report), "validation report not found")
    split = None
    if split_dir is not None:
        split = split_identity(Path(split_dir), dataset=dataset, split=str(evaluation.get("split", Path(split_dir).name)))
    workflow_files, missing = workflow_artifacts([Path(p) for p in artifact_files])
    figure_files = [Path(p) for p in figures if Path(p).is_file()]
    missing += [str(p) for p in figures if not Path(p).is_file()]
    for item in missing:
        _logger.warning("%s: not found; it is not attached to the %s/%s run", item, dataset, model)
    pair_params = flatten_params(params or {})
    training_params = flatten_params(training.settings) if training is not None else {}
    pair_span = enclosing_span([training_span, *stage_spans.values()])
    if finetuned_model is not None:
        # Only a pair with a model to log pays for loading MLflow's pyfunc and the model code.
        from .model import check_dual_encoder_dir, log_dual_encoder

        if training is None:
            raise TrackingError(f"{finetuned_model}: a fine-tuned model is logged with its training run, "
                                f"and no training log was given")
        check_dual_encoder_dir(Path(finetuned_model))

    with _environment(work_environment(tracking_uri), keep_user_values=True):
        store = _Store(tracking_uri, retries=retries, results_dir=results_dir)
        store.probe()
        experiment_id = store.experiment_id(experiment)
        tracker = _PairTracker(store, experiment_id, base_tags=base_tags)
        try:
            parent = tracker.run(PAIR_STAGE, None, name=pair_run_name(dataset, model), span=pair_span)
            parent_id = parent.info.run_id
            tracker.sync_tags_and_params(parent, PAIR_STAGE, pair_params)
            tracker.log_changed_values(parent, PAIR_STAGE, headline_metrics(stage_metrics),
                                       at_ms=pair_span.end_ms if pair_span else None)
            tracker.log_file(parent, metrics_path)
            if validation_report is not None:
                tracker.log_file(parent, Path(validation_report))
            for path, artifact_dir in workflow_files:
                tracker.log_file(parent, path, artifact_dir)
            for path in figure_files:
                tracker.log_file(parent, path, FIGURES_ARTIFACT_DIR)

            runs: dict[str, str] = {}
            model_uri = None
            if training is not None:
                run = tracker.run(FINETUNE_STAGE, parent_id, name=training_run_name(model), span=training_span)
                tracker.sync_tags_and_params(run, FINETUNE_STAGE, training_params)
                added = tracker.log_missing_steps(run, training)
                tracker.log_system_samples(run, system_samples)
                tracker.log_changed_values(run, FINETUNE_STAGE, training.summary,
                                           at_ms=training_span.end_ms if training_span else None)
                tracker.log_file(run, Path(train_log), name=TRAIN_LOG_ARTIFACT)
                if finetuned_model is not None:
                    model_uri = store.call("log the fine-tuned model", log_dual_encoder, store.client,
                                           run.info.run_id, Path(finetuned_model), max_len=model_max_len,
                                           registered_name=registered_model)
                _logger.info("%s/%s finetune run %s: %d new metric points", dataset, model, run.info.run_id, added)
                tracker.finish(run.info.run_id, training_span)
                runs[FINETUNE_STAGE] = run.info.run_id
            for stage, values in stage_metrics.items():
                span = stage_spans[stage]
                run = tracker.run(stage, parent_id, name=evaluation_run_name(model, stage), span=span)
                tracker.sync_tags_and_params(run, stage, facts)
                tracker.log_changed_values(run, stage, values, at_ms=span.end_ms if span else None)
                if split is not None:
                    tracker.log_split(run, split)
                tracker.log_file(run, metrics_path)
                for path in stage_files[stage]:
                    tracker.log_file(run, path)
                tracker.finish(run.info.run_id, span)
                runs[stage] = run.info.run_id
            tracker.finish(parent_id, pair_span)
        except Exception:
            tracker.mark_failed()
            raise
    _logger.info("tracked %s/%s in experiment %r: run %s, stages %s; open %s", dataset, model, experiment,
                 parent_id, ", ".join(runs), experiment_link(tracking_uri, experiment_id))
    return {"experiment_id": experiment_id, "parent_run_id": parent_id, "runs": runs, "model_uri": model_uri,
            "missing_artifacts": missing}


__all__ = ["evaluation_run_name", "experiment_link", "pair_run_name", "track_pair", "training_run_name"]
