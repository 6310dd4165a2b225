"""The float32 inner-product matrix that ranking is built on, on the best BLAS in the process.

numpy and scipy wheels each bundle their own OpenBLAS. The pinned scipy's (0.3.30) is newer than
the pinned numpy's (0.3.23) and knows more CPUs: on a Xeon of family 6, model 207, numpy's falls
back to its generic kernel and its product at the COCO 5K shape is about 5x slower. So the product
calls ``cblas_sgemm`` of scipy's OpenBLAS directly, through ctypes, which also releases the GIL
for the call: several Python threads can each run their own single-threaded product at once,
which scipy's own ``sgemm`` wrapper (it holds the GIL) does not allow.

Where no such library is loaded (another scipy build, say), ``np.matmul`` runs the product; it
releases the GIL too. :data:`BLAS` names what is used; :data:`BLAS_LIBRARY` is threadpoolctl's
record of the library called directly (None when ``np.matmul`` runs the product).
"""

from __future__ import annotations

import ctypes

import numpy as np
import scipy.linalg.blas  # noqa: F401  (loads scipy's BLAS, so threadpoolctl can find it)
from threadpoolctl import threadpool_info, threadpool_limits

_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112
# Symbols with the 32-bit integer interface, preferred first.
_SGEMM_SYMBOLS = ("scipy_cblas_sgemm", "cblas_sgemm")


def _cblas_sgemm():
    for pool in threadpool_info():
        if pool.get("user_api") != "blas":
            continue
        try:
            library = ctypes.CDLL(pool["filepath"])
        except OSError:
            continue
        for symbol in _SGEMM_SYMBOLS:
            function = getattr(library, symbol, None)
            if function is None:
                continue
            c_int, c_float, c_pointer = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
            function.restype = None
            function.argtypes = [c_int, c_int, c_int, c_int, c_int, c_int, c_float,
                                 c_pointer, c_int, c_pointer, c_int, c_float, c_pointer, c_int]
            if _agrees_with_numpy(function):
                return function, pool, f"{pool.get('internal_api')} {pool.get('version')} " \
                                       f"({pool.get('architecture')}, {symbol} of {pool['filepath']})"
    return None, None, f"numpy.matmul ({', '.join(_numpy_blas())})"


def _numpy_blas() -> list[str]:
    return [f"{p.get('internal_api')} {p.get('version')} ({p.get('architecture')})" for p in threadpool_info()
            if p.get("user_api") == "blas" and "numpy" in p.get("filepath", "")] or ["its BLAS"]


def _sgemm_call(function, queries: np.ndarray, gallery: np.ndarray, out: np.ndarray) -> None:
    rows, dim = queries.shape
    columns = gallery.shape[0]
    function(_ROW_MAJOR, _NO_TRANS, _TRANS, rows, columns, dim, 1.0, queries.ctypes.data, dim,
             gallery.ctypes.data, dim, 0.0, out.ctypes.data, columns)


def _agrees_with_numpy(function) -> bool:
    """A library whose ``cblas_sgemm`` takes 64-bit integers would misread the call; check once."""
    queries = np.arange(6, dtype=np.float32).reshape(3, 2)
    gallery = np.arange(8, dtype=np.float32).reshape(4, 2) - 3
    out = np.full((3, 4), np.nan, dtype=np.float32)
    _sgemm_call(function, queries, gallery, out)
    return np.array_equal(out, queries @ gallery.T)


_SGEMM, BLAS_LIBRARY, BLAS = _cblas_sgemm()


def inner_products(queries: np.ndarray, gallery: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out[:] = queries @ gallery.T`` for C-contiguous float32 arrays, without holding the GIL."""
    for name, array in (("queries", queries), ("gallery", gallery), ("out", out)):
        if array.dtype != np.float32 or not array.flags.c_contiguous:
            raise ValueError(f"inner_products needs C-contiguous float32 arrays; {name} is {array.dtype}, "
                             f"c_contiguous={array.flags.c_contiguous}")
    if queries.shape[1] != gallery.shape[1] or out.shape != (queries.shape[0], gallery.shape[0]):
        raise ValueError(f"shapes do not match: queries {queries.shape}, gallery {gallery.shape}, out {out.shape}")
    if out.size == 0:
        return out
    if _SGEMM is None:
        np.matmul(queries, gallery.T, out=out)
    else:
        _sgemm_call(_SGEMM, queries, gallery, out)
    return out


def single_threaded_blas():
    """Every BLAS library of the process on one thread, for code that runs one product per thread."""
    return threadpool_limits(1, user_api="blas")
