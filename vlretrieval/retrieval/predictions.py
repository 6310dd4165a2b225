"""Top-k prediction files and gold annotations in the reference jsonl formats.

Predictions (one object per line, ids best first)::

    text to image:  {"text_id": 7, "image_ids": [3, 9, ...]}
    image to text:  {"image_id": 3, "text_ids": [7, 12, ...]}

Gold annotations are the split's texts jsonl (``{"text_id", "text", "image_ids"}``, the
text-to-image gold) and its inversion, the reference ``*.tr.jsonl`` (``{"image_id",
"text_ids"}``). Files written here are accepted unchanged by the reference evaluation scripts;
files read here are checked more strictly than those scripts do, and every problem is
reported with its file, line and query id.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from ..errors import DataError
from ..io import atomic_open, iter_jsonl_objects

TEXT_TO_IMAGE = "text_to_image"
IMAGE_TO_TEXT = "image_to_text"
DIRECTIONS = (TEXT_TO_IMAGE, IMAGE_TO_TEXT)

# (query key, result key) of each direction's prediction lines.
_KEYS = {
    TEXT_TO_IMAGE: ("text_id", "image_ids"),
    IMAGE_TO_TEXT: ("image_id", "text_ids"),
}
_ALIASES = {"t2i": TEXT_TO_IMAGE, "i2t": IMAGE_TO_TEXT}


def normalize_direction(direction: str) -> str:
    """Return the canonical direction name; ``t2i`` and ``i2t`` are accepted as aliases."""
    canonical = _ALIASES.get(direction, direction)
    if canonical not in _KEYS:
        raise ValueError(f"unknown direction {direction!r}; expected one of {', '.join(DIRECTIONS)} (or t2i, i2t)")
    return canonical


def direction_keys(direction: str) -> tuple[str, str]:
    """``(query_key, result_key)`` used by the prediction lines of ``direction``."""
    return _KEYS[normalize_direction(direction)]


# ---------------------------------------------------------------------------------------------
# predictions


def write_predictions(path: str | os.PathLike, direction: str, query_ids: Any, topk_ids: Any) -> None:
    """Write one prediction line per query, in the given order, atomically.

    ``query_ids`` has shape ``(n,)`` and ``topk_ids`` ``(n, k)``; both must be integer arrays
    (or nested lists of ints). Query ids must be unique and every row free of repeats, since
    the reference evaluation rejects either.
    """
    query_key, result_key = direction_keys(direction)
    query_ids = np.asarray(query_ids)
    topk_ids = np.asarray(topk_ids)
    if query_ids.ndim != 1 or query_ids.dtype.kind not in "iu":
        raise ValueError(f"query_ids must be a 1-D integer array, got shape {query_ids.shape}, dtype {query_ids.dtype}")
    if topk_ids.ndim != 2 or topk_ids.dtype.kind not in "iu":
        raise ValueError(f"topk_ids must be a 2-D integer array, got shape {topk_ids.shape}, dtype {topk_ids.dtype}")
    if topk_ids.shape[0] != query_ids.shape[0]:
        raise ValueError(f"{query_ids.shape[0]} query ids but {topk_ids.shape[0]} rows of results")
    if np.unique(query_ids).size != query_ids.size:
        raise ValueError(f"query_ids contain duplicates; each {query_key} must appear once")
    if topk_ids.shape[1] > 1:
        sorted_rows = np.sort(topk_ids, axis=1)
        repeated = (sorted_rows[:, 1:] == sorted_rows[:, :-1]).any(axis=1)
        if repeated.any():
            row = int(np.flatnonzero(repeated)[0])
            raise ValueError(f"{result_key} of {query_key}={int(query_ids[row])} contain a repeated id")
    with atomic_open(path) as handle:
        for query_id, result_ids in zip(query_ids.tolist(), topk_ids.tolist()):
            # json.dumps defaults match the reference writer byte for byte.
            handle.write(json.dumps({query_key: query_id, result_key: result_ids}))
            handle.write("\n")


def read_predictions(path: str | os.PathLike, direction: str, *, k: int | None = None) -> dict[int, list[int]]:
    """Read a prediction file into ``{query_id: [result ids, best first]}``.

    Checks every line on its own: JSON object, integer query id seen once, a list of ``k``
    distinct integer ids (when ``k`` is None, every line must have as many as the first).
    :func:`validate_predictions` adds the checks against the gold and the gallery.
    """
    return {query_id: ids for _, query_id, ids in _iter_prediction_lines(path, direction, k)}


def validate_predictions(
    path: str | os.PathLike,
    direction: str,
    gold: Mapping[int, Collection[int]],
    *,
    k: int | None,
    gallery_ids: Iterable[int] | None = None,
    allow_extra_queries: bool = False,
) -> dict[int, list[int]]:
    """Read ``path`` and check it against the gold of the same direction.

    On top of :func:`read_predictions`: every gold query has a line, no line names a query
    outside the gold (unless ``allow_extra_queries``, for galleries whose items are not all
    annotated, which the reference scorer ignores), and every predicted id belongs to
    ``gallery_ids`` when that is given. Returns the predictions.
    """
    query_key, result_key = direction_keys(direction)
    path = str(path)
    gallery = None if gallery_ids is None else {int(i) for i in gallery_ids}
    predictions: dict[int, list[int]] = {}
    for line_no, query_id, ids in _iter_prediction_lines(path, direction, k):
        where, record = f"{path}:{line_no}", f"{query_key}={query_id}"
        if query_id not in gold and not allow_extra_queries:
            raise DataError(where, f"{query_key} {query_id} is not a query of the gold annotations", record)
        if gallery is not None:
            for rank, item in enumerate(ids):
                if item not in gallery:
                    raise DataError(where, f"{result_key}[{rank}]={item} is not in the gallery", record)
        predictions[query_id] = ids
    missing = [query_id for query_id in gold if query_id not in predictions]
    if missing:
        shown = ", ".join(str(q) for q in missing[:10]) + (", ..." if len(missing) > 10 else "")
        raise DataError(path, f"no prediction line for {len(missing)} of {len(gold)} gold queries "
                              f"({query_key}: {shown})", f"{query_key}={missing[0]}")
    return predictions


def _iter_prediction_lines(path: str | os.PathLike, direction: str,
                           k: int | None) -> Iterator[tuple[int, int, list[int]]]:
    query_key, result_key = direction_keys(direction)
    path = str(path)
    if k is not None and (isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1):
        raise ValueError(f"k must be a positive integer or None, got {k!r}")
    seen: dict[int, int] = {}
    expected = None if k is None else int(k)
    for where, line_no, obj in iter_jsonl_objects(
        path, blank_hint=" (the reference evaluation cannot parse it)"
    ):
        if query_key not in obj:
            raise DataError(where, f"missing {query_key}")
        query_id = obj[query_key]
        if type(query_id) is not int:
            raise DataError(where, f"{query_key} must be an integer, found {_describe(query_id)}")
        record = f"{query_key}={query_id}"
        if query_id in seen:
            raise DataError(where, f"duplicate {query_key}, first predicted on line {seen[query_id]}", record)
        seen[query_id] = line_no
        if result_key not in obj:
            raise DataError(where, f"missing {result_key}", record)
        ids = obj[result_key]
        if not isinstance(ids, list):
            raise DataError(where, f"{result_key} must be a list, found {_describe(ids)}", record)
        for rank, item in enumerate(ids):
            if type(item) is not int:
                raise DataError(where, f"{result_key}[{rank}] must be an integer, found {_describe(item)}",
                                record)
        if expected is None:
            if not ids:
                raise DataError(where, f"{result_key} is empty", record)
            expected = len(ids)
        if len(ids) != expected:
            source = "" if k is not None else " (as on the first line)"
            raise DataError(where, f"expected {expected} {result_key}{source}, found {len(ids)}", record)
        if len(set(ids)) != len(ids):
            repeated = next(item for i, item in enumerate(ids) if item in ids[:i])
            raise DataError(where, f"{result_key} repeat id {repeated}", record)
        yield line_no, query_id, ids


def _describe(value: Any) -> str:
    return f"{json.dumps(value, ensure_ascii=False)[:60]} ({type(value).__name__})"


# ---------------------------------------------------------------------------------------------
# gold


def read_gold_t2i(path: str | os.PathLike) -> dict[int, set[int]]:
    """Text-to-image gold from a texts jsonl: ``{text_id: {image_id, ...}}`` in file order.

    A text without images could never be retrieved correctly, which silently lowers recall,
    so it is rejected like any other malformed line.
    """
    return _read_gold(path, "text_id", "image_ids")


def read_gold_i2t(path: str | os.PathLike) -> dict[int, set[int]]:
    """Image-to-text gold from a reference ``*.tr.jsonl``: ``{image_id: {text_id, ...}}``."""
    return _read_gold(path, "image_id", "text_ids")


def invert_gold(gold_t2i: Mapping[int, Iterable[int]]) -> dict[int, set[int]]:
    """``{image_id: {text_id, ...}}`` from text-to-image gold.

    Images appear in order of their first mention (texts in mapping order, each text's images
    in ascending id order), so the result and the files written from it are deterministic.
    Images no text mentions have no gold and are absent.
    """
    inverted: dict[int, set[int]] = {}
    for text_id, image_ids in gold_t2i.items():
        for image_id in sorted(image_ids):
            inverted.setdefault(image_id, set()).add(text_id)
    return inverted


def write_tr_gold(path: str | os.PathLike, gold_t2i: Mapping[int, Iterable[int]]) -> dict[int, set[int]]:
    """Write the image-to-text gold (reference ``*.tr.jsonl``) of text-to-image gold, atomically.

    Lines are ``{"image_id": int, "text_ids": [ascending ints]}`` in :func:`invert_gold` order.
    Returns the inverted gold.
    """
    inverted = invert_gold(gold_t2i)
    with atomic_open(path) as handle:
        for image_id, text_ids in inverted.items():
            handle.write(json.dumps({"image_id": int(image_id), "text_ids": sorted(int(t) for t in text_ids)}))
            handle.write("\n")
    return inverted


def tr_gold_path(texts_path: str | os.PathLike) -> str:
    """The reference name of the image-to-text gold next to a texts jsonl (``x.jsonl`` -> ``x.tr.jsonl``)."""
    texts_path = os.fspath(texts_path)
    stem = texts_path[: -len(".jsonl")] if texts_path.endswith(".jsonl") else texts_path
    return stem + ".tr.jsonl"


def _read_gold(path: str | os.PathLike, query_key: str, result_key: str) -> dict[int, set[int]]:
    path = str(path)
    gold: dict[int, set[int]] = {}
    first_line: dict[int, int] = {}
    for where, line_no, obj in iter_jsonl_objects(path, skip_blank=True):
        query_id = obj.get(query_key)
        if type(query_id) is not int:
            raise DataError(where, f"{query_key} must be an integer, found {_describe(query_id)}")
        record = f"{query_key}={query_id}"
        if query_id in gold:
            raise DataError(where, f"duplicate {query_key}, first seen on line {first_line[query_id]}", record)
        ids = obj.get(result_key)
        if not isinstance(ids, list) or not ids:
            raise DataError(where, f"{result_key} must be a non-empty list of integers, found {_describe(ids)}",
                            record)
        for rank, item in enumerate(ids):
            if type(item) is not int:
                raise DataError(where, f"{result_key}[{rank}] must be an integer, found {_describe(item)}",
                                record)
        gold[query_id] = set(ids)
        first_line[query_id] = line_no
    if not gold:
        raise DataError(path, "no annotations in file")
    return gold
