"""What the jobs of a pair recorded, read and checked before anything is sent to MLflow: the config as
params, metrics.json, train_log.jsonl, the jobs' times and the evaluation split's identity."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ...errors import DataError
from ...retrieval.evaluate import I2T_FILE, METRICS_FILE, T2I_FILE
from .store import TrackingError

_logger = logging.getLogger(__name__)

WORKFLOW_ARTIFACT_DIR = "workflow"
PAIR_STAGE = "pair"
FINETUNE_STAGE = "finetune"

# MLflow's limits (mlflow.utils.validation); a batch holds at most 1000 entities in all.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_KEY_LENGTH = 250
# A dataset digest is at most 36 characters in MLflow; 32 hex digits of a sha256 fit.
DATASET_DIGEST_HEX_DIGITS = 32
_TRUNCATION_MARK = "...[truncated]"

# Recall figures are logged with the decimals of the leaderboard's CSV, so a run shows 32.8, not the
# 32.800000000000004 that percentages of counts can give in metrics.json.
METRIC_DECIMALS = 4

# metrics.json direction blocks and the metric-name prefix each one gets in MLflow.
_DIRECTIONS = (("text_to_image", "t2i"), ("image_to_text", "i2t"))
_RECALL_KEYS = ("r1", "r5", "r10", "mean_recall")
EVAL_METRIC_KEYS = tuple(f"{p}_{k}" for _, p in _DIRECTIONS for k in _RECALL_KEYS) + ("mean_recall",)
# Ends of each figure's 95% interval (metrics.json "ci95"), logged when the scorer recorded them.
EVAL_INTERVAL_KEYS = tuple(f"{key}_ci_{end}" for key in EVAL_METRIC_KEYS for end in ("low", "high"))
# What metrics.json says about the evaluation itself; the evaluation runs' params.
EVALUATION_FACTS = ("split", "num_texts", "num_images", "k")

# Per-step curves of the finetune run: metric name -> field of a train record.
_STEP_METRICS = (("train_loss", "loss"), ("learning_rate", "lr"), ("logit_scale", "logit_scale"))
# Start records hold the resolved run facts; "hparams" holds the recipe the trainer used.
_RUN_START_EVENTS = ("start", "resume")
_RUN_FACT_SKIP = ("event", "step", "time", "checkpoint", "hparams")


def rounded(value: float) -> float:
    return round(value, METRIC_DECIMALS) if math.isfinite(value) else value


# --------------------------------------------------------------------------------------------------
# Params
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


# --------------------------------------------------------------------------------------------------
# metrics.json
# --------------------------------------------------------------------------------------------------


def _number(value: Any, where: str, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(where, f"{what} must be a number, found {value!r}")
    return float(value)


def _interval(value: Any, where: str, what: str, name: str) -> dict[str, float]:
    if not isinstance(value, list) or len(value) != 2:
        raise DataError(where, f"{what} must be a [low, high] pair, found {value!r}")
    low, high = _number(value[0], where, what), _number(value[1], where, what)
    if low > high:
        raise DataError(where, f"{what} has its low end {low} above its high end {high}")
    return {f"{name}_ci_low": low, f"{name}_ci_high": high}


def _read_metrics_document(metrics_path: Path, *, dataset: str, model: str, require_identity: bool) -> dict:
    where = str(metrics_path)
    try:
        with open(metrics_path, "r", encoding="utf-8") as handle:
            document = json.load(handle)
    except FileNotFoundError:
        raise DataError(where, "metrics file not found; the score rule writes it before tracking") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}:{exc.lineno}", f"invalid JSON: {exc.msg}") from None
    if not isinstance(document, dict) or not isinstance(document.get("stages"), dict):
        raise DataError(where, 'expected an object with a "stages" object')
    for key, expected in (("dataset", dataset), ("model", model)):
        if (require_identity or key in document) and document.get(key) != expected:
            raise DataError(where, f"{key} is {document.get(key)!r} but the pair being read is {dataset}/{model}")
    return document


def read_stage_metrics(metrics_path: Path, *, dataset: str, model: str,
                       require_identity: bool = False) -> dict[str, dict[str, float]]:
    """``{stage: {t2i_r1: ..., mean_recall: ...}}`` from a pair's ``metrics.json``, values unrounded, with
    ``t2i_r1_ci_low``, ``t2i_r1_ci_high``, ... ``mean_recall_ci_high`` where it records intervals.

    With ``require_identity`` the file must name the dataset and model (a sweep member's must);
    otherwise names it leaves out are not checked."""
    where = str(metrics_path)
    document = _read_metrics_document(metrics_path, dataset=dataset, model=model, require_identity=require_identity)
    stages: dict[str, dict[str, float]] = {}
    for stage, block in document["stages"].items():
        stage_where = f"{where} (stage={stage})"
        if stage in (PAIR_STAGE, FINETUNE_STAGE):
            raise DataError(where, f"stage name {stage!r} is reserved for the {stage} run", record=f"stage={stage}")
        if not isinstance(block, dict):
            raise DataError(where, "expected an object of recall blocks", record=f"stage={stage}")
        values: dict[str, float] = {}
        for direction, prefix in _DIRECTIONS:
            recall = block.get(direction)
            if not isinstance(recall, dict):
                raise DataError(where, f'missing the "{direction}" block', record=f"stage={stage}")
            intervals = recall.get("ci95", {})
            if not isinstance(intervals, dict):
                raise DataError(stage_where, f'"{direction}.ci95" must map a figure to [low, high]')
            for key in _RECALL_KEYS:
                if key not in recall:
                    raise DataError(where, f'"{direction}" has no "{key}"', record=f"stage={stage}")
                values[f"{prefix}_{key}"] = _number(recall[key], stage_where, f"{direction}.{key}")
                if "ci95" in recall:
                    values.update(_interval(intervals.get(key), stage_where, f"{direction}.ci95.{key}",
                                            f"{prefix}_{key}"))
        if "mean_recall" not in block:
            raise DataError(where, 'missing "mean_recall"', record=f"stage={stage}")
        values["mean_recall"] = _number(block["mean_recall"], stage_where, "mean_recall")
        if "ci95_mean_recall" in block:
            values.update(_interval(block["ci95_mean_recall"], stage_where, "ci95_mean_recall", "mean_recall"))
        stages[str(stage)] = values
    return stages


def read_evaluation_facts(metrics_path: Path) -> dict[str, Any]:
    """The split and its size as metrics.json records them (already checked by read_stage_metrics)."""
    document = json.loads(Path(metrics_path).read_text(encoding="utf-8"))
    return {key: document[key] for key in EVALUATION_FACTS if key in document}


def headline_metrics(stage_metrics: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """The pair's figures for its parent run: each stage's mean recall (``zeroshot_mean_recall``,
    ``finetuned_mean_recall``) and ``mean_recall_gain``, fine-tuned minus zero-shot."""
    headline = {f"{stage}_mean_recall": values["mean_recall"] for stage, values in stage_metrics.items()}
    if "zeroshot" in stage_metrics and "finetuned" in stage_metrics:
        headline["mean_recall_gain"] = stage_metrics["finetuned"]["mean_recall"] - stage_metrics["zeroshot"]["mean_recall"]
    return headline


# --------------------------------------------------------------------------------------------------
# train_log.jsonl
# --------------------------------------------------------------------------------------------------


@dataclass
class TrainingRecord:
    """What the finetune run shows: one point per logged step, the run's throughput, the resolved
    settings the trainer ran with, and when it started and ended (unix milliseconds)."""

    steps: dict[int, dict[str, tuple[float, int]]] = field(default_factory=dict)  # step -> name -> (value, ms)
    summary: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    started_ms: int | None = None
    ended_ms: int | None = None


def _millis(stamp: Any) -> int | None:
    if isinstance(stamp, (int, float)) and not isinstance(stamp, bool) and math.isfinite(stamp):
        return int(round(float(stamp) * 1000))
    return None


def read_training(train_log: Path) -> TrainingRecord:
    """Parse ``train_log.jsonl``; a record that cannot be read is an error naming its line."""
    from ...training.checkpoints import iter_train_log

    where = str(train_log)
    record = TrainingRecord()
    speeds: list[float] = []
    end: dict[str, Any] | None = None
    duplicates = 0
    try:
        entries = list(iter_train_log(train_log, strict=True))
    except FileNotFoundError:
        raise DataError(where, "training log not found; the finetune rule writes it") from None
    for line_where, obj in entries:
        event = obj.get("event")
        millis = _millis(obj.get("time"))
        if event in _RUN_START_EVENTS:
            # The first start is when training began; a resume's facts are the ones it finished with.
            if record.started_ms is None:
                record.started_ms = millis
            hparams = obj.get("hparams", {})
            if not isinstance(hparams, dict):
                raise DataError(line_where, f"hparams must be an object, found {hparams!r}")
            facts = {key: value for key, value in obj.items() if key not in _RUN_FACT_SKIP}
            # A fact the trainer resolved (max_steps from the epochs) wins over the recipe's request.
            record.settings = {**hparams, **facts}
            continue
        if event == "end":
            end = obj
            record.ended_ms = millis
            continue
        if event != "train":
            continue
        if isinstance(obj.get("step"), bool) or not isinstance(obj.get("step"), int):
            raise DataError(line_where, f"train record needs an integer step, found {obj.get('step')!r}")
        step = obj["step"]
        point: dict[str, tuple[float, int]] = {}
        for name, source in _STEP_METRICS:
            value = obj.get(source)
            if value is None:
                if source == "loss":
                    raise DataError(line_where, "train record has no loss", record=f"step={step}")
                continue
            point[name] = (_number(value, line_where, source), millis or 0)
        parts = obj.get("loss_parts", {})
        if not isinstance(parts, dict):
            raise DataError(line_where, f"loss_parts must map a part to its loss, found {parts!r}", record=f"step={step}")
        for part, value in parts.items():
            point[f"train_loss_{part}"] = (_number(value, line_where, f"loss_parts.{part}"), millis or 0)
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


# --------------------------------------------------------------------------------------------------
# Job times
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobSpan:
    """When a group of jobs ran, in unix milliseconds."""

    start_ms: int
    end_ms: int


def read_benchmark_span(files: Sequence[Path]) -> JobSpan | None:
    """From the first start to the last end of the jobs whose Snakemake benchmark files are given.

    Snakemake writes a job's benchmark file when the job ends, with its wall time in seconds (``s``),
    so the file's modification time is the end and the start is that many seconds before. Files
    that do not exist are left out; None when none does.
    """
    spans = []
    for path in files:
        path = Path(path)
        if not path.is_file():
            continue
        with open(path, "r", encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
        if not rows or "s" not in rows[-1]:
            raise DataError(str(path), 'expected a Snakemake benchmark table with an "s" (seconds) column')
        try:
            seconds = float(rows[-1]["s"])
        except (TypeError, ValueError):
            raise DataError(str(path), f'"s" must be a number of seconds, found {rows[-1]["s"]!r}',
                            record=f"row {len(rows)}") from None
        end_ms = int(round(path.stat().st_mtime * 1000))
        spans.append(JobSpan(end_ms - int(round(seconds * 1000)), end_ms))
    if not spans:
        return None
    return JobSpan(min(s.start_ms for s in spans), max(s.end_ms for s in spans))


def enclosing_span(spans: Sequence[JobSpan | None]) -> JobSpan | None:
    known = [span for span in spans if span is not None]
    if not known:
        return None
    return JobSpan(min(s.start_ms for s in known), max(s.end_ms for s in known))


# --------------------------------------------------------------------------------------------------
# The evaluation split as an MLflow dataset
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitIdentity:
    """What identifies the evaluation split: a name, a digest of its gold file and validation report,
    where it lies, and its size."""

    name: str
    digest: str
    source: str
    profile: dict[str, Any]


def split_identity(split_dir: Path, *, dataset: str, split: str) -> SplitIdentity:
    """The serialized split's identity; its gold texts (``texts.jsonl``) and ``validation_report.json``
    fix what was evaluated, so their sha256 is the digest."""
    from ...data.lmdb_store import REPORT_FILE, TEXTS_FILE

    digest = hashlib.sha256()
    for name in (TEXTS_FILE, REPORT_FILE):
        path = Path(split_dir) / name
        try:
            with open(path, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(chunk)
        except FileNotFoundError:
            raise DataError(str(path), "not found; the serialize rule writes it with the split") from None
    report_path = Path(split_dir) / REPORT_FILE
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise DataError(str(report_path), f"invalid JSON: {exc}") from None
    profile = {key: value for key, value in report.items() if isinstance(value, (int, float, str))} \
        if isinstance(report, dict) else {}
    return SplitIdentity(name=f"{dataset}/{split}", digest=digest.hexdigest()[:DATASET_DIGEST_HEX_DIGITS],
                         source=os.path.relpath(split_dir) if not os.path.isabs(split_dir) else str(split_dir),
                         profile=profile)


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def stage_prediction_files(results_dir: Path, stage: str) -> list[Path]:
    files = [results_dir / stage / T2I_FILE, results_dir / stage / I2T_FILE]
    for path in files:
        if not path.is_file():
            raise DataError(str(path), f"predictions of stage {stage!r} not found; metrics.json lists that stage")
    return files


def workflow_artifacts(files: Sequence[Path]) -> tuple[list[tuple[Path, str]], list[str]]:
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


def check_filter_value(name: str, value: str) -> str:
    # Values are matched inside quoted MLflow search filters; a quote would change the filter.
    if not isinstance(value, str) or not value:
        raise TrackingError(f"{name} must be a non-empty string, found {value!r}")
    if "'" in value or '"' in value or "\\" in value:
        raise TrackingError(f"{name} {value!r} contains a quote or backslash, which MLflow run search cannot match")
    return value


__all__ = [
    "EVAL_INTERVAL_KEYS", "EVAL_METRIC_KEYS", "FINETUNE_STAGE", "JobSpan", "METRICS_FILE", "PAIR_STAGE",
    "SplitIdentity", "TrainingRecord", "check_filter_value", "enclosing_span", "flatten_params",
    "headline_metrics", "read_benchmark_span", "read_evaluation_facts", "read_stage_metrics", "read_training",
    "rounded", "split_identity", "stage_prediction_files", "workflow_artifacts",
]
