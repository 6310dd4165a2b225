"""Bootstrap intervals of recall and the paired tests, against textbook reference implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vlretrieval.retrieval.intervals import (
    MAX_K,
    bootstrap_rank_counts,
    paired_statistics,
    percentile_interval,
    recall_curve_interval,
    stage_intervals,
)
from vlretrieval.retrieval.metrics import STANDARD_KS, scores_from_ranks
from vlretrieval.retrieval.predictions import IMAGE_TO_TEXT, TEXT_TO_IMAGE

FIGURES = ("r1", "r5", "r10", "mean_recall")


def geometric_ranks(rng: np.random.Generator, queries: int, hit_at_1: float) -> np.ndarray:
    return np.minimum(rng.geometric(hit_at_1, size=queries) - 1, MAX_K).astype(np.int64)


def naive_replicates(ranks: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """The textbook bootstrap: resample query indices, recount; columns R@1, R@5, R@10, mean recall."""
    out = np.empty((resamples, 4))
    for b in range(resamples):
        sample = ranks[rng.integers(0, ranks.size, ranks.size)]
        fractions = [np.count_nonzero(sample < k) / ranks.size for k in STANDARD_KS]
        out[b] = [*(f * 100 for f in fractions), sum(fractions) / 3 * 100]
    return out


@pytest.fixture(scope="module")
def stage_ranks() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    return {TEXT_TO_IMAGE: geometric_ranks(rng, 5000, 0.35), IMAGE_TO_TEXT: geometric_ranks(rng, 1000, 0.45)}


def test_every_interval_contains_its_value(stage_ranks):
    intervals = stage_intervals(stage_ranks, resamples=1000, seed=0)
    overall = 0.0
    for direction, ranks in stage_ranks.items():
        scores = scores_from_ranks(ranks)
        assert intervals[direction]["queries"] == ranks.size
        assert set(intervals[direction]["ci95"]) == set(FIGURES)
        for name in FIGURES:
            low, high = intervals[direction]["ci95"][name]
            assert low < scores[name] < high, (direction, name, low, scores[name], high)
        overall += scores["mean_recall"] / 2
    low, high = intervals["ci95_mean_recall"]
    assert low < overall < high


@pytest.mark.parametrize("hit_at_1", [0.05, 0.3, 0.7])
def test_width_agrees_with_the_binomial_normal_approximation(hit_at_1):
    queries = 4000
    ranks = geometric_ranks(np.random.default_rng(3), queries, hit_at_1)
    intervals = stage_intervals({TEXT_TO_IMAGE: ranks, IMAGE_TO_TEXT: ranks[:500]}, resamples=4000, seed=1)
    checked = 0
    for k in STANDARD_KS:
        p = np.count_nonzero(ranks < k) / queries
        if not 0.05 <= p <= 0.95:
            continue
        low, high = intervals[TEXT_TO_IMAGE]["ci95"][f"r{k}"]
        expected = 2 * 1.96 * math.sqrt(p * (1 - p) / queries) * 100
        assert (high - low) == pytest.approx(expected, rel=0.15), (k, p)
        checked += 1
    assert checked >= 1


def test_same_seed_same_interval_other_seed_other_interval(stage_ranks):
    first = stage_intervals(stage_ranks, resamples=500, seed=7)
    assert stage_intervals(stage_ranks, resamples=500, seed=7) == first
    assert stage_intervals(stage_ranks, resamples=500, seed=8) != first


def test_rank_counts_resample_every_query():
    ranks = geometric_ranks(np.random.default_rng(0), 321, 0.4)
    counts = bootstrap_rank_counts(ranks, resamples=50, rng=np.random.default_rng(0))
    assert counts.shape == (50, MAX_K + 1)
    assert (counts.sum(axis=1) == ranks.size).all()
    # A rank value no query has is never drawn.
    assert (counts[:, np.bincount(ranks, minlength=MAX_K + 1) == 0] == 0).all()


def test_intervals_match_the_textbook_bootstrap_and_overall_is_resampled_per_direction(stage_ranks):
    """Independent draws of both methods estimate the same percentiles: the endpoints agree to Monte
    Carlo error. The overall interval of the reference resamples each direction on its own queries."""
    resamples = 3000
    ours = stage_intervals(stage_ranks, resamples=resamples, seed=0)
    rng = np.random.default_rng(99)
    reference = {direction: naive_replicates(ranks, resamples, rng) for direction, ranks in stage_ranks.items()}
    for direction in stage_ranks:
        expected = percentile_interval(reference[direction])
        for column, name in enumerate(FIGURES):
            width = expected[1, column] - expected[0, column]
            assert ours[direction]["ci95"][name] == pytest.approx(expected[:, column].tolist(), abs=0.12 * width)
    overall = (reference[TEXT_TO_IMAGE][:, 3] + reference[IMAGE_TO_TEXT][:, 3]) / 2
    expected = percentile_interval(overall)
    width = expected[1] - expected[0]
    assert ours["ci95_mean_recall"] == pytest.approx(expected.tolist(), abs=0.12 * width)
    # Per-direction resampling: the overall variance is the mean of two independent variances, so its
    # width is sqrt(w_t2i^2 + w_i2t^2) / 2, narrower than the mean of the two widths.
    widths = [ours[d]["ci95"]["mean_recall"][1] - ours[d]["ci95"]["mean_recall"][0] for d in stage_ranks]
    overall_width = ours["ci95_mean_recall"][1] - ours["ci95_mean_recall"][0]
    assert overall_width == pytest.approx(math.hypot(*widths) / 2, rel=0.1)
    assert overall_width < sum(widths) / 2


def test_recall_curve_band_is_the_metrics_interval_at_1_5_10(stage_ranks):
    intervals = stage_intervals(stage_ranks, resamples=800, seed=4)
    for direction, ranks in stage_ranks.items():
        band = recall_curve_interval(ranks, direction, resamples=800, seed=4)
        assert band.shape == (2, MAX_K)
        assert (np.diff(band, axis=1) >= 0).all()  # recall@k never falls with k
        for k in STANDARD_KS:
            assert band[:, k - 1].tolist() == pytest.approx(intervals[direction]["ci95"][f"r{k}"])


def test_identical_systems_differ_by_nothing_with_p_one(stage_ranks):
    result = paired_statistics(stage_ranks, {d: r.copy() for d, r in stage_ranks.items()}, resamples=500, seed=0)
    assert len(result) == 9
    for name, row in result.items():
        assert row["p_value"] == 1.0, name
        assert row["ci95"] == [0.0, 0.0], name


def test_clearly_different_systems_get_a_small_p(stage_ranks):
    rng = np.random.default_rng(5)
    better = {TEXT_TO_IMAGE: geometric_ranks(rng, 5000, 0.45), IMAGE_TO_TEXT: geometric_ranks(rng, 1000, 0.55)}
    result = paired_statistics(stage_ranks, better, resamples=1000, seed=0)
    assert result["mean_recall"]["p_value"] < 0.01
    low, high = result["mean_recall"]["ci95"]
    diff = (scores_from_ranks(better[TEXT_TO_IMAGE])["mean_recall"] + scores_from_ranks(better[IMAGE_TO_TEXT])["mean_recall"]
            - scores_from_ranks(stage_ranks[TEXT_TO_IMAGE])["mean_recall"]
            - scores_from_ranks(stage_ranks[IMAGE_TO_TEXT])["mean_recall"]) / 2
    assert 0 < low < diff < high


def test_sign_flip_p_value_matches_a_per_query_reference():
    """Small effect, so p is far from both ends: the category-level binomial flips give the same
    p-value as flipping each query's difference on its own."""
    rng = np.random.default_rng(8)
    a = {TEXT_TO_IMAGE: geometric_ranks(rng, 600, 0.40), IMAGE_TO_TEXT: geometric_ranks(rng, 200, 0.40)}
    b = {d: r.copy() for d, r in a.items()}
    # B moves a few queries one rank up and almost as many one rank down: a small, noisy gain.
    for direction in a:
        draw = rng.random(b[direction].size)
        b[direction][draw < 0.10] -= 1
        b[direction][(draw >= 0.10) & (draw < 0.18)] += 1
        np.clip(b[direction], 0, MAX_K, out=b[direction])
    permutations = 4000
    ours = paired_statistics(a, b, resamples=permutations, seed=2)["mean_recall"]["p_value"]

    per_query = {d: np.array([scores_from_ranks(b[d][i:i + 1])["mean_recall"] - scores_from_ranks(a[d][i:i + 1])["mean_recall"]
                              for i in range(a[d].size)]) for d in a}
    observed = sum(per_query[d].mean() for d in a) / 2
    flips = np.random.default_rng(3)
    stats = sum((flips.choice([-1.0, 1.0], size=(permutations, v.size)) @ v) / v.size for v in per_query.values()) / 2
    reference = (1 + np.count_nonzero(np.abs(stats) >= abs(observed) - 1e-9)) / (1 + permutations)
    assert 0.02 < reference < 0.98, reference
    assert ours == pytest.approx(reference, abs=0.03)


def test_bad_inputs_are_refused(stage_ranks):
    with pytest.raises(ValueError, match="resamples"):
        stage_intervals(stage_ranks, resamples=0, seed=0)
    with pytest.raises(ValueError, match="0..10"):
        stage_intervals({TEXT_TO_IMAGE: np.array([11]), IMAGE_TO_TEXT: np.array([0])}, resamples=10, seed=0)
    with pytest.raises(ValueError, match="same queries"):
        paired_statistics(stage_ranks, {TEXT_TO_IMAGE: stage_ranks[TEXT_TO_IMAGE][:-1],
                                        IMAGE_TO_TEXT: stage_ranks[IMAGE_TO_TEXT]}, resamples=10, seed=0)
