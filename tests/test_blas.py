"""The inner-product matrix ranking is built on: values, refusals, and which library computes it."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from vlretrieval.retrieval.blas import BLAS, BLAS_LIBRARY, inner_products, single_threaded_blas


def test_products_match_numpy_for_every_shape():
    rng = np.random.default_rng(0)
    for rows, columns, dim in [(1, 1, 1), (3, 5, 7), (256, 97, 64), (300, 1000, 768)]:
        queries = rng.standard_normal((rows, dim), dtype=np.float32)
        gallery = rng.standard_normal((columns, dim), dtype=np.float32)
        out = np.full((rows, columns), np.nan, dtype=np.float32)
        assert inner_products(queries, gallery, out) is out
        np.testing.assert_allclose(out, queries.astype(np.float64) @ gallery.T.astype(np.float64),
                                   rtol=1e-5, atol=1e-4)


def test_the_pinned_scipy_blas_computes_them():
    # The pinned scipy wheel bundles its own OpenBLAS; falling back to numpy's would be silent.
    assert "scipy_cblas_sgemm" in BLAS and "scipy" in BLAS_LIBRARY["filepath"]


def test_arrays_that_would_be_misread_are_refused():
    queries = np.ones((4, 8), dtype=np.float32)
    gallery = np.ones((5, 8), dtype=np.float32)
    with pytest.raises(ValueError, match="C-contiguous float32"):
        inner_products(queries.astype(np.float64), gallery, np.empty((4, 5), np.float32))
    with pytest.raises(ValueError, match="queries"):
        inner_products(np.ones((8, 4), np.float32).T, gallery, np.empty((4, 5), np.float32))
    with pytest.raises(ValueError, match="shapes do not match"):
        inner_products(queries, gallery, np.empty((5, 4), np.float32))


def test_products_computed_by_several_threads_equal_those_of_one():
    rng = np.random.default_rng(1)
    gallery = rng.standard_normal((400, 64), dtype=np.float32)
    blocks = [rng.standard_normal((128, 64), dtype=np.float32) for _ in range(6)]
    alone = [inner_products(block, gallery, np.empty((128, 400), np.float32)) for block in blocks]
    together = [np.empty((128, 400), np.float32) for _ in blocks]
    with single_threaded_blas():
        threads = [threading.Thread(target=inner_products, args=(block, gallery, out))
                   for block, out in zip(blocks, together)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    for want, got in zip(alone, together):
        assert got.tobytes() == want.tobytes()
