"""A sweep's results: its members side by side, their spread over seeds, and its MLflow parent run.

A sweep plan (:meth:`vlretrieval.pipeline.Pipeline.sweep_plan`) names the sweep, its settings and its
members; each member is a derived model with its own ``results/{dataset}/{member}/metrics.json``.
Members that share a pair and a grid point form a *configuration* (``demo_cn/ernie_vil``, or
``demo_cn/ernie_vil/g0`` with a grid), which the seeds repeat.

``results/sweeps/NAME/summary.csv`` has one row per member and stage (``statistic`` = ``value``, with
the 95% bootstrap intervals of metrics.json where it has them) and, per configuration and stage, one
row for each of ``mean``, ``std`` (sample standard deviation, ddof=1; empty for one seed), ``min`` and
``max`` over the seeds. ``summary.md`` shows the same for reading.

In MLflow (:func:`track_sweep`) the sweep gets one parent run, and the parent run of each member
(tracked like any pair) is nested under it::

    "sweep · {name}"                      stage=sweep   {stage}_mean_recall (mean over seeds),
    │                                                   mean_recall_gain, {stage}_mean_recall_{mean,std,
    │                                                   min,max}, summary
    ├── "{dataset} / {member}"            stage=pair    (a member's own runs, as for any pair)
    │   ├── "{member} · train"
    │   ├── "{member} · eval zero-shot"
    │   └── "{member} · eval fine-tuned"
    └── ...

The parent is found again by its tags (``sweep``, ``stage``, ``config_hash``), the hash covering the
sweep's plan and its members' runs, so re-running updates it; members carry the tags ``sweep``,
``sweep_configuration``, ``seed`` and ``base_model``, so ``tags.sweep = 'NAME' and tags.stage =
'finetuned'`` lists them for comparison.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from ..errors import DataError
from ..io import atomic_open
from ..retrieval.evaluate import METRICS_FILE
from .mlflow_tracking import (
    JobSpan,
    TrackingError,
    _environment,
    _PairTracker,
    _Store,
    check_filter_value,
    enclosing_span,
    flatten_params,
    headline_metrics,
    read_stage_metrics,
    work_environment,
)

_logger = logging.getLogger(__name__)

SUMMARY_CSV = "summary.csv"
SUMMARY_MD = "summary.md"
SWEEP_STAGE = "sweep"
SWEEP_IDENTITY_TAGS = ("sweep", "stage", "config_hash")

# metrics.json direction blocks and the column prefix each gets.
_DIRECTIONS = (("text_to_image", "t2i"), ("image_to_text", "i2t"))
_RECALLS = ("r1", "r5", "r10", "mean_recall")
FIGURES = tuple(f"{prefix}_{key}" for _, prefix in _DIRECTIONS for key in _RECALLS) + ("mean_recall",)
STATISTICS = ("mean", "std", "min", "max")
CI_COLUMNS = tuple(f"{figure}_ci95_{end}" for figure in FIGURES for end in ("lo", "hi"))
COLUMNS = ("sweep", "configuration", "dataset", "base_model", "overrides", "member", "seed", "stage",
           "statistic", "n_seeds", *FIGURES, *CI_COLUMNS)


@dataclass
class StageFigures:
    """One stage of one member: its figures, and the 95% interval of those metrics.json gives one."""

    values: dict[str, float]
    ci95: dict[str, tuple[float, float]]


# --------------------------------------------------------------------------------------------------
# Reading the members' metrics.json
# --------------------------------------------------------------------------------------------------


def read_member_metrics(metrics_path: str | Path, *, dataset: str, model: str) -> dict[str, StageFigures]:
    """``{stage: StageFigures}`` from a member's ``metrics.json``, intervals read where present; the
    file must name the member, and is checked as every tracked pair's is."""
    stages = read_stage_metrics(Path(metrics_path), dataset=dataset, model=model, require_identity=True)
    result = {}
    for stage, values in stages.items():
        figures = StageFigures({figure: values[figure] for figure in FIGURES}, {})
        for figure in FIGURES:
            if f"{figure}_ci_low" in values:
                figures.ci95[figure] = (values[f"{figure}_ci_low"], values[f"{figure}_ci_high"])
        result[stage] = figures
    return result


