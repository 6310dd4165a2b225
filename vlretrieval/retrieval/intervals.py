"""Uncertainty of recall figures: bootstrap intervals over queries, and paired tests of two systems.

Everything starts from first-hit ranks (:func:`.metrics.first_hit_ranks`): ``r`` in ``0 .. max_k - 1``
when the first gold item is at rank ``r``, ``max_k`` for a miss. Recall@k of a set of queries depends
only on how many of them have each rank value, which is what makes the resampling cheap.

Intervals (percentile bootstrap). A replicate resamples a direction's ``N`` queries with replacement.
The number of resampled queries with each rank value is then multinomial, ``N`` draws over the observed
rank frequencies, so the replicates are drawn as those ``max_k + 1`` counts directly: the same
distribution as resampling query indices, at a cost of ``B x (max_k + 1)`` instead of ``B x N``. The
95% interval is the 2.5th and 97.5th percentile of the replicates. The overall mean recall of a stage
is resampled per direction, each direction on its own queries: for replicate ``b``,
``overall_b = (mean_t2i_b + mean_i2t_b) / 2``.

Paired comparison of systems A and B on the same queries. Each query falls into a joint category
``(rank in A, rank in B)``, and a figure's difference ``B - A`` is a sum over categories.

- Interval of the difference: paired bootstrap, resampling queries jointly (multinomial over the joint
  categories), percentile interval.
- p-value: two-sided sign-flip permutation test. Under the null hypothesis the labels A and B of each
  query are exchangeable, so each query's difference flips sign with probability 1/2; the number of
  flipped queries in a category is binomial(n, 1/2). With ``P`` permutations,
  ``p = (1 + #{|T_perm| >= |T_obs|}) / (1 + P)``. Statistics are integer counts, so the comparison is
  exact, and two identical systems (every difference 0) get ``p = 1``.

Draws come from ``numpy.random.default_rng([seed, purpose, direction])``: the same seed gives the
same intervals and p-values, and the directions are independent streams.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .metrics import STANDARD_KS
from .predictions import DIRECTIONS

CONFIDENCE = 0.95
MAX_K = max(STANDARD_KS)
FIGURES = ("r1", "r5", "r10", "mean_recall")
OVERALL = "mean_recall"

# First element of each random stream's key, so intervals, paired intervals and permutations never
# share draws.
_INTERVALS, _PAIRED_BOOTSTRAP, _PERMUTATION = 0, 1, 2


def _stream(seed: int, purpose: int, direction: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), purpose, DIRECTIONS.index(direction)])


def _check_resamples(resamples: int) -> int:
    if isinstance(resamples, bool) or not isinstance(resamples, (int, np.integer)) or resamples < 1:
        raise ValueError(f"resamples must be a positive integer, got {resamples!r}")
    return int(resamples)


def _check_ranks(ranks, max_k: int) -> np.ndarray:
    ranks = np.asarray(ranks)
    if ranks.ndim != 1 or ranks.size == 0 or ranks.dtype.kind not in "iu":
        raise ValueError(f"ranks must be a non-empty 1-D integer array, got shape {ranks.shape}, dtype {ranks.dtype}")
    if ranks.min() < 0 or ranks.max() > max_k:
        raise ValueError(f"ranks must lie in 0..{max_k} ({max_k} = no gold item in the top {max_k})")
    return ranks.astype(np.int64, copy=False)


def percentile_interval(replicates: np.ndarray) -> np.ndarray:
    """The central :data:`CONFIDENCE` percentile interval along the first axis: shape ``(2, ...)``."""
    tail = (1 - CONFIDENCE) / 2 * 100
    return np.percentile(replicates, [tail, 100 - tail], axis=0)


def _pair(interval: np.ndarray) -> list[float]:
    return [float(interval[0]), float(interval[1])]


# ---------------------------------------------------------------------------------------------
# intervals of one system


def rank_counts(ranks, max_k: int = MAX_K) -> np.ndarray:
    """How many queries have each rank value ``0 .. max_k``."""
    return np.bincount(_check_ranks(ranks, max_k), minlength=max_k + 1)


def bootstrap_rank_counts(ranks, *, resamples: int, rng: np.random.Generator, max_k: int = MAX_K) -> np.ndarray:
    """``(resamples, max_k + 1)`` rank-value counts of bootstrap resamples of the queries."""
    counts = rank_counts(ranks, max_k)
    total = int(counts.sum())
    return rng.multinomial(total, counts / total, size=_check_resamples(resamples))


def recall_fractions(counts: np.ndarray, ks: Sequence[int]) -> np.ndarray:
    """Recall@k as fractions from rank-value counts (last axis); one column per ``k``."""
    cumulative = np.cumsum(counts, axis=-1)
    return cumulative[..., [k - 1 for k in ks]] / cumulative[..., -1:]


def figure_replicates(counts: np.ndarray) -> dict[str, np.ndarray]:
    """``{"r1", "r5", "r10", "mean_recall"}`` in percent for each row of rank-value counts."""
    fractions = recall_fractions(counts, STANDARD_KS)
    replicates = {f"r{k}": fractions[..., i] * 100 for i, k in enumerate(STANDARD_KS)}
    replicates["mean_recall"] = fractions.sum(axis=-1) / len(STANDARD_KS) * 100
    return replicates


def stage_intervals(ranks: Mapping[str, np.ndarray], *, resamples: int, seed: int) -> dict:
    """Intervals of every figure of a stage from ``{direction: first-hit ranks}`` (``max_k`` = 10).

    Returns ``{"text_to_image": {"queries": N, "ci95": {"r1": [lo, hi], ..., "mean_recall": [lo, hi]}},
    "image_to_text": {...}, "ci95_mean_recall": [lo, hi]}``, in percent.
    """
    result: dict = {}
    direction_means = []
    for direction in DIRECTIONS:
        counts = bootstrap_rank_counts(ranks[direction], resamples=resamples,
                                       rng=_stream(seed, _INTERVALS, direction))
        replicates = figure_replicates(counts)
        direction_means.append(replicates["mean_recall"])
        result[direction] = {
            "queries": int(np.asarray(ranks[direction]).size),
            "ci95": {name: _pair(percentile_interval(replicates[name])) for name in FIGURES},
        }
    result["ci95_mean_recall"] = _pair(percentile_interval((direction_means[0] + direction_means[1]) / 2))
    return result


def recall_curve_interval(ranks, direction: str, *, resamples: int, seed: int,
                          max_k: int = MAX_K) -> np.ndarray:
    """``(2, max_k)`` interval of R@1 .. R@max_k in percent, drawn like :func:`stage_intervals`, so the
    band at k = 1, 5, 10 is the interval in ``metrics.json``."""
    counts = bootstrap_rank_counts(ranks, resamples=resamples, rng=_stream(seed, _INTERVALS, direction), max_k=max_k)
    return percentile_interval(recall_fractions(counts, range(1, max_k + 1)) * 100)


# ---------------------------------------------------------------------------------------------
# paired comparison of two systems on the same queries


def joint_rank_counts(ranks_a, ranks_b, max_k: int = MAX_K) -> np.ndarray:
    """Queries per joint category ``(rank in A, rank in B)``, flattened as ``rank_a * (max_k + 1) + rank_b``."""
    ranks_a, ranks_b = _check_ranks(ranks_a, max_k), _check_ranks(ranks_b, max_k)
    if ranks_a.shape != ranks_b.shape:
        raise ValueError(f"paired ranks need the same queries: {ranks_a.size} in A, {ranks_b.size} in B")
    levels = max_k + 1
    return np.bincount(ranks_a * levels + ranks_b, minlength=levels * levels)


def _difference_units(max_k: int = MAX_K) -> np.ndarray:
    """``(categories, 4)`` integer change of the hit counts at k = 1, 5, 10 and of their sum when a
    query of each joint category counts for B instead of A."""
    levels = max_k + 1
    rank_a, rank_b = np.divmod(np.arange(levels * levels), levels)
    hits = np.stack([(rank_b < k).astype(np.int64) - (rank_a < k) for k in STANDARD_KS], axis=1)
    return np.concatenate([hits, hits.sum(axis=1, keepdims=True)], axis=1)


def _as_percent(numerators: np.ndarray, queries: int) -> np.ndarray:
    """Integer numerators of ``_difference_units`` columns to percent differences."""
    scale = np.array([1.0] * len(STANDARD_KS) + [len(STANDARD_KS)]) * queries
    return numerators / scale * 100


def paired_statistics(ranks_a: Mapping[str, np.ndarray], ranks_b: Mapping[str, np.ndarray], *,
                      resamples: int, seed: int) -> dict[str, dict]:
    """Paired bootstrap interval and sign-flip permutation p-value of every figure's difference ``B - A``.

    Keys are ``"text_to_image.r1"`` .. ``"image_to_text.mean_recall"`` and ``"mean_recall"`` (overall);
    values ``{"ci95": [lo, hi], "p_value": p}``, differences in percentage points.
    """
    resamples = _check_resamples(resamples)
    units = _difference_units()
    result: dict[str, dict] = {}
    boot_means, perm_sums, observed_sums, sizes = [], [], [], []
    for direction in DIRECTIONS:
        joint = joint_rank_counts(ranks_a[direction], ranks_b[direction])
        queries = int(joint.sum())
        sizes.append(queries)

        resampled = _stream(seed, _PAIRED_BOOTSTRAP, direction).multinomial(queries, joint / queries, size=resamples)
        boot = _as_percent(resampled @ units, queries)

        flipped = _stream(seed, _PERMUTATION, direction).binomial(joint, 0.5, size=(resamples, joint.size))
        permuted = (joint - 2 * flipped) @ units
        observed = joint @ units

        for column, name in enumerate(FIGURES):
            result[f"{direction}.{name}"] = {
                "ci95": _pair(percentile_interval(boot[:, column])),
                "p_value": _permutation_p(permuted[:, column], observed[column]),
            }
        boot_means.append(boot[:, -1])
        perm_sums.append(permuted[:, -1])
        observed_sums.append(observed[-1])

    # The overall mean is (sum_t2i / 3N_t2i + sum_i2t / 3N_i2t) / 2; scaled by 6 N_t2i N_i2t it stays an
    # integer, so the permutation comparison stays exact.
    overall_permuted = perm_sums[0] * sizes[1] + perm_sums[1] * sizes[0]
    overall_observed = observed_sums[0] * sizes[1] + observed_sums[1] * sizes[0]
    result[OVERALL] = {
        "ci95": _pair(percentile_interval((boot_means[0] + boot_means[1]) / 2)),
        "p_value": _permutation_p(overall_permuted, overall_observed),
    }
    return result


def _permutation_p(permuted: np.ndarray, observed) -> float:
    extreme = int(np.count_nonzero(np.abs(permuted) >= abs(int(observed))))
    return (1 + extreme) / (1 + permuted.size)
