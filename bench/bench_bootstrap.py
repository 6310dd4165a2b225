"""Benchmark of the bootstrap intervals and paired tests at COCO 5K evaluation scale.

Synthetic first-hit ranks for 25,000 text queries and 5,000 image queries (recall near a fine-tuned
dual encoder's: about 60% at rank 1) stand in for one evaluated stage. Timed:

(a) the project: every interval of one stage (``stage_intervals``: R@1, R@5, R@10 and mean recall in
    both directions and the overall mean recall) plus both recall@k bands of the figure, with the
    configured number of resamples;
(b) the baseline: the textbook loop, one replicate at a time, resampling query indices
    (``rng.integers(0, N, N)``) and recounting recall; timed on fewer replicates and extrapolated
    linearly (its cost per replicate is constant);
(c) the paired comparison of two such stages (``paired_statistics``: paired bootstrap intervals and
    sign-flip permutation p-values of every figure).

The intervals of (a) and (b) estimate the same quantities with different draws; their largest
endpoint gap is printed as a check.

    python bench/bench_bootstrap.py                        # defaults
    python bench/bench_bootstrap.py --json bench/results/bench_bootstrap.json
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import numpy as np

from vlretrieval.config import CONFIG_SCHEMA, schema_default
from vlretrieval.retrieval.intervals import (
    MAX_K,
    paired_statistics,
    percentile_interval,
    recall_curve_interval,
    stage_intervals,
)

from benchjson import write_figures
from vlretrieval.retrieval.metrics import STANDARD_KS
from vlretrieval.retrieval.predictions import DIRECTIONS, IMAGE_TO_TEXT, TEXT_TO_IMAGE


def synthetic_ranks(rng: np.random.Generator, queries: int, hit_at_1: float) -> np.ndarray:
    """Geometric first-hit ranks: P(rank 0) = hit_at_1, a miss beyond MAX_K."""
    return np.minimum(rng.geometric(hit_at_1, size=queries) - 1, MAX_K).astype(np.int64)


def best_of(repeat: int, fn) -> tuple[float, object]:
    best, result = math.inf, None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def project_stage(ranks: dict[str, np.ndarray], resamples: int, seed: int) -> dict:
    intervals = stage_intervals(ranks, resamples=resamples, seed=seed)
    for direction in DIRECTIONS:
        recall_curve_interval(ranks[direction], direction, resamples=resamples, seed=seed)
    return intervals


def naive_stage(ranks: dict[str, np.ndarray], resamples: int, seed: int) -> dict:
    """One replicate at a time: resample query indices, recount R@1/5/10 and the mean recall."""
    rng = np.random.default_rng(seed)
    means = {}
    intervals = {}
    for direction in DIRECTIONS:
        values = ranks[direction]
        replicates = np.empty((resamples, len(STANDARD_KS) + 1))
        for b in range(resamples):
            sample = values[rng.integers(0, values.size, values.size)]
            fractions = [np.count_nonzero(sample < k) / values.size for k in STANDARD_KS]
            replicates[b] = [*(f * 100 for f in fractions), sum(fractions) / len(fractions) * 100]
        means[direction] = replicates[:, -1]
        intervals[direction] = percentile_interval(replicates)
    intervals["overall"] = percentile_interval((means[TEXT_TO_IMAGE] + means[IMAGE_TO_TEXT]) / 2)
    return intervals


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--texts", type=int, default=25_000, help="text-to-image queries")
    parser.add_argument("--images", type=int, default=5_000, help="image-to-text queries")
    parser.add_argument("--resamples", type=int,
                        default=schema_default(CONFIG_SCHEMA, "evaluation", "bootstrap", "resamples"))
    parser.add_argument("--naive-resamples", type=int, default=100, help="replicates of the timed baseline loop")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here, by name")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    stage_a = {TEXT_TO_IMAGE: synthetic_ranks(rng, args.texts, 0.60), IMAGE_TO_TEXT: synthetic_ranks(rng, args.images, 0.70)}
    stage_b = {TEXT_TO_IMAGE: synthetic_ranks(rng, args.texts, 0.61), IMAGE_TO_TEXT: synthetic_ranks(rng, args.images, 0.71)}
    load_before = os.getloadavg()

    project_seconds, intervals = best_of(args.repeat, lambda: project_stage(stage_a, args.resamples, args.seed))
    naive_sample, _ = best_of(1, lambda: naive_stage(stage_a, args.naive_resamples, args.seed))
    naive_seconds = naive_sample * args.resamples / args.naive_resamples
    paired_seconds, _ = best_of(args.repeat, lambda: paired_statistics(stage_a, stage_b, resamples=args.resamples,
                                                                       seed=args.seed))
    # Same quantities, independent draws: the endpoints should agree to within Monte Carlo error.
    naive_full = naive_stage(stage_a, args.resamples, args.seed + 1) if args.resamples <= 2000 else None
    gap = None
    if naive_full is not None:
        gaps = [abs(intervals["ci95_mean_recall"][i] - naive_full["overall"][i]) for i in (0, 1)]
        for direction in DIRECTIONS:
            ours = intervals[direction]["ci95"]
            for column, name in enumerate(("r1", "r5", "r10", "mean_recall")):
                gaps += [abs(ours[name][i] - naive_full[direction][i][column]) for i in (0, 1)]
        gap = max(gaps)
    load_after = os.getloadavg()

    figures = {
        "seconds_per_stage": project_seconds,
        "naive_seconds_per_stage": naive_seconds,
        "naive_over_vectorised": naive_seconds / project_seconds,
        "paired_seconds": paired_seconds,
    }
    if gap is not None:
        figures["max_endpoint_gap_vs_naive_percent_points"] = gap
    print(f"{args.texts} text queries, {args.images} image queries, {args.resamples} resamples")
    print(f"(a) project, every interval and band of one stage: {project_seconds:8.4f} s  best of {args.repeat}  "
          f"(goal < 10 s)")
    print(f"(b) baseline loop, one replicate at a time:          {naive_seconds:8.4f} s  extrapolated from "
          f"{args.naive_resamples} replicates ({naive_sample:.3f} s)")
    print(f"(c) paired bootstrap and permutation test, 9 figures: {paired_seconds:8.4f} s  best of {args.repeat}")
    print(f"baseline / project = {figures['naive_over_vectorised']:.1f}")
    if gap is not None:
        print(f"largest interval endpoint gap between (a) and a full run of (b): {gap:.3f} percentage points")
    print(f"1-minute load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f} on {os.cpu_count()} cpus")
    write_figures(args.json, "bench_bootstrap", figures, texts=args.texts, images=args.images,
                  resamples=args.resamples, naive_resamples_timed=args.naive_resamples, repeat=args.repeat,
                  seed=args.seed, load_average_before=load_before[0], load_average_after=load_after[0])
    return figures


if __name__ == "__main__":
    main()
