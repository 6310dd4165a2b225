"""Figures for the Snakemake report: recall@k curves per pair and the fine-tuning loss curve."""

from __future__ import annotations

import os
from pathlib import Path

from ..io import atomic_path
from ..retrieval.evaluate import I2T_FILE, METRICS_FILE, T2I_FILE
from ..retrieval.metrics import recall_curve
from ..retrieval.predictions import invert_gold, read_gold_t2i, read_predictions

MAX_K = 10


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    return plt


def recall_curves(results_dir: str | os.PathLike, gold_texts: str | os.PathLike) -> dict[str, dict[str, list[float]]]:
    """``{direction: {stage: [R@1, ..., R@10]}}`` recomputed from each stage's predictions."""
    import json

    results_dir = Path(results_dir)
    stages = json.loads((results_dir / METRICS_FILE).read_text(encoding="utf-8"))["stages"]
    gold_t2i = read_gold_t2i(gold_texts)
    gold_i2t = invert_gold(gold_t2i)
    curves: dict[str, dict[str, list[float]]] = {"text_to_image": {}, "image_to_text": {}}
    for stage in stages:
        t2i = read_predictions(results_dir / stage / T2I_FILE, "text_to_image")
        i2t = read_predictions(results_dir / stage / I2T_FILE, "image_to_text")
        curves["text_to_image"][stage] = recall_curve(t2i, gold_t2i, max_k=MAX_K)
        curves["image_to_text"][stage] = recall_curve(i2t, gold_i2t, max_k=MAX_K)
    return curves


def plot_recall_curves(results_dir: str | os.PathLike, gold_texts: str | os.PathLike, out_png: str | os.PathLike,
                       *, title: str) -> None:
    plt = _pyplot()
    curves = recall_curves(results_dir, gold_texts)
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for axis, (direction, label) in zip(axes, (("text_to_image", "text → image"), ("image_to_text", "image → text"))):
        for stage, values in curves[direction].items():
            axis.plot(range(1, MAX_K + 1), values, marker="o", label=stage)
        axis.set_title(label)
        axis.set_xlabel("k")
        axis.set_xticks(range(1, MAX_K + 1))
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("recall@k (%)")
    axes[0].set_ylim(0, 100)
    axes[1].legend(loc="lower right")
    figure.suptitle(title)
    figure.tight_layout()
    with atomic_path(out_png) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)


def plot_loss_curve(train_log: str | os.PathLike, out_png: str | os.PathLike, *, title: str) -> None:
    from ..training.checkpoints import read_train_log

    records = [r for r in read_train_log(train_log) if r.get("event") == "train"]
    plt = _pyplot()
    figure, loss_axis = plt.subplots(figsize=(7, 3.6))
    steps = [r["step"] for r in records]
    loss_axis.plot(steps, [r["loss"] for r in records], color="tab:blue", label="loss")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("contrastive loss")
    lr_axis = loss_axis.twinx()
    lr_axis.plot(steps, [r["lr"] for r in records], color="tab:orange", alpha=0.6, label="learning rate")
    lr_axis.set_ylabel("learning rate")
    figure.legend(loc="upper right")
    loss_axis.set_title(title)
    figure.tight_layout()
    with atomic_path(out_png) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)
