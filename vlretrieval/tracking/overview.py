"""What a finished run prints last: the leaderboard in short and where to look next."""

from __future__ import annotations

import csv
import json
import os
import shlex
import sys
from pathlib import Path

from ..errors import DataError

LEADERBOARD_CSV = "summary.csv"


def _command(tool: str) -> str:
    """``tool`` as the user can type it in their own shell, where the project's environment may not
    be on PATH: the interpreter's copy (for example ``.venv/bin/mlflow``) when there is one."""
    beside = Path(sys.executable).parent / tool
    if not beside.exists():
        return tool
    try:
        return str(beside.relative_to(Path.cwd()))
    except ValueError:
        return str(beside)


def leaderboard_lines(results_dir: str | os.PathLike) -> list[str]:
    """One line per evaluated stage of ``results_dir/summary.csv``: mean recall and its interval."""
    path = Path(results_dir) / LEADERBOARD_CSV
    if not path.exists():
        raise DataError(path, f"no leaderboard yet; build it with `snakemake --cores all {path}`")
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return [f"{path}: no evaluated stage"]
    width = {key: max(len(row[key]) for row in rows) for key in ("dataset", "model", "stage")}
    lines = []
    for number, row in enumerate(rows, start=2):
        try:
            mean = float(row["mean_recall"])
            low, high = float(row["mean_recall_ci_low"]), float(row["mean_recall_ci_high"])
        except (KeyError, ValueError) as exc:
            raise DataError(f"{path}:{number}", f"mean recall or its interval is missing or not a number ({exc})") from None
        cells = "  ".join(row[key].ljust(width[key]) for key in ("dataset", "model", "stage"))
        lines.append(f"  {cells}  {mean:6.2f}  [{low:.1f}, {high:.1f}]")
    return lines


def experiment_id(work_dir: str | os.PathLike) -> str | None:
    """The MLflow experiment the track jobs wrote to, from their ``tracking.json`` records."""
    for record in sorted(Path(work_dir).glob("*/*/tracking.json")):
        try:
            found = json.loads(record.read_text(encoding="utf-8")).get("experiment_id")
        except (OSError, ValueError, AttributeError):
            continue
        if found is not None:
            return str(found)
    return None


def overview(results_dir: str | os.PathLike, tracking_uri: str, work_dir: str | os.PathLike = "work") -> str:
    """The leaderboard in short, then the commands that open the runs, the report and the figures."""
    from .mlflow_tracking.pair import experiment_link

    results = Path(results_dir)
    first = _first_pair(results)
    experiment = experiment_id(work_dir)
    link = experiment_link(tracking_uri, experiment) if experiment is not None else "http://127.0.0.1:5000"
    lines = [f"Mean recall (%) with its 95% interval over queries; the whole table: {results / 'summary.md'}",
             *leaderboard_lines(results), "", "Where to look next:",
             f"  runs      {_command('mlflow')} ui --backend-store-uri {shlex.quote(tracking_uri)}"
             f"   then open {link}",
             f"  report    {_command('snakemake')} --report report.html   (leaderboard, figures, retrievals)",
             f"  figures   {results / 'figures'}/"]
    if first is not None:
        lines.append(f"  compare   {_command('python')} -m vlretrieval compare {first / 'zeroshot'} {first / 'finetuned'}")
    return "\n".join(lines)


def _first_pair(results: Path) -> Path | None:
    """The first pair folder with both a zero-shot and a fine-tuned stage, for the compare example."""
    for metrics in sorted(results.glob("*/*/metrics.json")):
        pair = metrics.parent
        if (pair / "zeroshot").is_dir() and (pair / "finetuned").is_dir():
            return pair
    return None
