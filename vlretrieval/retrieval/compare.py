"""Paired comparison of two evaluated stages on the same queries: ``python -m vlretrieval compare A B``.

A and B are stage folders, ``results/{dataset}/{model}/{stage}/``, as the score step writes them: the
stage's prediction files, with ``metrics.json`` and the gold (``gold.jsonl``) one level up. Two folders
are compared only when they are on the same dataset and split, with the same gold (same texts and
the same images for each text, checked against the digest in ``metrics.json``) and galleries of the
same size; otherwise the first mismatch is named. For every figure the report gives both values, the
difference ``B - A``, its 95% paired-bootstrap interval and a two-sided sign-flip permutation p-value
(:func:`.intervals.paired_statistics`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import DataError, VLRetrievalError
from .evaluate import I2T_FILE, METRICS_FILE, T2I_FILE, gold_digest
from .intervals import FIGURES, OVERALL, paired_statistics
from .metrics import prediction_file_ranks, scores_from_direction_ranks
from .predictions import DIRECTIONS, read_gold_t2i

P_VALUE_METHOD = "two-sided sign-flip permutation test over queries, p = (1 + #{|T_perm| >= |T_obs|}) / (1 + P)"
INTERVAL_METHOD = "paired percentile bootstrap, queries resampled jointly, each direction on its own queries"


class ComparisonError(VLRetrievalError):
    """Two stage folders that cannot be compared query by query."""


@dataclass
class StageResults:
    """One evaluated stage, read back from its folder and checked against its ``metrics.json``."""

    folder: Path
    dataset: str
    model: str
    split: str
    stage: str
    num_texts: int
    num_images: int
    gold: dict[int, set[int]]
    gold_sha256: str
    ranks: dict[str, np.ndarray]
    scores: dict

    @property
    def name(self) -> str:
        return f"{self.dataset}/{self.model}/{self.stage}"


def figure_names() -> list[str]:
    """``mean_recall`` (overall), then ``text_to_image.r1`` .. ``image_to_text.mean_recall``."""
    return [OVERALL] + [f"{direction}.{name}" for direction in DIRECTIONS for name in FIGURES]


def figure_value(scores: Mapping[str, Any], figure: str) -> float:
    if figure == OVERALL:
        return scores[OVERALL]
    direction, name = figure.split(".")
    return scores[direction][name]


def load_stage(folder: str | os.PathLike) -> StageResults:
    """Read a stage folder: its predictions, the pair's ``metrics.json`` and gold, all cross-checked."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(str(folder), "not a stage folder; expected results/{dataset}/{model}/{stage}/")
    metrics_path = folder.parent / METRICS_FILE
    try:
        metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(str(metrics_path), "not found; a stage folder sits in results/{dataset}/{model}/ "
                                           "beside the pair's metrics.json") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{metrics_path}:{exc.lineno}", f"invalid JSON: {exc.msg}") from None
    stage = folder.name
    if stage not in metrics.get("stages", {}):
        raise DataError(str(metrics_path), f"no stage {stage!r} (stages: {', '.join(metrics.get('stages', {}))})")
    if "gold" not in metrics:
        raise DataError(str(metrics_path), "records no gold; score the pair again to compare its stages")
    gold_path = folder.parent / metrics["gold"]["file"]
    gold = read_gold_t2i(gold_path)
    if gold_digest(gold) != metrics["gold"]["sha256"]:
        raise DataError(str(gold_path), f"content does not match the sha256 recorded in {metrics_path}")
    ranks = prediction_file_ranks(gold, folder / T2I_FILE, folder / I2T_FILE, k=metrics["k"],
                                  allow_extra_queries=True)
    scores = scores_from_direction_ranks(ranks)
    recorded = metrics["stages"][stage]
    for figure in figure_names():
        if not math.isclose(figure_value(scores, figure), figure_value(recorded, figure), rel_tol=1e-12, abs_tol=1e-12):
            raise DataError(str(folder), f"{figure} recounted from the predictions is {figure_value(scores, figure)}, "
                                         f"but {metrics_path} says {figure_value(recorded, figure)}")
    return StageResults(folder=folder, dataset=metrics["dataset"], model=metrics["model"], split=metrics["split"],
                        stage=stage, num_texts=metrics["num_texts"], num_images=metrics["num_images"], gold=gold,
                        gold_sha256=metrics["gold"]["sha256"], ranks=ranks, scores=scores)


