"""Exact inner-product top-k search between two feature sets, in bounded memory.

Queries are ranked a chunk at a time, one chunk per thread and one thread per core: each thread
computes its chunk's scores against the whole gallery (a single-threaded BLAS product, see
:mod:`.blas`) and selects the best of them while they are still in its cache, with a selection
that touches every score once and sorts only a handful of candidates per query. The full
``queries x gallery`` score matrix never exists. :func:`topk_search_both` also ranks the queries
for every gallery item from the same chunks, so both retrieval directions cost one product, and
each gallery item's running list of best queries soon sets a floor that most later scores miss.

Why a chunk per thread rather than one multi-threaded product followed by a split selection:
OpenBLAS's worker threads keep spinning for a while after each product, and the selection that
followed ran on cores they still held. At the COCO 5K shape that pattern cost about 1.5x one
bare product; each thread doing its own product and selection cost 1.14-1.37x over seven runs
(2026-12-06; ``project_over_bare`` in docs/benchmarks.md has the latest figure).

Order of results
    Descending score; equal scores in ascending gallery position (row order of the gallery
    set). This is the order the reference script produces (a stable sort of the gallery in
    file order), and the order of ``np.argsort(-scores, kind="stable")``.

Reproducibility
    BLAS libraries pick kernels by matrix shape, and different kernels round the same dot
    product differently in the last bit. Every product is therefore computed, on one thread, on
    rows whose start and count the number of queries alone sets: blocks of :data:`PRODUCT_ROWS`
    query rows starting at multiples of it, then the last, shorter block whole (up to
    ``_TAIL_ROWS`` rows) or in two parts split at a multiple of ``_TAIL_ROWS``, each zero-padded
    to the next multiple of ``_TAIL_ROWS``. Each score, and with it the ranking, is so
    bit-identical whatever ``chunk_size`` and the number of cores are (for a given BLAS build and
    query set).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np

from ..config import MODELS_SCHEMA, schema_default
from ..errors import DataError
from .blas import inner_products, single_threaded_blas
from .features import FeatureSet, load_any_features
from .predictions import IMAGE_TO_TEXT, TEXT_TO_IMAGE, write_predictions

log = logging.getLogger(__name__)

# Query rows per BLAS call. Each call packs the whole gallery for the BLAS kernel, so fewer, larger
# calls spend less on packing: at the COCO 5K shape, ranking on 1,024-row calls took 0.545 s against
# 0.624 s on 256-row calls and 0.594 s on 2,048-row calls (best of 8, 2 threads).
PRODUCT_ROWS = 1024

# The last block of queries, when shorter, is padded to a multiple of this many rows, not to a full
# block, and when longer split in two parts at a multiple of it, so two threads can share it at no
# extra padding: at the COCO 5K shape (24 full blocks and 424 rows) each thread can then compute
# 12 full products and one of 256 rows, where one thread computed a 512-row product (1,024 before
# the padding) after the other had finished.
_TAIL_ROWS = 128

# Query rows a thread scores and ranks per pass (eval.chunk_size); rounded up to a multiple of
# PRODUCT_ROWS. Extra memory is about threads x chunk x gallery x 4 bytes: 40 MB on 2 cores against
# a 5,000-image gallery, against 500 MB for the full 25,000-query score matrix.
DEFAULT_CHUNK_SIZE = schema_default(MODELS_SCHEMA, "eval", "chunk_size")

# Scores folded into one block maximum before the threshold search. The sort that finds each
# query's threshold then runs on 1/24 of the scores, while the candidates it leaves (about k
# blocks of 24) stay cheap to sort. At the COCO 5K shape 24 and 32 ranked 3% faster than 16.
_FOLD = 24

# Threads that rank chunks side by side: the cores this process may run on.
RANKING_THREADS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _product_rows(rows: int) -> int:
    """Rows of the product that scores ``rows`` query rows: a full block, or for a part of the last,
    shorter block the next multiple of :data:`_TAIL_ROWS`, so that product costs about what its
    rows need."""
    return min(PRODUCT_ROWS, -(-rows // _TAIL_ROWS) * _TAIL_ROWS)


def _query_chunks(n_queries: int, chunk_rows: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of the chunks of query rows, in order: chunks of ``chunk_rows`` over the full
    :data:`PRODUCT_ROWS` blocks, then the last, shorter block in two parts when it is longer than
    ``_TAIL_ROWS``, so two threads share it instead of one computing it while the other waits
    (Flickr30k's 5,000 texts: 4 full blocks and 904 rows, 3 blocks' work on one thread against 2.5 on
    each). The split is at the multiple of ``_TAIL_ROWS`` nearest above the middle, so the parts
    together need no more padding than the whole block, and it depends on the number of queries
    alone, as the products' shapes must."""
    full = n_queries - n_queries % PRODUCT_ROWS
    chunks = [(start, min(start + chunk_rows, full)) for start in range(0, full, chunk_rows)]
    tail = n_queries - full
    if tail > _TAIL_ROWS:
        split = full + -(-tail // (2 * _TAIL_ROWS)) * _TAIL_ROWS
        chunks += [(full, split), (split, n_queries)]
    elif tail:
        chunks.append((full, n_queries))
    return chunks


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


def _rank_chunks(queries: FeatureSet, gallery: FeatureSet, chunk_size: int, rank_chunk, *, progress: str = ""):
    """Call ``rank_chunk(thread, start, stop, scores)`` with the scores of every chunk of query rows
    ``start:stop`` against the whole gallery, chunks in ascending order per thread.

    ``thread`` numbers the calling thread (0 .. threads - 1); ``scores`` is that thread's buffer,
    reused for its next chunk. The first error (in query order) is raised once every thread has
    stopped.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if queries.dim != gallery.dim:
        raise ValueError(f"queries have {queries.dim} dimensions, the gallery has {gallery.dim}")
    gallery_vectors = np.ascontiguousarray(gallery.vectors, dtype=np.float32)
    _finite_rows(gallery_vectors, gallery.ids, 0, "gallery")
    n_queries, n_gallery = len(queries), len(gallery)
    chunk_rows = -(-int(chunk_size) // PRODUCT_ROWS) * PRODUCT_ROWS
    chunk_rows = min(chunk_rows, -(-max(n_queries, 1) // PRODUCT_ROWS) * PRODUCT_ROWS)
    pending = _query_chunks(n_queries, chunk_rows)[::-1]
    threads = max(1, min(RANKING_THREADS, len(pending)))
    lock, errors, done = threading.Lock(), [], [0]
    started = time.perf_counter()

    def work(thread: int) -> None:
        scores = np.empty((chunk_rows, n_gallery), dtype=np.float32)
        padded = np.zeros((PRODUCT_ROWS, queries.dim), dtype=np.float32)
        while True:
            with lock:
                if not pending or errors:
                    return
                start, stop = pending.pop()
            try:
                block = np.asarray(queries.vectors[start:stop])
                _finite_rows(block, queries.ids, start, "query")
                for offset in range(0, stop - start, PRODUCT_ROWS):
                    rows = block[offset:offset + PRODUCT_ROWS]
                    product_rows = _product_rows(rows.shape[0])
                    if rows.shape[0] < product_rows or not rows.flags.c_contiguous or rows.dtype != np.float32:
                        padded[:rows.shape[0]] = rows
                        padded[rows.shape[0]:] = 0.0
                        rows = padded[:product_rows]
                    inner_products(rows, gallery_vectors, scores[offset:offset + product_rows])
                rank_chunk(thread, start, stop, scores[:stop - start])
            except Exception as error:  # noqa: BLE001  (re-raised below, in query order)
                with lock:
                    errors.append((start, error))
                return
            if progress:
                with lock:
                    done[0] += stop - start
                    log.info("%s: %d/%d queries ranked against %d (%.1fs)",
                             progress, done[0], n_queries, n_gallery, time.perf_counter() - started)

    with single_threaded_blas(), ThreadPoolExecutor(max_workers=threads) as pool:
        for future in [pool.submit(work, thread) for thread in range(threads)]:
            future.result()
    if errors:
        raise min(errors, key=lambda pair: pair[0])[1]


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
    ``threads * chunk_rows * len(gallery) * 4`` bytes for the score blocks, plus the outputs.
    Queries may be memory-mapped (read one chunk at a time); the gallery is read whole, as every
    chunk needs all of it.

    Raises ``ValueError`` for ``k`` outside ``1..len(gallery)`` (the prediction format needs
    exactly ``k`` distinct ids per query), for mismatched dimensions and for non-finite vectors.
    """
    k = _check_k(k, len(gallery))
    n_queries = len(queries)
    top_ids = np.empty((n_queries, k), dtype=np.int64)
    top_scores = np.empty((n_queries, k), dtype=np.float32)

    def rank_chunk(thread, start, stop, scores):
        positions, values = select_topk(scores, k)
        top_ids[start:stop] = gallery.ids[positions]
        top_scores[start:stop] = values

    _rank_chunks(queries, gallery, chunk_size, rank_chunk, progress=f"top-{k}" if progress else "")
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
    ranks by the same number either way; only the chunks of score rows in hand are in memory.

    Each thread keeps a running list of every gallery item's best queries among its chunks. Once
    an item's list is full, its k-th score is a floor: a later chunk's score below it cannot enter
    the list, and block maxima over the chunk's queries find the few scores that reach it.
    """
    k_queries = _check_k(k_queries, len(gallery))
    k_gallery = _check_k(k_gallery, len(queries), "the query set")
    n_queries, n_gallery = len(queries), len(gallery)
    top_ids = np.empty((n_queries, k_queries), dtype=np.int64)
    top_scores = np.empty((n_queries, k_queries), dtype=np.float32)
    no_list = (np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float32))
    # Per thread: (gallery item, query position, score) of each item's best queries so far,
    # ordered by item and then best first, at most k_gallery per item.
    running: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def rank_chunk(thread, start, stop, scores):
        positions, values = select_topk(scores, k_queries)
        top_ids[start:stop] = gallery.ids[positions]
        top_scores[start:stop] = values
        items, query_pos, item_vals = running.get(thread, no_list)
        floor = _kth_per_row(items, item_vals, n_gallery, k_gallery)
        cand_rows, cand_items, cand_vals = _column_candidates(scores, floor, k_gallery)
        items = np.concatenate([items, cand_items])
        query_pos = np.concatenate([query_pos, cand_rows + start])
        item_vals = np.concatenate([item_vals, cand_vals])
        keep = _ranked_per_row(items, item_vals, query_pos, n_gallery, k_gallery)
        running[thread] = items[keep], query_pos[keep], item_vals[keep]

    _rank_chunks(queries, gallery, chunk_size, rank_chunk,
                 progress=f"top-{k_queries}/{k_gallery} both ways" if progress else "")
    # Every thread's list is exact for its own chunks, so the best of their union is exact.
    items, query_pos, item_vals = (np.concatenate(parts) for parts in zip(no_list, *running.values()))
    take = _best_per_row(items, item_vals, query_pos, n_gallery, k_gallery)
    return ((queries.ids.copy(), top_ids, top_scores),
            (gallery.ids.copy(), queries.ids[query_pos[take]], item_vals[take]))


def _kth_per_row(rows: np.ndarray, values: np.ndarray, n_rows: int, k: int) -> np.ndarray:
    """Each row's k-th value from lists ordered by row and then best first; -inf where a row has
    fewer than ``k`` entries."""
    counts = np.bincount(rows, minlength=n_rows)
    kth = np.full(n_rows, -np.inf, dtype=np.float32)
    full = counts >= k
    kth[full] = values[(np.cumsum(counts) - 1)[full]]
    return kth


def _column_candidates(scores: np.ndarray, floor: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(rows, columns, values)`` of the scores that may be among their column's ``k`` best once
    merged with lists whose k-th values are ``floor`` (-inf for a list not yet full): every score
    at least as high as the floor and as the column's own lower bound, ties included.

    The same block-maxima method as :func:`select_topk`, folded over rows: block maxima are
    elementwise maxima of whole rows, one pass over the scores.
    """
    n_rows, n_cols = scores.shape
    fold = max(1, min(_FOLD, n_rows // k))
    width = n_rows // fold
    blocks = scores[:fold * width].reshape(fold, width, n_cols)
    maxima = blocks.max(axis=0)
    threshold = floor
    if k <= width and np.isneginf(floor).any():
        # The k-th largest block maximum of a column is a lower bound on its k-th best score.
        threshold = np.maximum(floor, np.sort(maxima, axis=0)[width - k])
    hit_blocks, hit_cols = np.divmod(np.flatnonzero(maxima >= threshold), n_cols)
    hit_vals = blocks[:, hit_blocks, hit_cols]
    member, hit = np.divmod(np.flatnonzero(hit_vals >= threshold[hit_cols]), hit_cols.size)
    rows, cols, values = hit_blocks[hit] + width * member, hit_cols[hit], hit_vals[member, hit]
    if fold * width < n_rows:
        tail_rows, tail_cols = np.nonzero(scores[fold * width:] >= threshold)
        tail_rows += fold * width
        rows = np.concatenate([rows, tail_rows])
        cols = np.concatenate([cols, tail_cols])
        values = np.concatenate([values, scores[tail_rows, tail_cols]])
    return rows, cols, values


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
    # A full sort of the short maxima rows: numpy sorts with AVX-512 where the CPU has it, which
    # is 2-3x faster here than np.partition's per-row selection.
    threshold = np.sort(maxima, axis=1)[:, width - k]

    hit_rows, hit_blocks = np.divmod(np.flatnonzero(maxima >= threshold[:, None]), width)
    hit_vals = blocks[hit_rows, :, hit_blocks]
    # Only the few hit entries that reach the threshold become candidates. (Flat positions and
    # divmod: 2.5x faster than np.nonzero's two index arrays on this shape.)
    hit, member = np.divmod(np.flatnonzero(hit_vals >= threshold[hit_rows][:, None]), fold)
    cand_rows, cand_pos, cand_vals = hit_rows[hit], hit_blocks[hit] + width * member, hit_vals[hit, member]
    if fold * width < n_cols:
        tail_rows, tail_cols = np.nonzero(scores[:, fold * width:] >= threshold[:, None])
        tail_pos = tail_cols + fold * width
        cand_rows = np.concatenate([cand_rows, tail_rows])
        cand_pos = np.concatenate([cand_pos, tail_pos])
        cand_vals = np.concatenate([cand_vals, scores[tail_rows, tail_pos]])

    take = _best_per_row(cand_rows, cand_vals, cand_pos, n_rows, k)
    return cand_pos[take].astype(np.int64, copy=False), cand_vals[take]


def _best_per_row(rows: np.ndarray, values: np.ndarray, positions: np.ndarray, n_rows: int, k: int) -> np.ndarray:
    """``[n_rows, k]`` indices into the candidates: each row's ``k`` best, by value descending and
    then position ascending. Every row must have at least ``k`` candidates."""
    return _ranked_per_row(rows, values, positions, n_rows, k).reshape(n_rows, k)


def _ranked_per_row(rows: np.ndarray, values: np.ndarray, positions: np.ndarray, n_rows: int, k: int) -> np.ndarray:
    """Indices of each row's best ``k`` candidates (all of them where a row has fewer), ordered by
    row and then by value descending and position ascending."""
    order = _row_value_position_order(rows, values, positions)
    counts = np.bincount(rows, minlength=n_rows)
    rank = np.arange(order.size) - np.repeat(np.cumsum(counts) - counts, counts)
    return order[rank < k]


def _row_value_position_order(rows: np.ndarray, values: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """The order that sorts candidates by row, then value descending, then position ascending."""
    if values.dtype == np.float32 and values.size:
        # Row and value fit one 64-bit key whose ascending order is (row, value descending): one
        # argsort instead of lexsort's three passes. Positions matter only among equal keys.
        bits = (values + np.float32(0)).view(np.uint32)  # + 0 makes -0.0 equal to 0.0
        ascending = np.where(bits >> np.uint32(31), ~bits, bits | np.uint32(0x80000000))
        key = (rows.astype(np.uint64) << np.uint64(32)) | (~ascending).astype(np.uint64)
        order = np.argsort(key)
        ordered = key[order]
        if not (ordered[1:] == ordered[:-1]).any():
            return order
    return np.lexsort((positions, -values, rows))


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
