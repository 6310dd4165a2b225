"""Embedding sets on disk: L2-normalised float32 vectors with their int64 ids.

Two formats are supported:

* the project format, a directory holding ``vectors.npy`` (float32, ``(n, d)``), ``ids.npy``
  (int64, ``(n,)``) and a small ``meta.json``. Plain ``.npy`` files can be memory-mapped, so a
  set larger than RAM is usable and loading a large set costs no parse time;
* the reference jsonl written by the Chinese-CLIP / ERNIE-ViL 2.0 feature extractors, one
  ``{"image_id": int, "feature": [float, ...]}`` (``*.img_feat.jsonl``) or
  ``{"text_id": int, "feature": [float, ...]}`` (``*.txt_feat.jsonl``) object per line.

Every loader validates what it returns: ids unique, vectors finite and of unit length, so a
ranking never silently runs on a corrupt or unnormalised set.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from ..errors import DataError
from ..io import atomic_directory, atomic_open, iter_jsonl_objects

FORMAT_NAME = "vlretrieval.features"
FORMAT_VERSION = 1
VECTORS_FILE = "vectors.npy"
IDS_FILE = "ids.npy"
META_FILE = "meta.json"

# Float32 rounding keeps the norm of a normalised vector within ~1e-6 of 1, and features
# normalised in half precision stay within ~1e-3; anything further off was never normalised.
NORM_TOLERANCE = 1e-3

# Rows checked per step when validating, so validating a memory-mapped set never loads it whole.
_VALIDATION_ROWS = 8192

Kind = Literal["image", "text"]
_ID_KEYS: dict[str, str] = {"image": "image_id", "text": "text_id"}


@dataclass(frozen=True)
class FeatureSet:
    """Row ``i`` of ``vectors`` is the embedding of item ``ids[i]``.

    Construction checks only shapes and dtypes (cheap, so memory-mapped sets stay unread);
    :func:`validate_features` checks the values.
    """

    ids: np.ndarray
    vectors: np.ndarray

    def __post_init__(self) -> None:
        ids = np.asarray(self.ids)
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise ValueError(f"ids must be a 1-D integer array, got shape {ids.shape} and dtype {ids.dtype}")
        if ids.dtype == np.uint64 and ids.size and int(ids.max()) > np.iinfo(np.int64).max:
            raise ValueError(f"id {int(ids.max())} does not fit into int64")
        ids = ids.astype(np.int64, copy=False)
        vectors = self.vectors
        if not isinstance(vectors, np.ndarray):
            vectors = np.asarray(vectors)
        if vectors.ndim != 2:
            raise ValueError(f"vectors must be a 2-D array, got shape {vectors.shape}")
        if vectors.dtype != np.float32:
            raise ValueError(f"vectors must be float32, got {vectors.dtype} (use l2_normalize or astype)")
        if vectors.shape[0] != ids.shape[0]:
            raise ValueError(f"{ids.shape[0]} ids for {vectors.shape[0]} vectors")
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "vectors", vectors)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Return ``x`` as float32 with every row scaled to unit L2 norm.

    Norms are accumulated in float64 so long float32 rows do not lose precision. A zero or
    non-finite row has no direction, so it raises ``ValueError`` naming the first such row.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D array, got shape {x.shape}")
    if x.dtype.kind not in "fiu":
        raise ValueError(f"expected a numeric array, got dtype {x.dtype}")
    x64 = x.astype(np.float64, copy=False)
    norms = np.sqrt(np.einsum("ij,ij->i", x64, x64))
    bad = ~np.isfinite(norms) | (norms == 0.0)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        what = "is all zeros" if norms[row] == 0.0 else "has non-finite values or overflows"
        raise ValueError(f"row {row} {what}; it cannot be normalised")
    return (x64 / norms[:, None]).astype(np.float32)


def validate_features(fs: FeatureSet, location: str | os.PathLike, *, kind: Kind | None = None,
                      norm_tolerance: float = NORM_TOLERANCE) -> None:
    """Raise :class:`DataError` unless ids are unique and every row is finite with unit norm.

    The error names ``location`` and the first offending row with its id.
    """
    location = str(location)
    id_key = _ID_KEYS.get(kind, "id") if kind else "id"
    if len(fs) == 0:
        raise DataError(location, "the feature set is empty")
    if fs.dim == 0:
        raise DataError(location, "feature vectors have zero dimensions")

    order = np.argsort(fs.ids, kind="stable")
    sorted_ids = fs.ids[order]
    dup = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
    if dup.size:
        first, second = int(order[dup[0]]), int(order[dup[0] + 1])
        raise DataError(location, f"duplicate id: rows {first} and {second} have the same id",
                        f"{id_key}={int(sorted_ids[dup[0]])}")

    n = len(fs)
    for start in range(0, n, _VALIDATION_ROWS):
        block = np.asarray(fs.vectors[start:start + _VALIDATION_ROWS])
        finite = np.isfinite(block).all(axis=1)
        if not finite.all():
            row = start + int(np.flatnonzero(~finite)[0])
            raise DataError(location, f"row {row} has NaN or infinite values", f"{id_key}={int(fs.ids[row])}")
        block64 = block.astype(np.float64)
        norms = np.sqrt(np.einsum("ij,ij->i", block64, block64))
        off = np.abs(norms - 1.0) > norm_tolerance
        if off.any():
            i = int(np.flatnonzero(off)[0])
            row = start + i
            raise DataError(
                location,
                f"row {row} has L2 norm {norms[i]:.6g}; features must be L2-normalised "
                f"(tolerance {norm_tolerance:g})",
                f"{id_key}={int(fs.ids[row])}",
            )


def save_features(path: str | os.PathLike, fs: FeatureSet, *, kind: Kind | None = None) -> None:
    """Write ``fs`` as a feature directory at ``path``, atomically (validated first).

    ``kind`` is recorded in ``meta.json`` for people reading the directory; loading ignores it
    unless asked to check it.
    """
    path = Path(path)
    if kind is not None:
        _id_key(kind)
    validate_features(fs, path, kind=kind)
    with atomic_directory(path) as tmp:
        # np.save on an already contiguous float32 array streams it without another copy.
        np.save(tmp / VECTORS_FILE, np.ascontiguousarray(fs.vectors), allow_pickle=False)
        np.save(tmp / IDS_FILE, np.ascontiguousarray(fs.ids), allow_pickle=False)
        meta = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "count": len(fs), "dim": fs.dim, "kind": kind}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def load_features(path: str | os.PathLike, mmap: bool = True, *, kind: Kind | None = None,
                  validate: bool = True) -> FeatureSet:
    """Load a feature directory written by :func:`save_features`.

    With ``mmap`` the vectors stay on disk and are paged in as they are used (read-only).
    ``kind``, when given, must match the kind recorded at save time (if one was recorded).
    """
    path = Path(path)
    meta_path = path / META_FILE
    if not path.is_dir():
        raise DataError(str(path), "not a feature directory (expected vectors.npy, ids.npy and meta.json inside)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(str(meta_path), "missing; the directory was not written by save_features") from None
    except json.JSONDecodeError as exc:
        raise DataError(str(meta_path), f"invalid JSON: {exc.msg}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise DataError(str(meta_path), f"not a {FORMAT_NAME} directory")
    if meta.get("version") != FORMAT_VERSION:
        raise DataError(str(meta_path), f"format version {meta.get('version')!r} is not supported "
                                        f"(this code reads version {FORMAT_VERSION})")
    if kind is not None and meta.get("kind") not in (None, kind):
        raise DataError(str(meta_path), f"holds {meta.get('kind')} features, expected {kind} features")

    vectors_path, ids_path = path / VECTORS_FILE, path / IDS_FILE
    try:
        vectors = np.load(vectors_path, mmap_mode="r" if mmap else None, allow_pickle=False)
        ids = np.load(ids_path, allow_pickle=False)
    except FileNotFoundError as exc:
        raise DataError(str(exc.filename), "missing from the feature directory") from None
    except ValueError as exc:
        raise DataError(str(path), f"unreadable .npy file: {exc}") from None

    if vectors.ndim != 2 or vectors.dtype != np.float32:
        raise DataError(str(vectors_path), f"expected a 2-D float32 array, found shape {vectors.shape} "
                                           f"and dtype {vectors.dtype}")
    if ids.ndim != 1 or ids.dtype != np.int64:
        raise DataError(str(ids_path), f"expected a 1-D int64 array, found shape {ids.shape} and dtype {ids.dtype}")
    if ids.shape[0] != vectors.shape[0]:
        raise DataError(str(path), f"{ids.shape[0]} ids for {vectors.shape[0]} vectors")
    if (meta.get("count"), meta.get("dim")) != (vectors.shape[0], vectors.shape[1]):
        raise DataError(str(meta_path), f"records {meta.get('count')} x {meta.get('dim')} but vectors.npy is "
                                        f"{vectors.shape[0]} x {vectors.shape[1]}")
    fs = FeatureSet(ids, vectors)
    if validate:
        validate_features(fs, vectors_path, kind=kind or meta.get("kind"))
    return fs


def export_reference_jsonl(fs: FeatureSet, path: str | os.PathLike, kind: Kind) -> None:
    """Write ``fs`` in the reference feature jsonl, atomically.

    Values are written with Python's shortest float repr of each float32, which reads back to
    the same float32 exactly.
    """
    id_key = _id_key(kind)
    with atomic_open(path) as handle:
        for start in range(0, len(fs), _VALIDATION_ROWS):
            block = np.asarray(fs.vectors[start:start + _VALIDATION_ROWS]).tolist()
            ids = fs.ids[start:start + _VALIDATION_ROWS].tolist()
            for item_id, feature in zip(ids, block):
                handle.write(json.dumps({id_key: item_id, "feature": feature}))
                handle.write("\n")


def read_reference_jsonl(path: str | os.PathLike, kind: Kind) -> FeatureSet:
    """Read a reference feature jsonl into a normalised :class:`FeatureSet`.

    The extractors already write normalised features, but rows are normalised again here so
    features produced elsewhere (or rounded on the way) are ranked by cosine similarity too.
    Every malformed line raises :class:`DataError` with its line number.
    """
    id_key = _id_key(kind)
    path = str(path)
    ids: list[int] = []
    rows: list[np.ndarray] = []
    seen: dict[int, int] = {}
    dim: int | None = None
    for where, line_no, obj in iter_jsonl_objects(path):
        item_id = obj.get(id_key)
        if type(item_id) is not int:
            raise DataError(where, f"{id_key} must be an integer, found {item_id!r}")
        record = f"{id_key}={item_id}"
        if item_id in seen:
            raise DataError(where, f"duplicate {id_key}, first seen on line {seen[item_id]}", record)
        seen[item_id] = line_no
        feature = obj.get("feature")
        if not isinstance(feature, list) or not feature:
            raise DataError(where, "feature must be a non-empty list of numbers", record)
        vec = np.array(feature)
        if vec.ndim != 1 or vec.dtype.kind not in "iuf":
            raise DataError(where, "feature must be a flat list of numbers", record)
        if dim is None:
            dim = vec.shape[0]
        elif vec.shape[0] != dim:
            raise DataError(where, f"feature has {vec.shape[0]} values, earlier lines have {dim}", record)
        vec = vec.astype(np.float64, copy=False)
        if not np.isfinite(vec).all():
            raise DataError(where, "feature has NaN or infinite values", record)
        norm = math.sqrt(float(vec @ vec))
        if norm == 0.0 or not math.isfinite(norm):
            raise DataError(where, "feature vector has zero (or overflowing) norm; it cannot be normalised",
                            record)
        rows.append((vec / norm).astype(np.float32))
        ids.append(item_id)
    if not rows:
        raise DataError(path, "no features in file")
    return FeatureSet(np.array(ids, dtype=np.int64), np.stack(rows))


def load_any_features(path: str | os.PathLike, kind: Kind, *, mmap: bool = True) -> FeatureSet:
    """Load either format: a path ending in ``.jsonl`` is a reference feature file."""
    if str(path).endswith(".jsonl"):
        return read_reference_jsonl(path, kind)
    return load_features(path, mmap=mmap, kind=kind)


def _id_key(kind: str) -> str:
    try:
        return _ID_KEYS[kind]
    except KeyError:
        raise ValueError(f"kind must be 'image' or 'text', got {kind!r}") from None
