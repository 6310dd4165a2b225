"""The leaderboard: one row per (dataset, model, stage) from every ``metrics.json`` present.

Where a reported number exists for the same dataset, model, stage and evaluation split
(``config/reported.yaml``), it is placed beside ours in columns of its own, never mixed into ours.

Every figure of ours comes with its 95% bootstrap interval (``*_ci_low``, ``*_ci_high``). Within each
dataset, split and stage, the row with the best mean recall is compared with every other row on the
same queries (paired sign-flip permutation test, :mod:`vlretrieval.retrieval.compare`): ``vs_best_p``
is the p-value of the difference in mean recall, empty for the best row itself and for rows that
cannot be paired with it.
"""

from __future__ import annotations

import html
import json
import logging
import os
import textwrap
from pathlib import Path
from typing import Any, Iterable

import yaml

from ..config import is_sweep_member
from ..errors import DataError, VLRetrievalError
from ..io import atomic_open
from ..retrieval.compare import compare_stages, load_stage
from ..retrieval.intervals import OVERALL

DIRECTIONS = (("t2i", "text_to_image"), ("i2t", "image_to_text"))
KS = (1, 5, 10)
OUR_COLUMNS = [f"{short}_r{k}" for short, _ in DIRECTIONS for k in KS] + ["t2i_mean_recall", "i2t_mean_recall", "mean_recall"]
INTERVAL_COLUMNS = [f"{column}_ci_{end}" for column in OUR_COLUMNS for end in ("low", "high")]
REPORTED_COLUMNS = ["reported_t2i_r1", "reported_i2t_r1", "reported_mean_recall", "reported_source"]
COLUMNS = ["dataset", "model", "stage", "split", "num_texts", "num_images", *OUR_COLUMNS, *INTERVAL_COLUMNS,
           "vs_best_p", *REPORTED_COLUMNS]
SIGNIFICANCE = 0.05

_logger = logging.getLogger(__name__)


def find_metrics(results_dir: str | os.PathLike) -> list[Path]:
    """Every ``results/{dataset}/{model}/metrics.json`` of a plain pair, sorted; sweep members have
    their own summaries (``results/sweeps/NAME/``), and one seed of many is not a row to rank."""
    return sorted(path for path in Path(results_dir).glob("*/*/metrics.json") if not is_sweep_member(path.parent.name))


