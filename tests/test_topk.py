"""Exact top-k search: equal to a brute-force stable sort, ties included, for every chunk size."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from vlretrieval.errors import DataError
from vlretrieval.retrieval.features import FeatureSet, export_reference_jsonl, l2_normalize, save_features
from vlretrieval.retrieval.predictions import IMAGE_TO_TEXT, TEXT_TO_IMAGE, read_predictions
from vlretrieval.retrieval import topk
from vlretrieval.retrieval.topk import (
    PRODUCT_ROWS,
    main,
    rank_features,
    select_topk,
    topk_search,
    topk_search_both,
)

CHUNK_SIZES = (1, 7, PRODUCT_ROWS + 3, 100_000)


def brute_force(queries: FeatureSet, gallery: FeatureSet, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(queries.vectors) @ np.asarray(gallery.vectors).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return gallery.ids[order], np.take_along_axis(scores, order, axis=1)


def random_set(rng: np.random.Generator, n: int, dim: int, id_offset: int = 0) -> FeatureSet:
    ids = rng.permutation(n).astype(np.int64) * 3 + id_offset  # ids unrelated to positions
    return FeatureSet(ids, l2_normalize(rng.standard_normal((n, dim))))


def integer_set(rng: np.random.Generator, n: int, dim: int, low: int = -2, high: int = 3) -> FeatureSet:
    """Small integer vectors: every score is an exact small integer, so ties are everywhere."""
    return FeatureSet(np.arange(n, dtype=np.int64) + 1000, rng.integers(low, high, size=(n, dim)).astype(np.float32))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n_queries,n_gallery,dim,k",
                         [(1, 10, 8, 10), (37, 97, 16, 5), (601, 1003, 24, 10), (3 * PRODUCT_ROWS + 424, 300, 24, 10)])
def test_random_matches_brute_force_for_every_chunk_size(seed, n_queries, n_gallery, dim, k):
    rng = np.random.default_rng(seed)
    queries, gallery = random_set(rng, n_queries, dim), random_set(rng, n_gallery, dim, id_offset=7)
    want_ids, want_scores = brute_force(queries, gallery, k)
    first = None
    for chunk_size in CHUNK_SIZES:
        query_ids, ids, scores = topk_search(queries, gallery, k, chunk_size=chunk_size)
        assert query_ids.dtype == np.int64 and ids.dtype == np.int64 and scores.dtype == np.float32
        assert ids.shape == scores.shape == (n_queries, k)
        np.testing.assert_array_equal(query_ids, queries.ids)
        np.testing.assert_array_equal(ids, want_ids)
        # The brute force multiplies a differently shaped matrix; BLAS may round the last bit differently.
        np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-6)
        if first is None:
            first = (ids, scores)
        else:
            # Products always run on blocks of the same shape, so results are bit-identical.
            np.testing.assert_array_equal(ids, first[0])
            np.testing.assert_array_equal(scores, first[1])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("n_gallery,k", [(40, 10), (300, 10), (1003, 7), (1000, 1), (25, 25)])
def test_integer_scores_with_many_ties(seed, n_gallery, k):
    rng = np.random.default_rng(seed)
    queries = integer_set(rng, 300, 4)
    base = integer_set(rng, n_gallery, 4)
    # Exact duplicates of gallery rows, scattered, so equal scores also come from equal vectors.
    dup_from = rng.integers(0, n_gallery, size=n_gallery // 4)
    dup_to = rng.choice(n_gallery, size=n_gallery // 4, replace=False)
    vectors = base.vectors.copy()
    vectors[dup_to] = vectors[dup_from]
    gallery = FeatureSet(base.ids, vectors)
    want_ids, want_scores = brute_force(queries, gallery, k)

    scores_all = queries.vectors @ gallery.vectors.T
    kth = np.sort(scores_all, axis=1)[:, ::-1][:, k - 1]
    straddling = ((scores_all == kth[:, None]).sum(axis=1) > (want_scores == kth[:, None]).sum(axis=1))
    if k < n_gallery:
        assert straddling.any(), "the data must put ties across the k-th place"

    for chunk_size in CHUNK_SIZES:
        _, ids, scores = topk_search(queries, gallery, k, chunk_size=chunk_size)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(scores, want_scores)


def _assert_both_directions(queries, gallery, k_queries, k_gallery, *, exact_scores):
    want_ids, want_scores = brute_force(queries, gallery, k_queries)
    # Reverse direction: rank the queries for each gallery item over the same score matrix.
    scores = np.asarray(queries.vectors) @ np.asarray(gallery.vectors).T
    order = np.argsort(-scores.T, axis=1, kind="stable")[:, :k_gallery]
    want_rev_ids, want_rev_scores = queries.ids[order], np.take_along_axis(scores.T, order, axis=1)
    for chunk_size in CHUNK_SIZES:
        (q_ids, ids, top), (g_ids, rev_ids, rev_top) = topk_search_both(
            queries, gallery, k_queries, k_gallery, chunk_size=chunk_size)
        np.testing.assert_array_equal(q_ids, queries.ids)
        np.testing.assert_array_equal(g_ids, gallery.ids)
        assert ids.dtype == rev_ids.dtype == np.int64 and top.dtype == rev_top.dtype == np.float32
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_array_equal(rev_ids, want_rev_ids)
        if exact_scores:
            np.testing.assert_array_equal(top, want_scores)
            np.testing.assert_array_equal(rev_top, want_rev_scores)
        else:
            np.testing.assert_allclose(rev_top, want_rev_scores, rtol=0, atol=1e-6)
        # The first direction is exactly what the one-direction search returns.
        _, one_ids, one_scores = topk_search(queries, gallery, k_queries, chunk_size=chunk_size)
        np.testing.assert_array_equal(ids, one_ids)
        np.testing.assert_array_equal(top, one_scores)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("n_queries,n_gallery,k_queries,k_gallery", [
    (601, 97, 10, 10), (40, 300, 7, 40), (300, 20, 20, 1),
    # A last chunk of 5 queries, fewer than k_gallery; and k_gallery the whole query set.
    (PRODUCT_ROWS + 5, 40, 10, 10), (PRODUCT_ROWS + 6, 30, 5, PRODUCT_ROWS + 6),
])
def test_both_directions_from_one_product_match_brute_force(seed, n_queries, n_gallery, k_queries, k_gallery):
    rng = np.random.default_rng(seed)
    queries, gallery = random_set(rng, n_queries, 16), random_set(rng, n_gallery, 16, id_offset=7)
    _assert_both_directions(queries, gallery, k_queries, k_gallery, exact_scores=False)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_both_directions_with_ties_across_chunks(seed):
    # Integer scores tie everywhere, and the queries span three chunks, so a gallery item's
    # ties straddle chunk boundaries: the lower query position must win in the merge.
    rng = np.random.default_rng(seed)
    queries, gallery = integer_set(rng, 2 * PRODUCT_ROWS + 188, 3), integer_set(rng, 60, 3)
    by_gallery = (queries.vectors @ gallery.vectors.T).T
    kth = np.sort(by_gallery, axis=1)[:, ::-1][:, 24]
    chunks_holding_kth = [len(set((np.flatnonzero(row == value) // PRODUCT_ROWS).tolist()))
                          for row, value in zip(by_gallery, kth)]
    assert max(chunks_holding_kth) > 1, "the data must put 25th-place ties in several chunks"
    _assert_both_directions(queries, gallery, 10, 25, exact_scores=True)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_results_do_not_depend_on_the_number_of_ranking_threads(monkeypatch, threads):
    # Six chunks (four full blocks and the last block's two parts), spread over the threads in any
    # interleaving.
    rng = np.random.default_rng(5)
    queries, gallery = random_set(rng, 4 * PRODUCT_ROWS + 300, 24), random_set(rng, 300, 24, id_offset=7)
    want = brute_force(queries, gallery, 10)
    monkeypatch.setattr(topk, "RANKING_THREADS", 1)
    (_, one_ids, one_scores), (_, one_rev_ids, one_rev_scores) = topk_search_both(
        queries, gallery, 10, 7, chunk_size=PRODUCT_ROWS)
    monkeypatch.setattr(topk, "RANKING_THREADS", threads)
    (_, ids, scores), (_, rev_ids, rev_scores) = topk_search_both(queries, gallery, 10, 7, chunk_size=PRODUCT_ROWS)
    np.testing.assert_array_equal(ids, want[0])
    assert ids.tobytes() == one_ids.tobytes() and scores.tobytes() == one_scores.tobytes()
    assert rev_ids.tobytes() == one_rev_ids.tobytes() and rev_scores.tobytes() == one_rev_scores.tobytes()


def test_query_chunks_cover_the_queries_and_split_only_a_long_last_block():
    coco = topk._query_chunks(25_000, PRODUCT_ROWS)
    assert coco[:2] == [(0, PRODUCT_ROWS), (PRODUCT_ROWS, 2 * PRODUCT_ROWS)] and len(coco) == 26
    assert coco[-2:] == [(24 * PRODUCT_ROWS, 24 * PRODUCT_ROWS + 256), (24 * PRODUCT_ROWS + 256, 25_000)]
    # Larger chunks stop at the last full block; a last block of at most _TAIL_ROWS stays whole.
    assert topk._query_chunks(3 * PRODUCT_ROWS + 100, 2 * PRODUCT_ROWS) == [
        (0, 2 * PRODUCT_ROWS), (2 * PRODUCT_ROWS, 3 * PRODUCT_ROWS), (3 * PRODUCT_ROWS, 3 * PRODUCT_ROWS + 100)]
    assert topk._query_chunks(1000, 4 * PRODUCT_ROWS) == [(0, 512), (512, 1000)]
    assert topk._query_chunks(2 * PRODUCT_ROWS, PRODUCT_ROWS) == [(0, PRODUCT_ROWS), (PRODUCT_ROWS, 2 * PRODUCT_ROWS)]
    assert topk._query_chunks(0, PRODUCT_ROWS) == []
    for n_queries in (1, 128, 129, 257, PRODUCT_ROWS - 1, 4 * PRODUCT_ROWS + 300, 5 * PRODUCT_ROWS + 904):
        for chunk_rows in (PRODUCT_ROWS, 3 * PRODUCT_ROWS):
            chunks = topk._query_chunks(n_queries, chunk_rows)
            assert chunks[0][0] == 0 and chunks[-1][1] == n_queries
            assert all(stop == next_start for (_, stop), (next_start, _) in zip(chunks, chunks[1:]))
            assert all(start < stop <= start + chunk_rows for start, stop in chunks)
            # Splitting the last block costs no padding beyond what the whole block would need.
            tail = n_queries % PRODUCT_ROWS
            padded = sum(topk._product_rows(stop - start) for start, stop in chunks if stop - start < PRODUCT_ROWS)
            assert padded == (topk._product_rows(tail) if tail else 0)


def test_a_bad_query_row_is_named_whichever_thread_meets_it(monkeypatch):
    rng = np.random.default_rng(6)
    queries, gallery = random_set(rng, 4 * PRODUCT_ROWS + 76, 8), random_set(rng, 50, 8)
    vectors = queries.vectors.copy()
    bad = [2 * PRODUCT_ROWS + 5, 4 * PRODUCT_ROWS + 50]  # in the third and fifth chunks
    vectors[bad, 3] = np.inf
    monkeypatch.setattr(topk, "RANKING_THREADS", 3)
    with pytest.raises(ValueError, match=rf"query row {bad[0]} \(id=\d+\) has NaN or infinite"):
        topk_search(FeatureSet(queries.ids, vectors), gallery, 5, chunk_size=PRODUCT_ROWS)


def test_both_directions_k_above_either_set_is_an_error():
    rng = np.random.default_rng(0)
    queries, gallery = random_set(rng, 5, 8), random_set(rng, 9, 8)
    with pytest.raises(ValueError, match="k=10 exceeds the gallery size 9"):
        topk_search_both(queries, gallery, 10, 3, chunk_size=7)
    with pytest.raises(ValueError, match="k=6 exceeds the query set size 5"):
        topk_search_both(queries, gallery, 3, 6, chunk_size=7)


def test_boundary_ties_pick_lowest_positions_including_tail():
    # One dimension, query [1]: each gallery score is the gallery value itself. 1000 columns fold
    # into 16 blocks of 62 plus a tail of 8 (positions 992..999) that no block covers.
    values = np.zeros(1000, dtype=np.float32)
    values[[10, 700]] = 3.0
    values[995] = 4.0  # best item sits in the tail
    values[[999, 3, 500, 998, 64]] = 2.0  # five tied for four places: 3, 64, 500, 998 win
    gallery = FeatureSet(np.arange(1000, dtype=np.int64), values[:, None])
    queries = FeatureSet(np.array([42], dtype=np.int64), np.ones((1, 1), dtype=np.float32))
    for chunk_size in CHUNK_SIZES:
        _, ids, scores = topk_search(queries, gallery, 7, chunk_size=chunk_size)
        assert ids.tolist() == [[995, 10, 700, 3, 64, 500, 998]]
        assert scores.tolist() == [[4.0, 3.0, 3.0, 2.0, 2.0, 2.0, 2.0]]


def test_all_scores_equal_keeps_gallery_order():
    gallery = FeatureSet(np.arange(50, dtype=np.int64)[::-1].copy(), np.zeros((50, 3), dtype=np.float32))
    queries = FeatureSet(np.arange(3, dtype=np.int64), np.ones((3, 3), dtype=np.float32))
    _, ids, _ = topk_search(queries, gallery, 10)
    assert ids.tolist() == [list(range(49, 39, -1))] * 3


def test_select_topk_matches_stable_argsort_on_random_shapes():
    rng = np.random.default_rng(5)
    for _ in range(300):
        n_cols = int(rng.integers(1, 120))
        n_rows = int(rng.integers(1, 12))
        k = int(rng.integers(1, n_cols + 1))
        scores = rng.integers(-3, 4, size=(n_rows, n_cols)).astype(np.float32)
        positions, values = select_topk(scores, k)
        want = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        np.testing.assert_array_equal(positions, want)
        np.testing.assert_array_equal(values, np.take_along_axis(scores, want, axis=1))


def test_negative_zero_ties_with_zero():
    scores = np.array([[-0.0, 0.0, -0.0, 1.0]], dtype=np.float32)
    positions, _ = select_topk(scores, 3)
    assert positions.tolist() == [[3, 0, 1]]


def test_k_larger_than_gallery_is_an_error():
    rng = np.random.default_rng(0)
    queries, gallery = random_set(rng, 5, 8), random_set(rng, 9, 8)
    with pytest.raises(ValueError, match="k=10 exceeds the gallery size 9"):
        topk_search(queries, gallery, 10)
    _, ids, _ = topk_search(queries, gallery, 9)
    assert sorted(ids[0].tolist()) == sorted(gallery.ids.tolist())


@pytest.mark.parametrize("bad_k", [0, -1, True, 2.0])
def test_invalid_k(bad_k):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        topk_search(random_set(rng, 3, 4), random_set(rng, 5, 4), bad_k)


def test_invalid_inputs():
    rng = np.random.default_rng(0)
    queries, gallery = random_set(rng, 3, 4), random_set(rng, 5, 4)
    with pytest.raises(ValueError, match="dimensions"):
        topk_search(queries, random_set(rng, 5, 6), 2)
    with pytest.raises(ValueError, match="chunk_size"):
        topk_search(queries, gallery, 2, chunk_size=0)
    vectors = queries.vectors.copy()
    vectors[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"query row 1 \(id=\d+\) has NaN"):
        topk_search(FeatureSet(queries.ids, vectors), gallery, 2)
    vectors = gallery.vectors.copy()
    vectors[4, 0] = np.inf
    with pytest.raises(ValueError, match="gallery row 4"):
        topk_search(queries, FeatureSet(gallery.ids, vectors), 2)


def test_no_queries():
    rng = np.random.default_rng(0)
    empty = FeatureSet(np.empty(0, dtype=np.int64), np.empty((0, 4), dtype=np.float32))
    query_ids, ids, scores = topk_search(empty, random_set(rng, 5, 4), 3)
    assert query_ids.shape == (0,) and ids.shape == (0, 3) and scores.shape == (0, 3)


def test_progress_is_logged_per_chunk(caplog, capsys):
    rng = np.random.default_rng(0)
    with caplog.at_level(logging.INFO, logger="vlretrieval.retrieval.topk"):
        topk_search(random_set(rng, 2 * PRODUCT_ROWS + 88, 4), random_set(rng, 20, 4), 3, chunk_size=PRODUCT_ROWS,
                    progress=True)
    messages = [r.getMessage() for r in caplog.records]
    total = 2 * PRODUCT_ROWS + 88
    assert len(messages) == 3 and f"{total}/{total} queries ranked against 20" in messages[-1]
    assert capsys.readouterr().out == ""


# ---------------------------------------------------------------------------------------------
# rank_features: the drop-in replacement of the reference top-k script


@pytest.fixture
def feature_files(tmp_path):
    rng = np.random.default_rng(11)
    images = random_set(rng, 40, 16, id_offset=100_000)
    texts = random_set(rng, 120, 16, id_offset=5)
    paths = {
        "img_dir": tmp_path / "image_feats",
        "txt_dir": tmp_path / "text_feats",
        "img_jsonl": tmp_path / "test_imgs.img_feat.jsonl",
        "txt_jsonl": tmp_path / "test_texts.txt_feat.jsonl",
    }
    save_features(paths["img_dir"], images, kind="image")
    save_features(paths["txt_dir"], texts, kind="text")
    export_reference_jsonl(images, paths["img_jsonl"], "image")
    export_reference_jsonl(texts, paths["txt_jsonl"], "text")
    return images, texts, paths


@pytest.mark.parametrize("image_key,text_key",
                         [("img_dir", "txt_dir"), ("img_jsonl", "txt_jsonl"), ("img_dir", "txt_jsonl")])
def test_rank_features_writes_both_directions(tmp_path, feature_files, image_key, text_key):
    images, texts, paths = feature_files
    out_t2i, out_i2t = tmp_path / "t2i.jsonl", tmp_path / "i2t.jsonl"
    sizes = rank_features(paths[image_key], paths[text_key], out_t2i, out_i2t, k=10, chunk_size=7)
    assert sizes == {"images": 40, "texts": 120, "k": 10}

    want_t2i, _ = brute_force(texts, images, 10)
    want_i2t, _ = brute_force(images, texts, 10)
    t2i = read_predictions(out_t2i, TEXT_TO_IMAGE, k=10)
    i2t = read_predictions(out_i2t, IMAGE_TO_TEXT, k=10)
    assert list(t2i) == texts.ids.tolist()
    assert [t2i[t] for t in texts.ids.tolist()] == want_t2i.tolist()
    assert [i2t[i] for i in images.ids.tolist()] == want_i2t.tolist()
    first = json.loads(out_t2i.read_text().splitlines()[0])
    assert list(first) == ["text_id", "image_ids"]


def test_rank_features_k_above_gallery_names_the_file(tmp_path, feature_files):
    _, _, paths = feature_files
    with pytest.raises(DataError, match="image_feats.*need at least 41 gallery items, the file has 40"):
        rank_features(paths["img_dir"], paths["txt_dir"], tmp_path / "t2i.jsonl", None, k=41, chunk_size=7)
    assert not (tmp_path / "t2i.jsonl").exists()


def test_cli(tmp_path, feature_files, capsys):
    _, _, paths = feature_files
    out = tmp_path / "t2i.jsonl"
    assert main(["--image-feats", str(paths["img_jsonl"]), "--text-feats", str(paths["txt_jsonl"]),
                 "--out-t2i", str(out), "--top-k", "5"]) == 0
    assert len(read_predictions(out, TEXT_TO_IMAGE, k=5)) == 120
    assert main(["--image-feats", str(tmp_path / "missing"), "--text-feats", str(paths["txt_jsonl"]),
                 "--out-i2t", str(tmp_path / "i2t.jsonl")]) == 1
    assert "not a feature directory" in capsys.readouterr().err


def test_select_topk_rejects_nan():
    scores = np.zeros((2, 100), dtype=np.float32)
    scores[1, 37] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        select_topk(scores, 3)
    scores[1, 37] = 0.0
    scores[0, 99] = np.nan  # in the tail no block covers
    with pytest.raises(ValueError, match="NaN"):
        select_topk(scores, 3)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_column_candidates_hold_every_score_that_can_enter_a_column_list(seed):
    # Small integer scores tie everywhere; some columns have a floor (a full list's k-th score),
    # others none yet. Every score of a column's k best that reaches its floor must be a candidate.
    rng = np.random.default_rng(seed)
    scores = rng.integers(-6, 7, size=(203, 41)).astype(np.float32)
    floor = rng.integers(-2, 7, size=41).astype(np.float32)
    floor[rng.random(41) < 0.3] = -np.inf
    k = 7
    rows, cols, values = topk._column_candidates(scores, floor, k)
    assert len(set(zip(rows.tolist(), cols.tolist()))) == rows.size
    np.testing.assert_array_equal(values, scores[rows, cols])
    assert (values >= floor[cols]).all()
    held = set(zip(rows.tolist(), cols.tolist()))
    best_rows = np.argsort(-scores, axis=0, kind="stable")[:k]
    needed = {(int(row), col) for col in range(41) for row in best_rows[:, col] if scores[row, col] >= floor[col]}
    assert needed <= held
    # The block maxima prune: far fewer candidates than scores.
    assert rows.size < scores.size // 2
