"""A pair's deliverable: ``results/{dataset}/{model}/`` with ``metrics.json`` and each stage's predictions.

``metrics.json`` is the canonical record of a (dataset, model) pair::

    {"dataset", "model", "split", "num_texts", "num_images", "k", "protocol",
     "gold": {"file": "gold.jsonl", "sha256"}, "bootstrap": {"resamples", "seed", "confidence", "method"},
     "stages": {"zeroshot": {"text_to_image": {"r1", "r5", "r10", "mean_recall", "queries",
                                               "ci95": {"r1": [lo, hi], "r5", "r10", "mean_recall"}},
                             "image_to_text": {...}, "mean_recall", "ci95_mean_recall": [lo, hi]},
                "finetuned": {...}}}

``protocol`` says how the rankings were made (dense top-k of a dual encoder, or a cross encoder's
exhaustive or two-stage scoring, :func:`vlretrieval.config.evaluation_protocol`). Values are
percentages, and every one carries its 95% bootstrap interval over queries (:mod:`.intervals`).
Predictions are validated strictly against the split's gold texts and its image and text galleries
before anything is scored. The gold is copied beside ``metrics.json`` (``gold.jsonl``: text ids and
their image ids) with a digest of its content, so two stage folders can be compared on the same
queries later (:mod:`.compare`) without the serialized split.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping

from ..data.lmdb_store import SplitStore
from ..io import atomic_directory, atomic_open, write_json
from .intervals import CONFIDENCE, stage_intervals
from .metrics import prediction_file_ranks, scores_from_direction_ranks
from .predictions import DIRECTIONS, read_gold_t2i

METRICS_FILE = "metrics.json"
T2I_FILE = "t2i_predictions.jsonl"
I2T_FILE = "i2t_predictions.jsonl"
GOLD_FILE = "texts.jsonl"  # written by serialization beside the split's LMDBs
PAIR_GOLD_FILE = "gold.jsonl"  # the copy of the gold in a pair's results


def gold_digest(gold_t2i: Mapping[int, Any]) -> str:
    """sha256 of the gold's content (text ids and their image ids), independent of line order."""
    digest = hashlib.sha256()
    for text_id in sorted(gold_t2i):
        digest.update(f"{text_id}:{','.join(str(i) for i in sorted(gold_t2i[text_id]))}\n".encode())
    return digest.hexdigest()


def write_gold(path: str | os.PathLike, gold_t2i: Mapping[int, Any]) -> None:
    """The gold as ``{"text_id", "image_ids"}`` lines in its own order (read back by ``read_gold_t2i``)."""
    with atomic_open(path) as handle:
        for text_id, image_ids in gold_t2i.items():
            handle.write(json.dumps({"text_id": int(text_id), "image_ids": sorted(int(i) for i in image_ids)}))
            handle.write("\n")


def write_pair_results(
    out_dir: str | os.PathLike,
    *,
    dataset: str,
    model: str,
    split: str,
    split_dir: str | os.PathLike,
    stage_predictions: Mapping[str, str | os.PathLike],
    k: int,
    protocol: Mapping[str, Any] | None = None,
    resamples: int,
    seed: int,
) -> dict:
    """Score every stage's predictions and write the pair's results directory atomically.

    ``stage_predictions`` maps a stage name to the directory holding its ``t2i_predictions.jsonl``
    and ``i2t_predictions.jsonl``. ``resamples`` and ``seed`` drive the bootstrap intervals.
    Returns the metrics written to ``metrics.json``.
    """
    split_dir = Path(split_dir)
    with SplitStore(split_dir) as store:
        image_ids = store.image_ids()
        text_ids = [record.text_id for record in store.texts()]
    gold_t2i = read_gold_t2i(split_dir / GOLD_FILE)

    stages = {}
    for stage, predictions_dir in stage_predictions.items():
        predictions_dir = Path(predictions_dir)
        ranks = prediction_file_ranks(
            gold_t2i, predictions_dir / T2I_FILE, predictions_dir / I2T_FILE,
            k=k, image_ids=image_ids, text_ids=text_ids,
            # Images that no text describes are still ranked as queries; they carry no gold.
            allow_extra_queries=True,
        )
        scores = scores_from_direction_ranks(ranks)
        intervals = stage_intervals(ranks, resamples=resamples, seed=seed)
        for direction in DIRECTIONS:
            scores[direction].update(intervals[direction])
        scores["ci95_mean_recall"] = intervals["ci95_mean_recall"]
        stages[stage] = scores
    metrics = {
        "dataset": dataset,
        "model": model,
        "split": split,
        "num_texts": len(text_ids),
        "num_images": len(image_ids),
        "k": int(k),
        "protocol": dict(protocol) if protocol is not None else None,
        "gold": {"file": PAIR_GOLD_FILE, "sha256": gold_digest(gold_t2i)},
        "bootstrap": {"resamples": int(resamples), "seed": int(seed), "confidence": CONFIDENCE,
                      "method": "percentile bootstrap over queries"},
        "stages": stages,
    }
    with atomic_directory(out_dir) as tmp:
        for stage, predictions_dir in stage_predictions.items():
            (tmp / stage).mkdir()
            for name in (T2I_FILE, I2T_FILE):
                shutil.copyfile(Path(predictions_dir) / name, tmp / stage / name)
        write_gold(tmp / PAIR_GOLD_FILE, gold_t2i)
        write_json(tmp / METRICS_FILE, metrics)
    return metrics