def load_sweep(plan: Mapping[str, Any]) -> list[tuple[dict, dict[str, StageFigures]]]:
    """Every member of the plan with its stages, in the plan's order; a missing result is an error."""
    return [
        (member, read_member_metrics(Path(member["results"]) / METRICS_FILE,
                                     dataset=member["dataset"], model=member["model"]))
        for member in plan["members"]
    ]


# --------------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------------


def spread(values: Sequence[float]) -> dict[str, float | None]:
    """Mean, sample standard deviation (None for a single value), min and max."""
    if not values:
        raise ValueError("no values to aggregate")
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "min": min(values),
        "max": max(values),
    }


def _configurations(loaded: Sequence[tuple[dict, dict[str, StageFigures]]]) -> dict[str, list]:
    grouped: dict[str, list] = {}
    for member, stages in loaded:
        grouped.setdefault(member["configuration"], []).append((member, stages))
    return grouped


def _stage_order(stages: Iterable[str]) -> list[str]:
    # Zero-shot before fine-tuned, as in the leaderboard; any other stage after them by name.
    return sorted(dict.fromkeys(stages), key=lambda stage: (stage != "zeroshot", stage != "finetuned", stage))


def aggregates(loaded: Sequence[tuple[dict, dict[str, StageFigures]]]) -> dict[str, dict[str, dict]]:
    """``{configuration: {stage: {"n_seeds": n, figure: spread}}}`` over the seeds of each configuration."""
    result: dict[str, dict[str, dict]] = {}
    for configuration, members in _configurations(loaded).items():
        per_stage: dict[str, dict] = {}
        for stage in _stage_order(stage for _, stages in members for stage in stages):
            present = [stages[stage] for _, stages in members if stage in stages]
            per_stage[stage] = {"n_seeds": len(present)}
            for figure in FIGURES:
                per_stage[stage][figure] = spread([figures.values[figure] for figures in present])
        result[configuration] = per_stage
    return result


def summary_rows(plan: Mapping[str, Any], loaded: Sequence[tuple[dict, dict[str, StageFigures]]]) -> list[dict]:
    """The rows of summary.csv: per member and stage, then per configuration, stage and statistic."""
    rows = []
    for member, stages in loaded:
        for stage in _stage_order(stages):
            row = _row(plan["name"], member, stage, "value")
            row.update({"member": member["model"], "seed": member["seed"]})
            row.update(stages[stage].values)
            for figure, (low, high) in stages[stage].ci95.items():
                row[f"{figure}_ci95_lo"], row[f"{figure}_ci95_hi"] = low, high
            rows.append(row)
    first_member = {member["configuration"]: member for member, _ in reversed(loaded)}
    for configuration, per_stage in aggregates(loaded).items():
        for stage, figures in per_stage.items():
            for statistic in STATISTICS:
                row = _row(plan["name"], first_member[configuration], stage, statistic)
                row["n_seeds"] = figures["n_seeds"]
                row.update({figure: figures[figure][statistic] for figure in FIGURES})
                rows.append(row)
    return rows


def _row(sweep: str, member: dict, stage: str, statistic: str) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update({
        "sweep": sweep, "configuration": member["configuration"], "dataset": member["dataset"],
        "base_model": member["base_model"], "overrides": json.dumps(member["overrides"], sort_keys=True),
        "stage": stage, "statistic": statistic,
    })
    return row


def sweep_metrics(loaded: Sequence[tuple[dict, dict[str, StageFigures]]]) -> dict[str, float]:
    """The sweep parent's metrics: each stage's mean recall over seeds (mean, std, min, max), named
    ``{stage}_mean_recall_{statistic}``, and the headline a pair's parent carries (``{stage}_mean_recall``
    and ``mean_recall_gain``, here means over seeds), behind ``{configuration}/`` when there is more
    than one configuration."""
    per_configuration = aggregates(loaded)
    metrics: dict[str, float] = {"members": float(len(loaded))}
    for configuration, per_stage in per_configuration.items():
        prefix = "" if len(per_configuration) == 1 else f"{configuration}/"
        for stage, figures in per_stage.items():
            for statistic, value in figures["mean_recall"].items():
                if value is not None:
                    metrics[f"{prefix}{stage}_mean_recall_{statistic}"] = value
        # The names a pair's parent run uses, so one column of the runs table reads both.
        means = {stage: {"mean_recall": figures["mean_recall"]["mean"]} for stage, figures in per_stage.items()}
        metrics.update({f"{prefix}{key}": value for key, value in headline_metrics(means).items()})
    return metrics


