"""The leaderboard: one row per (dataset, model, stage) from every ``metrics.json`` present.

Where a reported number exists for the same dataset, model, stage and evaluation split
(``config/reported.yaml``), it is placed beside ours in columns of its own, never mixed into ours.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

import yaml

from ..errors import DataError
from ..io import atomic_open

DIRECTIONS = (("t2i", "text_to_image"), ("i2t", "image_to_text"))
KS = (1, 5, 10)
OUR_COLUMNS = [f"{short}_r{k}" for short, _ in DIRECTIONS for k in KS] + ["t2i_mean_recall", "i2t_mean_recall", "mean_recall"]
REPORTED_COLUMNS = ["reported_t2i_r1", "reported_i2t_r1", "reported_mean_recall", "reported_source"]
COLUMNS = ["dataset", "model", "stage", "split", "num_texts", "num_images", *OUR_COLUMNS, *REPORTED_COLUMNS]


def find_metrics(results_dir: str | os.PathLike) -> list[Path]:
    """Every ``results/{dataset}/{model}/metrics.json``, sorted."""
    return sorted(Path(results_dir).glob("*/*/metrics.json"))


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


def leaderboard_rows(metrics_files: Iterable[str | os.PathLike], reported: list[dict] | None = None) -> list[dict]:
    reported = reported or []
    rows = []
    for path in metrics_files:
        with open(path, encoding="utf-8") as handle:
            metrics = json.load(handle)
        for stage, scores in metrics["stages"].items():
            row: dict[str, Any] = {
                "dataset": metrics["dataset"], "model": metrics["model"], "stage": stage, "split": metrics["split"],
                "num_texts": metrics["num_texts"], "num_images": metrics["num_images"],
            }
            for short, direction in DIRECTIONS:
                for k in KS:
                    row[f"{short}_r{k}"] = scores[direction][f"r{k}"]
                row[f"{short}_mean_recall"] = scores[direction]["mean_recall"]
            row["mean_recall"] = scores["mean_recall"]
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
    return rows


def write_leaderboard(rows: list[dict], csv_path: str | os.PathLike, md_path: str | os.PathLike) -> None:
    import pandas as pd

    frame = pd.DataFrame(rows, columns=COLUMNS)
    with atomic_open(csv_path) as handle:
        frame.to_csv(handle, index=False, float_format="%.4f")
    with atomic_open(md_path) as handle:
        handle.write(_markdown(frame))


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "–"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _markdown(frame) -> str:
    shown = ["dataset", "model", "stage", "split", "t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10",
             "mean_recall", "reported_mean_recall", "reported_source"]
    header = ["dataset", "model", "stage", "split", "T2I R@1", "T2I R@5", "T2I R@10", "I2T R@1", "I2T R@5",
              "I2T R@10", "mean recall", "reported mean recall", "reported by"]
    lines = [
        "# Leaderboard",
        "",
        "Recall in percent on each dataset's evaluation split. Reported numbers come from the papers and",
        "model zoos for the same dataset, model, stage and split (config/reported.yaml); they are not ours.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for record in frame[shown].to_dict("records"):
        lines.append("| " + " | ".join(_fmt(record[c]) for c in shown) + " |")
    if frame.empty:
        lines.append("| " + " | ".join(["–"] * len(header)) + " |")
    return "\n".join(lines) + "\n"
