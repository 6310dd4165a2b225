"""Figures for the Snakemake report: recall@k curves per pair, with their 95% bootstrap bands, and the
fine-tuning loss curve."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..io import atomic_path
from ..retrieval.evaluate import I2T_FILE, METRICS_FILE, T2I_FILE
from ..retrieval.intervals import recall_curve_interval
from ..retrieval.metrics import first_hit_ranks
from ..retrieval.predictions import invert_gold, read_gold_t2i, read_predictions

MAX_K = 10


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on cluster nodes
    import matplotlib.pyplot as plt

    return plt


def recall_curves(results_dir: str | os.PathLike, gold_texts: str | os.PathLike, *, resamples: int,
                  seed: int) -> dict[str, dict[str, dict[str, list[float]]]]:
    """``{direction: {stage: {"recall": [R@1, ..., R@10], "ci95_low": [...], "ci95_high": [...]}}}``
    recomputed from each stage's predictions; the bands are drawn as the intervals of ``metrics.json``."""
    import json

    results_dir = Path(results_dir)
    stages = json.loads((results_dir / METRICS_FILE).read_text(encoding="utf-8"))["stages"]
    gold_t2i = read_gold_t2i(gold_texts)
    golds = {"text_to_image": (T2I_FILE, gold_t2i), "image_to_text": (I2T_FILE, invert_gold(gold_t2i))}
    curves: dict[str, dict[str, dict[str, list[float]]]] = {direction: {} for direction in golds}
    for stage in stages:
        for direction, (name, gold) in golds.items():
            ranks = first_hit_ranks(read_predictions(results_dir / stage / name, direction), gold, MAX_K)
            low, high = recall_curve_interval(ranks, direction, resamples=resamples, seed=seed, max_k=MAX_K)
            curves[direction][stage] = {
                "recall": [float(np.count_nonzero(ranks < k)) / ranks.size * 100 for k in range(1, MAX_K + 1)],
                "ci95_low": low.tolist(),
                "ci95_high": high.tolist(),
            }
    return curves


def recall_figure(curves: dict[str, dict[str, dict[str, list[float]]]], *, title: str):
    """The recall@k figure of :func:`recall_curves`: one panel per direction, a line and band per stage.

    The legend goes below the panels, outside them: inside, wherever it sits, it would cover a stage's
    points or band on some pair (at chance, zero-shot runs along the bottom; fine-tuned, near the top).
    """
    plt = _pyplot()
    ks = range(1, MAX_K + 1)
    figure, axes = plt.subplots(1, 2, figsize=(9, 4.2), sharey=True, layout="constrained")
    for axis, (direction, label) in zip(axes, (("text_to_image", "text → image"), ("image_to_text", "image → text"))):
        for stage, curve in curves[direction].items():
            (line,) = axis.plot(ks, curve["recall"], marker="o", label=stage)
            axis.fill_between(ks, curve["ci95_low"], curve["ci95_high"], color=line.get_color(), alpha=0.2,
                              linewidth=0)
        axis.set_title(label)
        axis.set_xlabel("k")
        axis.set_xticks(range(1, MAX_K + 1))
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("recall@k (%)")
    axes[0].set_ylim(0, 100)
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside lower center", ncol=max(len(labels), 1), frameon=False,
                  title="stage (shaded: 95% bootstrap interval)", title_fontsize="small")
    figure.suptitle(title)
    return figure


def loss_figure(records: list[dict], *, title: str):
    """The fine-tuning loss per step (left axis) and the learning rate applied (right axis); the legend
    goes below the axes, where it covers neither curve nor the right axis's ticks."""
    plt = _pyplot()
    figure, loss_axis = plt.subplots(figsize=(7, 4.0), layout="constrained")
    steps = [r["step"] for r in records]
    loss_axis.plot(steps, [r["loss"] for r in records], color="tab:blue", label="loss")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("contrastive loss")
    lr_axis = loss_axis.twinx()
    lr_axis.plot(steps, [r["lr"] for r in records], color="tab:orange", alpha=0.6, label="learning rate")
    lr_axis.set_ylabel("learning rate")
    handles = loss_axis.get_lines() + lr_axis.get_lines()
    figure.legend(handles, [h.get_label() for h in handles], loc="outside lower center", ncol=2, frameon=False)
    loss_axis.set_title(title)
    return figure


def _save(figure, out_png: str | os.PathLike) -> None:
    plt = _pyplot()
    with atomic_path(out_png) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)


def plot_recall_curves(results_dir: str | os.PathLike, gold_texts: str | os.PathLike, out_png: str | os.PathLike,
                       *, title: str, resamples: int, seed: int) -> None:
    curves = recall_curves(results_dir, gold_texts, resamples=resamples, seed=seed)
    _save(recall_figure(curves, title=title), out_png)


def plot_loss_curve(train_log: str | os.PathLike, out_png: str | os.PathLike, *, title: str) -> None:
    from ..training.checkpoints import read_train_log

    records = [r for r in read_train_log(train_log) if r.get("event") == "train"]
    _save(loss_figure(records, title=title), out_png)