# --------------------------------------------------------------------------------------------------
# Writing the summary
# --------------------------------------------------------------------------------------------------


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return value


def _fmt(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


_MD_FIGURES = (("t2i_r1", "T2I R@1"), ("t2i_r5", "T2I R@5"), ("t2i_r10", "T2I R@10"), ("i2t_r1", "I2T R@1"),
               ("i2t_r5", "I2T R@5"), ("i2t_r10", "I2T R@10"), ("mean_recall", "mean recall"))


def summary_markdown(plan: Mapping[str, Any], loaded: Sequence[tuple[dict, dict[str, StageFigures]]],
                     tracking: Mapping[str, Any] | None = None) -> str:
    configurations = _configurations(loaded)
    per_configuration = aggregates(loaded)
    lines = [f"# Sweep {plan['name']}", ""]
    if plan.get("description"):
        lines += [plan["description"], ""]
    grid = ", ".join(f"{key} in {values}" for key, values in (plan.get("grid") or {}).items())
    lines += [
        f"{len(loaded)} members: {', '.join(plan['pairs'])}{f'; grid {grid}' if grid else ''}; "
        f"seeds {', '.join(str(seed) for seed in plan['seeds'])}.",
        "Recall in percent on each dataset's evaluation split; brackets hold the 95% bootstrap interval over",
        "queries where metrics.json gives one. Over seeds: mean ± sample standard deviation (ddof=1), then",
        "min–max.",
    ]
    if tracking:
        lines.append(f"MLflow: the sweep's parent run {tracking['sweep_run_id']} (experiment id "
                     f"{tracking['experiment_id']}), with each member's runs nested under it.")
    header = "| " + " | ".join(label for _, label in _MD_FIGURES) + " |"
    for configuration, members in configurations.items():
        overrides = members[0][0]["overrides"]
        title = configuration + (": " + ", ".join(f"{k}={v}" for k, v in overrides.items()) if overrides else "")
        per_stage = per_configuration[configuration]
        lines += ["", f"## {title}", "", f"Over {len(members)} seeds:", "",
                  "| stage " + header, "|---" + "|---" * len(_MD_FIGURES) + "|"]
        for stage, figures in per_stage.items():
            cells = []
            for figure, _ in _MD_FIGURES:
                s = figures[figure]
                cells.append(f"{_fmt(s['mean'])} ± {_fmt(s['std'])} ({_fmt(s['min'])}–{_fmt(s['max'])})")
            lines.append(f"| {stage} | " + " | ".join(cells) + " |")
        lines += ["", "Members:", "", "| member | seed | stage " + header,
                  "|---|---|---" + "|---" * len(_MD_FIGURES) + "|"]
        for member, stages in members:
            for stage in _stage_order(stages):
                figures = stages[stage]
                cells = []
                for figure, _ in _MD_FIGURES:
                    interval = figures.ci95.get(figure)
                    cell = _fmt(figures.values[figure])
                    cells.append(f"{cell} [{_fmt(interval[0])}, {_fmt(interval[1])}]" if interval else cell)
                lines.append(f"| {member['model']} | {member['seed']} | {stage} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_summary(plan: Mapping[str, Any], loaded: Sequence[tuple[dict, dict[str, StageFigures]]],
                  csv_path: str | Path, md_path: str | Path, tracking: Mapping[str, Any] | None = None) -> None:
    """summary.csv and summary.md of a sweep, each written atomically."""
    with atomic_open(csv_path, newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in summary_rows(plan, loaded):
            writer.writerow({key: _csv_value(value) for key, value in row.items()})
    with atomic_open(md_path) as handle:
        handle.write(summary_markdown(plan, loaded, tracking))


# --------------------------------------------------------------------------------------------------
# MLflow: the sweep's parent run
# --------------------------------------------------------------------------------------------------


def sweep_run_name(sweep: str) -> str:
    return f"sweep · {sweep}"


def _member_run_id(record: Mapping[str, Any], member: Mapping[str, Any]) -> str:
    run_id = record.get("parent_run_id") if isinstance(record, Mapping) else None
    if not isinstance(run_id, str) or not run_id:
        raise DataError(member["tracking"], "no parent_run_id; the track rule of the member writes it")
    return run_id


def track_sweep(*, tracking_uri: str, experiment: str, plan: Mapping[str, Any],
                member_records: Sequence[Mapping[str, Any]], config_hash: str, git_commit: str,
                retries: int = 8) -> dict:
    """Create or update the sweep's parent run and nest its members' pair runs under it.

    ``member_records`` are the members' tracking records (``tracking.json`` of the track rule), in the
    plan's order. Returns ``{"experiment_id", "sweep_run_id", "members": {dataset/member: run_id}}``.
    Every input is read and checked before MLflow is called, so a bad one leaves no run half-updated.
    """
    name = check_filter_value("sweep", plan["name"])
    if len(member_records) != len(plan["members"]):
        raise TrackingError(f"sweep {name}: {len(member_records)} tracking records for {len(plan['members'])} members")
    member_runs = {f"{m['dataset']}/{m['model']}": _member_run_id(r, m) for m, r in zip(plan["members"], member_records)}
    loaded = load_sweep(plan)
    metrics = sweep_metrics(loaded)
    settings = {key: plan.get(key) for key in ("description", "pairs", "seeds", "grid")}
    params = flatten_params({"sweep": settings})
    base_tags = {"sweep": name, "config_hash": check_filter_value("config_hash", config_hash),
                 "git_commit": str(git_commit or "")}

    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    with _environment(work_environment(tracking_uri), keep_user_values=True):
        store = _Store(tracking_uri, retries=retries, results_dir=Path("results"))
        store.probe()
        experiment_id = store.experiment_id(experiment)
        for member, record in zip(plan["members"], member_records):
            if str(record.get("experiment_id", experiment_id)) != str(experiment_id):
                raise TrackingError(
                    f"member {member['dataset']}/{member['model']} was tracked in experiment id "
                    f"{record.get('experiment_id')}, the sweep goes to {experiment!r} (id {experiment_id}); "
                    f"re-run the member's track rule with the same tracking settings")
        member_run_objects = {label: store.call(f"read the run {run_id} of member {label}", store.client.get_run, run_id)
                              for label, run_id in member_runs.items()}
        # The sweep ran from its first member's first job to its last member's last one.
        span = enclosing_span([JobSpan(run.info.start_time, run.info.end_time)
                               for run in member_run_objects.values() if run.info.start_time and run.info.end_time])
        tracker = _PairTracker(store, experiment_id, base_tags=base_tags, identity_tags=SWEEP_IDENTITY_TAGS)
        try:
            parent = tracker.run(SWEEP_STAGE, None, name=sweep_run_name(name), span=span)
            parent_id = parent.info.run_id
            tracker.sync_tags_and_params(parent, SWEEP_STAGE, params)
            tracker.log_changed_values(parent, SWEEP_STAGE, metrics, at_ms=span.end_ms if span else None)
            with tempfile.TemporaryDirectory(prefix="vlretrieval-sweep-") as tmp:
                write_summary(plan, loaded, Path(tmp) / SUMMARY_CSV, Path(tmp) / SUMMARY_MD)
                tracker.log_file(parent, Path(tmp) / SUMMARY_CSV)
                tracker.log_file(parent, Path(tmp) / SUMMARY_MD)
            for label, run in member_run_objects.items():
                if run.data.tags.get(MLFLOW_PARENT_RUN_ID) != parent_id:
                    store.call(f"nest member {label} under the sweep run", store.client.set_tag,
                               run.info.run_id, MLFLOW_PARENT_RUN_ID, parent_id)
            tracker.finish(parent_id, span)
        except Exception:
            tracker.mark_failed()
            raise
    _logger.info("tracked sweep %s in experiment %r: run %s with %d members", name, experiment, parent_id,
                 len(member_runs))
    return {"experiment_id": experiment_id, "sweep_run_id": parent_id, "members": member_runs}
