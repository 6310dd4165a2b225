"""Exact inner-product top-k search between two feature sets, in bounded memory.

Queries are ranked a chunk at a time: one BLAS product of the chunk against the whole
gallery, then a selection that touches every score once and sorts only a handful of
candidates per query, split by rows over every core. The full ``queries x gallery`` score
matrix never exists. :func:`topk_search_both` also ranks the queries for every gallery item
from the same chunks, so both retrieval directions cost one product.

Order of results
    Descending score; equal scores in ascending gallery position (row order of the gallery
    set). This is the order the reference script produces (a stable sort of the gallery in
    file order), and the order of ``np.argsort(-scores, kind="stable")``.

Reproducibility
    BLAS libraries pick kernels by matrix shape, and different kernels round the same dot
    product differently in the last bit. Every product is therefore computed on a block of
    exactly :data:`PRODUCT_ROWS` query rows (the last block zero-padded), so each score, and
    with it the ranking, is bit-identical whatever ``chunk_size`` is (for a given BLAS build
    and thread count).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np

from ..config import MODELS_SCHEMA, schema_default
from ..errors import DataError
from .features import FeatureSet, load_any_features
from .predictions import IMAGE_TO_TEXT, TEXT_TO_IMAGE, write_predictions

log = logging.getLogger(__name__)

# Query rows per BLAS call. Against a 5,000 x 768 gallery, OpenBLAS sgemm on 256-row blocks
# runs within about 10% of its speed on much larger blocks, while 64-row blocks are about
# 1.5x slower; 256 also keeps the smallest possible score block small.
PRODUCT_ROWS = 256

# Query rows ranked per selection pass (eval.chunk_size); rounded up to a multiple of
# PRODUCT_ROWS. Timings from 256 to 4,096 rows were equal within noise at COCO 5K scale, so the
# default is the smaller block: 20 MB of scores at 5,000 gallery rows, against 500 MB for the full
# 25,000-query matrix.
DEFAULT_CHUNK_SIZE = schema_default(MODELS_SCHEMA, "eval", "chunk_size")

# Scores folded into one block maximum before the threshold search. The partition that finds
# each query's threshold then runs on 1/16 of the scores, while the candidates it leaves
# (about k blocks of 16) stay cheap to sort.
_FOLD = 16

# Threads the selection of a chunk is split over: the cores this process may run on, the same
# cores BLAS used for the product just before it.
SELECTION_THREADS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
# Below this many rows per thread, the fixed cost of a selection call outweighs the split.
_MIN_SELECTION_ROWS = 64


def _check_k(k, n_gallery: int, what: str = "the gallery") -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if k > n_gallery:
        raise ValueError(f"k={k} exceeds {what} size {n_gallery}; every query needs exactly k distinct results")
    return int(k)


def _finite_rows(vectors: np.ndarray, ids: np.ndarray, first_row: int, what: str) -> None:
    finite = np.isfinite(vectors).all(axis=1)
    if not finite.all():
        row = first_row + int(np.flatnonzero(~finite)[0])
        raise ValueError(f"{what} row {row} (id={int(ids[row])}) has NaN or infinite values")


def _score_blocks(queries: FeatureSet, gallery: FeatureSet, chunk_size: int):
    """Yield ``(start, stop, scores)``: the scores of query rows ``start:stop`` against the whole
    gallery, one chunk at a time, in a buffer reused for every chunk."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if queries.dim != gallery.dim:
        raise ValueError(f"queries have {queries.dim} dimensions, the gallery has {gallery.dim}")
    gallery_vectors = np.ascontiguousarray(gallery.vectors)
    _finite_rows(gallery_vectors, gallery.ids, 0, "gallery")
    gallery_t = gallery_vectors.T

    n_queries = len(queries)
    chunk_rows = -(-int(chunk_size) // PRODUCT_ROWS) * PRODUCT_ROWS
    chunk_rows = min(chunk_rows, -(-max(n_queries, 1) // PRODUCT_ROWS) * PRODUCT_ROWS)
    scores = np.empty((chunk_rows, len(gallery)), dtype=np.float32)
    padded = np.zeros((PRODUCT_ROWS, queries.dim), dtype=np.float32)
    for start in range(0, n_queries, chunk_rows):
        stop = min(start + chunk_rows, n_queries)
        block = np.asarray(queries.vectors[start:stop])
        _finite_rows(block, queries.ids, start, "query")
        for offset in range(0, stop - start, PRODUCT_ROWS):
            rows = block[offset:offset + PRODUCT_ROWS]
            out = scores[offset:offset + PRODUCT_ROWS]
            if rows.shape[0] < PRODUCT_ROWS or not rows.flags.c_contiguous or rows.dtype != np.float32:
                padded[:rows.shape[0]] = rows
                padded[rows.shape[0]:] = 0.0
                rows = padded
            np.matmul(rows, gallery_t, out=out)
        yield start, stop, scores[:stop - start]


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    bounds = np.linspace(0, n, parts + 1).astype(int)
    return [(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]


def _workers(rows: int) -> int:
    return max(1, min(SELECTION_THREADS, rows // _MIN_SELECTION_ROWS))


def topk_search(
    queries: FeatureSet,
    gallery: FeatureSet,
    k: int,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rank the whole gallery for every query by inner product and keep the best ``k``.

    Returns ``(query_ids, topk_gallery_ids, topk_scores)``: ``(nq,)`` int64, ``(nq, k)``
    int64 and ``(nq, k)`` float32, rows in query order, columns best first. ``chunk_size``
    is rounded up to a multiple of :data:`PRODUCT_ROWS`; peak extra memory is about
    ``chunk_rows * len(gallery) * 4`` bytes for the score block, plus the outputs. Queries may
    be memory-mapped (read one chunk at a time); the gallery is read whole, as every chunk
    needs all of it.

    Raises ``ValueError`` for ``k`` outside ``1..len(gallery)`` (the prediction format needs
    exactly ``k`` distinct ids per query), for mismatched dimensions and for non-finite vectors.
    """
    k = _check_k(k, len(gallery))
    n_queries = len(queries)
    top_ids = np.empty((n_queries, k), dtype=np.int64)
    top_scores = np.empty((n_queries, k), dtype=np.float32)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=SELECTION_THREADS) as pool:
        for start, stop, scores in _score_blocks(queries, gallery, chunk_size):
            # BLAS ran on every core; the selection is row-independent and numpy releases the GIL
            # in its loops, so it runs on every core too instead of leaving all but one idle.
            pieces = [(lo, hi, pool.submit(select_topk, scores[lo:hi], k))
                      for lo, hi in _split(stop - start, _workers(stop - start))]
            for lo, hi, piece in pieces:
                positions, values = piece.result()
                top_ids[start + lo:start + hi] = gallery.ids[positions]
                top_scores[start + lo:start + hi] = values
            if progress:
                log.info("top-%d: %d/%d queries ranked against %d (%.1fs)",
                         k, stop, n_queries, len(gallery), time.perf_counter() - started)
    return queries.ids.copy(), top_ids, top_scores


def topk_search_both(
    queries: FeatureSet,
    gallery: FeatureSet,
    k_queries: int,
    k_gallery: int,
    *,
    chunk_size: int,
    progress: bool = False,
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Both directions from one product: the best ``k_queries`` gallery items of every query and
    the best ``k_gallery`` queries of every gallery item.

    Returns two ``(ids, topk_ids, topk_scores)`` triples as :func:`topk_search` does, the first
    equal to ``topk_search(queries, gallery, k_queries)`` and the second ranking the queries for
    each gallery item, in the same order (descending score, equal scores in ascending query
    position). Every score is computed once and both directions use that same value, so a pair
    ranks by the same number either way; only the chunk of score rows in hand is in memory, and
    each gallery item's running best list is merged with the chunk's best.
    """
    k_queries = _check_k(k_queries, len(gallery))
    k_gallery = _check_k(k_gallery, len(queries), "the query set")
    n_queries, n_gallery = len(queries), len(gallery)
    top_ids = np.empty((n_queries, k_queries), dtype=np.int64)
    top_scores = np.empty((n_queries, k_queries), dtype=np.float32)
    # Per gallery item: query positions and scores of its best queries so far, best first.
    best_pos = np.empty((n_gallery, 0), dtype=np.int64)
    best_val = np.empty((n_gallery, 0), dtype=np.float32)
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=SELECTION_THREADS) as pool:
        for start, stop, scores in _score_blocks(queries, gallery, chunk_size):
            rows = [(lo, hi, pool.submit(select_topk, scores[lo:hi], k_queries))
                    for lo, hi in _split(stop - start, _workers(stop - start))]
            k_chunk = min(k_gallery, stop - start)
            columns = [(lo, hi, pool.submit(select_topk, scores[:, lo:hi].T, k_chunk))
                       for lo, hi in _split(n_gallery, _workers(n_gallery))]
            for lo, hi, piece in rows:
                positions, values = piece.result()
                top_ids[start + lo:start + hi] = gallery.ids[positions]
                top_scores[start + lo:start + hi] = values
            chunk_pos = np.empty((n_gallery, k_chunk), dtype=np.int64)
            chunk_val = np.empty((n_gallery, k_chunk), dtype=np.float32)
            for lo, hi, piece in columns:
                positions, values = piece.result()
                chunk_pos[lo:hi] = positions + start
                chunk_val[lo:hi] = values
            # Earlier chunks hold lower query positions and each list is in (score desc, position
            # asc) order, so the stable selection over [best, chunk] keeps the order exact.
            merged_pos = np.concatenate([best_pos, chunk_pos], axis=1)
            merged_val = np.concatenate([best_val, chunk_val], axis=1)
            keep = min(k_gallery, merged_pos.shape[1])
            order, best_val = select_topk(merged_val, keep)
            best_pos = np.take_along_axis(merged_pos, order, axis=1)
            if progress:
                log.info("top-%d/%d both ways: %d/%d queries ranked against %d (%.1fs)",
                         k_queries, k_gallery, stop, n_queries, n_gallery, time.perf_counter() - started)
    return ((queries.ids.copy(), top_ids, top_scores),
            (gallery.ids.copy(), queries.ids[best_pos], best_val))


def select_topk(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions and values of the ``k`` best entries of every row, best first.

    Equal values are ordered by ascending position, exactly like the first ``k`` columns of
    ``np.argsort(-scores, axis=1, kind="stable")``, including ties that straddle the k-th place.

    Method: fold each row into ``B = n // f`` block maxima (block ``j`` holds positions
    ``j, j + B, j + 2B, ...``). The k-th largest block maximum ``t`` is a lower bound for the
    row's k-th largest value, since it is one of ``k`` distinct entries that are all ``>= t``.
    So every entry that can reach the top k, ties at the boundary included, is ``>= t`` and
    lies either in a block whose maximum is ``>= t`` or in the ``n - f*B`` tail positions no
    block covers. Only those candidates are sorted, by (value descending, position ascending).
    """
    if scores.ndim != 2:
        raise ValueError(f"expected a 2-D score array, got shape {scores.shape}")
    n_rows, n_cols = scores.shape
    if not 1 <= k <= n_cols:
        raise ValueError(f"k={k} must be between 1 and the number of columns {n_cols}")
    if n_rows == 0:
        return np.empty((0, k), dtype=np.int64), np.empty((0, k), dtype=scores.dtype)

    fold = max(1, min(_FOLD, n_cols // k))
    width = n_cols // fold
    # blocks[r, i, j] is scores[r, j + i * width]: a view, and the reduction over the middle
    # axis runs as elementwise maxima of whole rows, far faster than over a short inner axis.
    blocks = scores[:, :fold * width].reshape(n_rows, fold, width)
    maxima = blocks.max(axis=1)
    # NaN propagates into the maxima; a NaN block would hide its other entries from the search.
    if np.isnan(maxima).any() or np.isnan(scores[:, fold * width:]).any():
        raise ValueError("scores contain NaN; the inputs must be finite")
    threshold = np.partition(maxima, width - k, axis=1)[:, width - k]

    hit_rows, hit_blocks = np.nonzero(maxima >= threshold[:, None])
    cand_vals = blocks[hit_rows, :, hit_blocks]
    cand_pos = hit_blocks[:, None] + width * np.arange(fold)
    keep = cand_vals >= threshold[hit_rows][:, None]
    cand_rows = np.broadcast_to(hit_rows[:, None], keep.shape)[keep]
    cand_pos, cand_vals = cand_pos[keep], cand_vals[keep]
    tail = n_cols - fold * width
    if tail:
        tail_rows = np.repeat(np.arange(n_rows), tail)
        tail_pos = np.tile(np.arange(fold * width, n_cols), n_rows)
        tail_vals = scores[:, fold * width:].ravel()
        keep = tail_vals >= threshold[tail_rows]
        cand_rows = np.concatenate([cand_rows, tail_rows[keep]])
        cand_pos = np.concatenate([cand_pos, tail_pos[keep]])
        cand_vals = np.concatenate([cand_vals, tail_vals[keep]])

    # Primary key row, then value descending, then position ascending.
    order = np.lexsort((cand_pos, -cand_vals, cand_rows))
    counts = np.bincount(cand_rows, minlength=n_rows)
    starts = np.cumsum(counts) - counts
    take = order[starts[:, None] + np.arange(k)]
    return cand_pos[take].astype(np.int64, copy=False), cand_vals[take]


def rank_features(
    image_feats: str | os.PathLike,
    text_feats: str | os.PathLike,
    out_t2i: str | os.PathLike | None,
    out_i2t: str | os.PathLike | None,
    *,
    k: int,
    chunk_size: int,
    progress: bool = False,
) -> dict[str, int]:
    """Write text-to-image and image-to-text top-k prediction files from two feature sets.

    Each feature path is either a feature directory (:func:`~.features.save_features`) or a
    reference ``*.img_feat.jsonl`` / ``*.txt_feat.jsonl`` file (recognised by the ``.jsonl``
    suffix). Either output may be ``None`` to skip that direction. Returns the sizes involved.
    """
    if out_t2i is None and out_i2t is None:
        raise ValueError("nothing to do: both output paths are None")
    images = load_any_features(image_feats, "image")
    texts = load_any_features(text_feats, "text")
    if images.dim != texts.dim:
        raise DataError(str(text_feats), f"text features have {texts.dim} dimensions, "
                                         f"image features ({image_feats}) have {images.dim}")
    jobs = [
        (out_t2i, TEXT_TO_IMAGE, texts, images, image_feats),
        (out_i2t, IMAGE_TO_TEXT, images, texts, text_feats),
    ]
    for out, direction, queries, gallery, gallery_path in jobs:
        if out is not None and k > len(gallery):
            raise DataError(str(gallery_path), f"top-{k} {direction} predictions need at least {k} gallery items, "
                                               f"the file has {len(gallery)}")
    if out_t2i is not None and out_i2t is not None:
        # One product serves both directions: texts are the queries (the larger set, read a chunk
        # at a time), each image keeps its running best texts.
        t2i, i2t = topk_search_both(texts, images, k, k, chunk_size=chunk_size, progress=progress)
        write_predictions(out_t2i, TEXT_TO_IMAGE, t2i[0], t2i[1])
        write_predictions(out_i2t, IMAGE_TO_TEXT, i2t[0], i2t[1])
    else:
        for out, direction, queries, gallery, _ in jobs:
            if out is not None:
                query_ids, top_ids, _ = topk_search(queries, gallery, k, chunk_size=chunk_size, progress=progress)
                write_predictions(out, direction, query_ids, top_ids)
    return {"images": len(images), "texts": len(texts), "k": int(k)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vlretrieval.retrieval.topk",
        description="Exact top-k predictions (reference jsonl) from image and text features.",
    )
    parser.add_argument("--image-feats", required=True, type=Path,
                        help="feature directory or reference *.img_feat.jsonl")
    parser.add_argument("--text-feats", required=True, type=Path,
                        help="feature directory or reference *.txt_feat.jsonl")
    parser.add_argument("--out-t2i", type=Path, help="text-to-image predictions jsonl to write")
    parser.add_argument("--out-i2t", type=Path, help="image-to-text predictions jsonl to write")
    parser.add_argument("--top-k", type=int, default=schema_default(MODELS_SCHEMA, "eval", "top_k"),
                        help="predictions per query (default: eval.top_k of the model schema)")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE,
                        help="query rows ranked per pass (memory is about chunk-size x gallery x 4 bytes; "
                        "default: eval.chunk_size of the model schema)")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    if args.out_t2i is None and args.out_i2t is None:
        parser.error("give --out-t2i, --out-i2t or both")
    if args.top_k < 1 or args.chunk_size < 1:
        parser.error("--top-k and --chunk-size must be positive")
    try:
        sizes = rank_features(args.image_feats, args.text_feats, args.out_t2i, args.out_i2t,
                              k=args.top_k, chunk_size=args.chunk_size, progress=args.progress)
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    log.info("ranked %d texts against %d images, top-%d", sizes["texts"], sizes["images"], sizes["k"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