def load_reported(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        entries = yaml.safe_load(handle) or []
    for index, entry in enumerate(entries):
        missing = [key for key in ("dataset", "model", "stage", "split", "source") if key not in entry]
        if missing:
            raise DataError(str(path), f"missing {missing}", record=f"entry {index}")
    return entries


def _reported_mean_recall(entry: dict) -> float | None:
    if "mean_recall" in entry:
        return float(entry["mean_recall"])
    # The overall mean recall follows from the six recalls when the source gives them all.
    values = [entry.get(direction, {}).get(f"r{k}") for _, direction in DIRECTIONS for k in KS]
    if all(v is not None for v in values):
        return sum(values) / len(values)
    return None


def _set_interval(row: dict, column: str, interval: list[float] | None) -> None:
    low, high = interval if interval is not None else (None, None)
    row[f"{column}_ci_low"], row[f"{column}_ci_high"] = low, high


def leaderboard_rows(metrics_files: Iterable[str | os.PathLike], reported: list[dict] | None = None, *,
                     resamples: int, seed: int) -> list[dict]:
    """Rows of the leaderboard; ``resamples`` and ``seed`` drive the paired tests against the best row."""
    reported = reported or []
    rows = []
    for path in metrics_files:
        with open(path, encoding="utf-8") as handle:
            metrics = json.load(handle)
        for stage, scores in metrics["stages"].items():
            row: dict[str, Any] = {
                "dataset": metrics["dataset"], "model": metrics["model"], "stage": stage, "split": metrics["split"],
                "num_texts": metrics["num_texts"], "num_images": metrics["num_images"],
                "folder": Path(path).parent / stage,
            }
            for short, direction in DIRECTIONS:
                intervals = scores[direction].get("ci95", {})
                for k in KS:
                    row[f"{short}_r{k}"] = scores[direction][f"r{k}"]
                    _set_interval(row, f"{short}_r{k}", intervals.get(f"r{k}"))
                row[f"{short}_mean_recall"] = scores[direction]["mean_recall"]
                _set_interval(row, f"{short}_mean_recall", intervals.get("mean_recall"))
            row["mean_recall"] = scores["mean_recall"]
            _set_interval(row, "mean_recall", scores.get("ci95_mean_recall"))
            row["vs_best_p"] = None
            match = next(
                (r for r in reported
                 if (r["dataset"], r["model"], r["stage"], r["split"]) == (row["dataset"], row["model"], stage, row["split"])),
                None,
            )
            row["reported_t2i_r1"] = match.get("text_to_image", {}).get("r1") if match else None
            row["reported_i2t_r1"] = match.get("image_to_text", {}).get("r1") if match else None
            row["reported_mean_recall"] = _reported_mean_recall(match) if match else None
            row["reported_source"] = match["source"] if match else None
            rows.append(row)
    rows.sort(key=lambda r: (r["dataset"], r["model"], r["stage"] != "zeroshot", r["stage"]))
    mark_best(rows, resamples=resamples, seed=seed)
    return rows


def mark_best(rows: list[dict], *, resamples: int, seed: int) -> None:
    """Set ``best`` and ``vs_best_p`` of each row: the best mean recall of its dataset, split and stage,
    and the paired p-value of each other row against it."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["split"], row["stage"]), []).append(row)
    for group in groups.values():
        best = max(group, key=lambda r: r["mean_recall"])
        for row in group:
            row["best"] = row is best
        others = [row for row in group if row is not best]
        if not others:
            continue
        try:
            best_stage = load_stage(best["folder"])
        except VLRetrievalError as exc:
            _logger.warning("no paired tests against %s/%s/%s: %s", best["dataset"], best["model"], best["stage"], exc)
            continue
        for row in others:
            try:
                report = compare_stages(load_stage(row["folder"]), best_stage, resamples=resamples, seed=seed)
            except VLRetrievalError as exc:
                _logger.warning("%s/%s/%s not tested against the best row: %s", row["dataset"], row["model"],
                                row["stage"], exc)
                continue
            row["vs_best_p"] = report["metrics"][OVERALL]["p_value"]


def write_leaderboard(rows: list[dict], csv_path: str | os.PathLike, md_path: str | os.PathLike,
                      html_path: str | os.PathLike | None = None) -> None:
    """The leaderboard as CSV (every column), and as Markdown and, when ``html_path`` is given, a
    self-contained HTML page; both show the same columns, from one table of display cells."""
    import pandas as pd

    frame = pd.DataFrame(rows, columns=COLUMNS)
    with atomic_open(csv_path) as handle:
        frame.to_csv(handle, index=False, float_format="%.4f")
    header, cells = display_table(frame, [bool(row.get("best")) for row in rows])
    with atomic_open(md_path) as handle:
        handle.write(_markdown(header, cells))
    if html_path is not None:
        with atomic_open(html_path) as handle:
            handle.write(_html(header, cells))


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "–"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _with_interval(record: dict, column: str) -> str:
    low, high = record[f"{column}_ci_low"], record[f"{column}_ci_high"]
    if _fmt(low) == "–" or _fmt(high) == "–":
        return _fmt(record[column])
    return f"{_fmt(record[column])} [{low:.1f}, {high:.1f}]"


def _vs_best(record: dict, best: bool) -> str:
    if best:
        return "best"
    p_value = record["vs_best_p"]
    if _fmt(p_value) == "–":
        return "–"
    return f"{p_value:.3f}" + (" *" if p_value < SIGNIFICANCE else "")


SHOWN_COLUMNS = ["dataset", "model", "stage", "split", "t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10"]
DISPLAY_HEADER = ["dataset", "model", "stage", "split", "T2I R@1", "T2I R@5", "T2I R@10", "I2T R@1", "I2T R@5",
                  "I2T R@10", "mean recall [95% CI]", "p vs best", "reported mean recall", "reported by"]
TITLE = "Leaderboard"
EXPLANATION = (
    "Recall in percent on each dataset's evaluation split; brackets hold the 95% bootstrap interval over "
    "queries. \"p vs best\" compares the row's mean recall with the best row of the same dataset, split and "
    f"stage on the same queries (paired sign-flip permutation test); * marks p < {SIGNIFICANCE}. Reported "
    "numbers come from the papers and model zoos for the same dataset, model, stage and split "
    "(config/reported.yaml); they are not ours."
)


def display_table(frame, best: list[bool]) -> tuple[list[str], list[list[str]]]:
    """The header and the rows of display cells that the Markdown and HTML leaderboards both show."""
    rows = []
    for record, is_best in zip(frame.to_dict("records"), best):
        cells = [_fmt(record[c]) for c in SHOWN_COLUMNS]
        cells += [_with_interval(record, "mean_recall"), _vs_best(record, is_best),
                  _fmt(record["reported_mean_recall"]), _fmt(record["reported_source"])]
        rows.append(cells)
    if not rows:
        rows.append(["–"] * len(DISPLAY_HEADER))
    return list(DISPLAY_HEADER), rows


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = [f"# {TITLE}", "", *textwrap.wrap(EXPLANATION, width=104), "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n"


# Inline, so the page shows the same inside the Snakemake report's frame, in a browser and offline.
_HTML_STYLE = """
body { font-family: system-ui, sans-serif; font-size: 13px; margin: 12px; color: #222; }
p { max-width: 70em; }
table { border-collapse: collapse; }
th, td { padding: 3px 6px; border-bottom: 1px solid #ddd; white-space: nowrap; }
th { background: #f3f3f3; text-align: left; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
tr.best td { font-weight: 600; }
"""


def _html(header: list[str], rows: list[list[str]]) -> str:
    numeric = [name not in ("dataset", "model", "stage", "split", "reported by") for name in header]
    head = "".join(f"<th>{html.escape(name)}</th>" for name in header)
    body = []
    for cells in rows:
        best = " class=\"best\"" if cells[header.index("p vs best")] == "best" else ""
        tds = "".join(f"<td class=\"number\">{html.escape(cell)}</td>" if is_number else f"<td>{html.escape(cell)}</td>"
                      for cell, is_number in zip(cells, numeric))
        body.append(f"<tr{best}>{tds}</tr>")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{TITLE}</title>\n<style>{_HTML_STYLE}</style>\n</head>\n<body>\n"
        f"<h1>{TITLE}</h1>\n<p>{html.escape(EXPLANATION)}</p>\n"
        f"<table id=\"leaderboard\">\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(body)
        + "\n</tbody>\n</table>\n</body>\n</html>\n"
    )
