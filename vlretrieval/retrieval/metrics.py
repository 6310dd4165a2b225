"""Recall@k with the semantics of the reference evaluation scripts.

A query is a hit at ``k`` when any of its gold items is among its first ``k`` predictions.
Recall is the fraction of gold queries that are hits, reported in percent; the mean recall of
a direction is the mean of R@1, R@5 and R@10. Queries are the keys of the gold, so predictions
for other queries do not count (strict checks belong to
:func:`~.predictions.validate_predictions`). Nothing is rounded here; round for display only.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Iterable, Mapping, Sequence

import numpy as np

from ..errors import DataError
from .predictions import IMAGE_TO_TEXT, TEXT_TO_IMAGE, invert_gold, read_gold_t2i, validate_predictions

STANDARD_KS = (1, 5, 10)


def first_hit_ranks(
    predictions: Mapping[int, Sequence[int]],
    gold: Mapping[int, Collection[int]],
    max_k: int,
) -> np.ndarray:
    """0-based rank of the first gold item in each gold query's top ``max_k`` (``max_k`` if none).

    Entries follow the order of ``gold``. Raises :class:`DataError` when a gold query has no
    prediction or fewer than ``max_k`` predicted ids, because its recall would be undefined.
    """
    if isinstance(max_k, bool) or not isinstance(max_k, (int, np.integer)) or max_k < 1:
        raise ValueError(f"max_k must be a positive integer, got {max_k!r}")
    if not gold:
        raise DataError("gold", "no gold queries; recall is undefined")
    ranks = np.full(len(gold), max_k, dtype=np.int64)
    for i, (query_id, relevant) in enumerate(gold.items()):
        ranked = predictions.get(query_id)
        if ranked is None:
            raise DataError("predictions", "no prediction for this gold query", f"query {query_id}")
        if len(ranked) < max_k:
            raise DataError("predictions", f"{len(ranked)} predicted ids, recall@{max_k} needs at least {max_k}",
                            f"query {query_id}")
        if not isinstance(relevant, (set, frozenset)):
            relevant = set(relevant)
        for rank, item in enumerate(ranked[:max_k]):
            if item in relevant:
                ranks[i] = rank
                break
    return ranks


def recall_at_k(
    predictions: Mapping[int, Sequence[int]],
    gold: Mapping[int, Collection[int]],
    ks: Sequence[int] = STANDARD_KS,
) -> dict[str, float]:
    """``{"r1": R@1, "r5": R@5, ...}`` in percent, one entry per ``k`` in ``ks`` (in that order)."""
    ks = _check_ks(ks)
    ranks = first_hit_ranks(predictions, gold, max(ks))
    return {f"r{k}": _percent(ranks, k) for k in ks}


def recall_curve(
    predictions: Mapping[int, Sequence[int]],
    gold: Mapping[int, Collection[int]],
    max_k: int = 10,
) -> list[float]:
    """R@1 .. R@max_k in percent; element ``i`` is R@(i + 1)."""
    ranks = first_hit_ranks(predictions, gold, max_k)
    return [_percent(ranks, k) for k in range(1, max_k + 1)]


def direction_scores(
    predictions: Mapping[int, Sequence[int]],
    gold: Mapping[int, Collection[int]],
) -> dict[str, float]:
    """``{"r1", "r5", "r10", "mean_recall"}`` of one direction, in percent."""
    return scores_from_ranks(first_hit_ranks(predictions, gold, max(STANDARD_KS)))


def scores_from_ranks(ranks: np.ndarray) -> dict[str, float]:
    """:func:`direction_scores` from the first-hit ranks of its queries (:func:`first_hit_ranks`)."""
    ranks = np.asarray(ranks)
    # Fractions first and percent last, in the reference's order of operations, so the
    # numbers agree with the reference scorer to the last bit.
    fractions = [float(np.count_nonzero(ranks < k)) / ranks.size for k in STANDARD_KS]
    scores = {f"r{k}": fraction * 100 for k, fraction in zip(STANDARD_KS, fractions)}
    scores["mean_recall"] = sum(fractions) / len(fractions) * 100
    return scores


def score_directions(
    t2i_predictions: Mapping[int, Sequence[int]],
    i2t_predictions: Mapping[int, Sequence[int]],
    gold_t2i: Mapping[int, Collection[int]],
) -> dict:
    """Recall of both directions; the image-to-text gold is the inversion of ``gold_t2i``.

    Returns ``{"text_to_image": {...}, "image_to_text": {...}, "mean_recall": float}`` where the
    top-level mean recall is the mean of the two directions' mean recalls.
    """
    t2i = direction_scores(t2i_predictions, gold_t2i)
    i2t = direction_scores(i2t_predictions, invert_gold(gold_t2i))
    return {
        TEXT_TO_IMAGE: t2i,
        IMAGE_TO_TEXT: i2t,
        "mean_recall": (t2i["mean_recall"] + i2t["mean_recall"]) / 2,
    }


def score_prediction_files(
    texts_jsonl: str | os.PathLike,
    t2i_path: str | os.PathLike,
    i2t_path: str | os.PathLike,
    *,
    k: int,
    image_ids: Iterable[int] | None = None,
    text_ids: Iterable[int] | None = None,
    allow_extra_queries: bool = False,
) -> dict:
    """Validate both prediction files strictly against the split's texts jsonl, then score them.

    ``image_ids`` / ``text_ids``, when given, are the galleries the predicted ids must come
    from. ``allow_extra_queries`` admits prediction lines for queries without gold (images no
    text describes), which the reference scorer ignores too. Returns :func:`score_directions`.
    """
    ranks = prediction_file_ranks(read_gold_t2i(texts_jsonl), t2i_path, i2t_path, k=k, image_ids=image_ids,
                                  text_ids=text_ids, allow_extra_queries=allow_extra_queries)
    return scores_from_direction_ranks(ranks)


def prediction_file_ranks(
    gold_t2i: Mapping[int, Collection[int]],
    t2i_path: str | os.PathLike,
    i2t_path: str | os.PathLike,
    *,
    k: int,
    image_ids: Iterable[int] | None = None,
    text_ids: Iterable[int] | None = None,
    allow_extra_queries: bool = False,
) -> dict[str, np.ndarray]:
    """``{direction: first-hit ranks}`` of both prediction files, validated strictly against the gold
    (as in :func:`score_prediction_files`); ranks follow the gold's query order, misses are 10."""
    t2i = validate_predictions(t2i_path, TEXT_TO_IMAGE, gold_t2i, k=k, gallery_ids=image_ids,
                               allow_extra_queries=allow_extra_queries)
    gold_i2t = invert_gold(gold_t2i)
    i2t = validate_predictions(i2t_path, IMAGE_TO_TEXT, gold_i2t, k=k, gallery_ids=text_ids,
                               allow_extra_queries=allow_extra_queries)
    max_k = max(STANDARD_KS)
    return {TEXT_TO_IMAGE: first_hit_ranks(t2i, gold_t2i, max_k), IMAGE_TO_TEXT: first_hit_ranks(i2t, gold_i2t, max_k)}


def scores_from_direction_ranks(ranks: Mapping[str, np.ndarray]) -> dict:
    """:func:`score_directions` from ``{direction: first-hit ranks}``."""
    t2i = scores_from_ranks(ranks[TEXT_TO_IMAGE])
    i2t = scores_from_ranks(ranks[IMAGE_TO_TEXT])
    return {TEXT_TO_IMAGE: t2i, IMAGE_TO_TEXT: i2t, "mean_recall": (t2i["mean_recall"] + i2t["mean_recall"]) / 2}


def _percent(ranks: np.ndarray, k: int) -> float:
    return float(np.count_nonzero(ranks < k)) / ranks.size * 100


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks:
        raise ValueError("ks is empty")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"every k must be a positive integer, got {k!r}")
    if len(set(ks)) != len(ks):
        raise ValueError(f"ks has repeated values: {ks}")
    return tuple(int(k) for k in ks)
