"""A pair's deliverable: ``results/{dataset}/{model}/`` with ``metrics.json`` and each stage's predictions.

``metrics.json`` is the canonical record of a (dataset, model) pair::

    {"dataset", "model", "split", "num_texts", "num_images", "k", "protocol",
     "stages": {"zeroshot": {"text_to_image": {"r1", "r5", "r10", "mean_recall"},
                             "image_to_text": {...}, "mean_recall"},
                "finetuned": {...}}}

``protocol`` says how the rankings were made (dense top-k of a dual encoder, or a cross encoder's
exhaustive or two-stage scoring, :func:`vlretrieval.config.evaluation_protocol`). Values are percentages. Predictions are validated strictly against the split's gold texts and its
image and text galleries before anything is scored.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Mapping

from ..data.lmdb_store import SplitStore
from ..io import atomic_directory, write_json
from .metrics import score_prediction_files

METRICS_FILE = "metrics.json"
T2I_FILE = "t2i_predictions.jsonl"
I2T_FILE = "i2t_predictions.jsonl"
GOLD_FILE = "texts.jsonl"  # written by serialization beside the split's LMDBs


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
) -> dict:
    """Score every stage's predictions and write the pair's results directory atomically.

    ``stage_predictions`` maps a stage name to the directory holding its ``t2i_predictions.jsonl``
    and ``i2t_predictions.jsonl``. Returns the metrics written to ``metrics.json``.
    """
    split_dir = Path(split_dir)
    with SplitStore(split_dir) as store:
        image_ids = store.image_ids()
        text_ids = [record.text_id for record in store.texts()]
    gold = split_dir / GOLD_FILE

    stages = {}
    for stage, predictions_dir in stage_predictions.items():
        predictions_dir = Path(predictions_dir)
        stages[stage] = score_prediction_files(
            gold, predictions_dir / T2I_FILE, predictions_dir / I2T_FILE,
            k=k, image_ids=image_ids, text_ids=text_ids,
            # Images that no text describes are still ranked as queries; they carry no gold.
            allow_extra_queries=True,
        )
    metrics = {
        "dataset": dataset,
        "model": model,
        "split": split,
        "num_texts": len(text_ids),
        "num_images": len(image_ids),
        "k": int(k),
        "protocol": dict(protocol) if protocol is not None else None,
        "stages": stages,
    }
    with atomic_directory(out_dir) as tmp:
        for stage, predictions_dir in stage_predictions.items():
            (tmp / stage).mkdir()
            for name in (T2I_FILE, I2T_FILE):
                shutil.copyfile(Path(predictions_dir) / name, tmp / stage / name)
        write_json(tmp / METRICS_FILE, metrics)
    return metrics
