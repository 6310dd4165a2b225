"""Record a (dataset, model) pair's results in MLflow: one parent run, one nested run per job group.

Layout of what :func:`track_pair` writes into an experiment (run names in quotes)::

    "demo_cn / ernie_vil"           stage=pair       the pair's config as params; zeroshot_mean_recall,
    │                                                finetuned_mean_recall, mean_recall_gain; metrics.json,
    │                                                validation report, figures/, workflow/ (benchmarks,
    │                                                logs)
    ├── "ernie_vil · train"         stage=finetune   the settings the trainer resolved (seed, scheduler,
    │                                                clipping, world_size, global_batch_size, ...) as
    │                                                params; train_loss / learning_rate / logit_scale per
    │                                                step (train_loss_<part> for a loss of parts),
    │                                                throughput, train_log.jsonl
    ├── "ernie_vil · eval zero-shot"  stage=zeroshot split, num_texts, num_images, k as params; recall
    │                                                metrics (with <name>_ci_low / <name>_ci_high); the
    │                                                evaluation split as dataset input; predictions
    └── "ernie_vil · eval fine-tuned" stage=finetuned (same as zeroshot)

Each run starts and ends when its jobs did: the training run at the first start record and the end
record of ``train_log.jsonl``, an evaluation run over its extraction and ranking (or re-ranking) jobs
as their Snakemake benchmark files time them, the parent over all of them. Recall figures are logged
rounded to :data:`~.records.METRIC_DECIMALS` decimals, as the leaderboard's CSV shows them.

The experiment is tagged as a model-training experiment (``mlflow.experimentKind``); with a SQLite
store its artifacts go to ``mlartifacts/`` beside the database, recorded as a path relative to the
workflow's directory, so a moved checkout still opens them (:func:`~.store.sqlite_artifact_location`).

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

Modules: :mod:`.store` (URI, experiment, retries), :mod:`.records` (reading what the jobs wrote),
:mod:`.runs` (finding runs and logging into them), :mod:`.pair` (the pair's runs).
"""

from .pair import evaluation_run_name, experiment_link, pair_run_name, track_pair, training_run_name
from .records import (
    EVAL_INTERVAL_KEYS,
    EVAL_METRIC_KEYS,
    FINETUNE_STAGE,
    MAX_PARAM_VALUE_LENGTH,
    METRIC_DECIMALS,
    PAIR_STAGE,
    JobSpan,
    TrainingRecord,
    check_filter_value,
    enclosing_span,
    flatten_params,
    headline_metrics,
    read_benchmark_span,
    read_stage_metrics,
    read_training,
    rounded,
    split_identity,
)
from .runs import IDENTITY_TAGS, RUN_TAGS, _PairTracker
from .store import (
    DEFAULT_TRACKING_URI,
    EXPERIMENT_KIND_TAG,
    MODEL_TRAINING_KIND,
    RUNS_VIEW_KEY,
    RUNS_VIEW_TAG,
    TrackingError,
    _environment,
    _Store,
    resolve_tracking_uri,
    sqlite_artifact_location,
    work_environment,
)

__all__ = [
    "DEFAULT_TRACKING_URI", "EVAL_INTERVAL_KEYS", "EVAL_METRIC_KEYS", "EXPERIMENT_KIND_TAG", "FINETUNE_STAGE",
    "IDENTITY_TAGS", "MAX_PARAM_VALUE_LENGTH", "METRIC_DECIMALS", "MODEL_TRAINING_KIND", "PAIR_STAGE", "RUN_TAGS",
    "RUNS_VIEW_KEY", "RUNS_VIEW_TAG",
    "JobSpan", "TrackingError", "TrainingRecord", "_PairTracker", "_Store", "_environment", "check_filter_value", "enclosing_span",
    "evaluation_run_name", "experiment_link", "flatten_params", "headline_metrics", "pair_run_name",
    "read_benchmark_span", "read_stage_metrics", "read_training", "resolve_tracking_uri", "rounded",
    "split_identity", "sqlite_artifact_location", "track_pair", "training_run_name", "work_environment",
]