def first_gold_mismatch(gold_a: Mapping[int, set[int]], gold_b: Mapping[int, set[int]]) -> str | None:
    """The first difference between two golds (texts of A in order, then texts only in B), or None."""
    for text_id, images in gold_a.items():
        if text_id not in gold_b:
            return f"text {text_id} in A is not in B"
        if set(images) != set(gold_b[text_id]):
            return (f"text {text_id} has gold images {sorted(images)} in A but {sorted(gold_b[text_id])} in B")
    for text_id in gold_b:
        if text_id not in gold_a:
            return f"text {text_id} in B is not in A"
    return None


def check_comparable(a: StageResults, b: StageResults) -> None:
    """Raise :class:`ComparisonError` naming the first reason A and B are not the same queries."""
    where = f"A is {a.folder}, B is {b.folder}"
    for what in ("dataset", "split"):
        if getattr(a, what) != getattr(b, what):
            raise ComparisonError(f"different {what}s: {getattr(a, what)!r} in A, {getattr(b, what)!r} in B ({where})")
    if a.gold_sha256 != b.gold_sha256:
        mismatch = first_gold_mismatch(a.gold, b.gold) or "gold digests differ"
        raise ComparisonError(f"different gold on {a.dataset}/{a.split}: {mismatch} ({where})")
    for what, gallery in (("num_images", "images"), ("num_texts", "texts")):
        if getattr(a, what) != getattr(b, what):
            raise ComparisonError(f"different galleries: {getattr(a, what)} {gallery} in A, "
                                  f"{getattr(b, what)} in B ({where})")


def compare_stages(a: StageResults, b: StageResults, *, resamples: int, seed: int) -> dict:
    """The comparison report of two checked stages: ``{"a", "b", "method", "metrics": {figure: {"a", "b",
    "diff", "ci95", "p_value"}}}``, values in percent and differences in percentage points."""
    check_comparable(a, b)
    statistics = paired_statistics(a.ranks, b.ranks, resamples=resamples, seed=seed)
    metrics = {}
    for figure in figure_names():
        value_a, value_b = figure_value(a.scores, figure), figure_value(b.scores, figure)
        metrics[figure] = {"a": value_a, "b": value_b, "diff": value_b - value_a, **statistics[figure]}
    return {
        "a": {"folder": str(a.folder), "name": a.name},
        "b": {"folder": str(b.folder), "name": b.name},
        "dataset": a.dataset, "split": a.split,
        "queries": {direction: int(a.ranks[direction].size) for direction in DIRECTIONS},
        "method": {"interval": INTERVAL_METHOD, "p_value": P_VALUE_METHOD, "resamples": int(resamples),
                   "seed": int(seed)},
        "metrics": metrics,
    }


def compare_folders(folder_a: str | os.PathLike, folder_b: str | os.PathLike, *, resamples: int, seed: int) -> dict:
    return compare_stages(load_stage(folder_a), load_stage(folder_b), resamples=resamples, seed=seed)


def format_report(report: Mapping[str, Any]) -> str:
    queries = ", ".join(f"{n} {direction.replace('_', ' ')} queries" for direction, n in report["queries"].items())
    lines = [
        f"A: {report['a']['name']} ({report['a']['folder']})",
        f"B: {report['b']['name']} ({report['b']['folder']})",
        f"{report['dataset']}/{report['split']}: {queries}; {report['method']['resamples']} resamples, "
        f"seed {report['method']['seed']}",
        "",
        f"{'figure':<28}{'A':>8}{'B':>8}{'B - A':>9}  {'95% interval':<18}{'p':>8}",
    ]
    for figure, row in report["metrics"].items():
        low, high = row["ci95"]
        marker = " *" if row["p_value"] < 0.05 else ""
        lines.append(f"{figure:<28}{row['a']:>8.2f}{row['b']:>8.2f}{row['diff']:>+9.2f}  "
                     f"{f'[{low:+.2f}, {high:+.2f}]':<18}{row['p_value']:>8.4f}{marker}")
    lines += ["", "interval: " + INTERVAL_METHOD, "p: " + P_VALUE_METHOD, "* p < 0.05"]
    return "\n".join(lines)
