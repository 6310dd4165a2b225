"""Region features and object tags for region-based cross encoders (VinVL / Oscar+).

Source files, in the format of the VinVL release (microsoft/scene_graph_benchmark's tsv output):

``features.tsv``
    ``image_id <TAB> num_boxes <TAB> base64(float32 array [num_boxes, 2054])`` per line. Each row
    of the array is 2048 appearance values followed by 6 box values, computed from the detector's
    pixel box ``[x1, y1, x2, y2]`` and the image size ``w`` x ``h`` as
    ``[x1/w, y1/h, x2/w, y2/h, (x2-x1)/w, (y2-y1)/h]`` (see :func:`box_features`; Oscar's retrieval
    code reads the array as it is and never recomputes these, so the convention is the
    extractor's, as answered in microsoft/Oscar issue 33).
``features.lineidx`` (optional)
    The byte offset of every line of ``features.tsv``, one decimal per line. When present it is
    checked against the file, because random-access readers of the release trust it blindly.
``predictions.tsv``
    ``image_id <TAB> JSON`` per line, the JSON being
    ``{"image_h": int, "image_w": int, "num_boxes": int, "objects": [{"class": str, "rect":
    [x1, y1, x2, y2], "conf": float, ...}, ...]}``. The object classes, in file order, are the
    image's object tags (Oscar joins them with spaces after the caption).

Reading streams one line at a time, so memory stays bounded by the largest single record.

:func:`serialize_regions` writes the features and tags of one split beside its serialized split,
at ``resources/{dataset}/regions/{split}/``:

``regions/`` (LMDB)
    ``b"f:<image_id>"`` -> the float32 array ``[num_boxes, 2054]`` as raw little-endian bytes;
    ``b"t:<image_id>"`` -> UTF-8 JSON ``{"tags": [str], "boxes": [[x1, y1, x2, y2]], "conf":
    [float], "image_w": int, "image_h": int}``. Metadata keys start with ``__``: ``__format__`` =
    ``vlretrieval.regions``, ``__version__`` = ``1``, ``__feature_dim__``, ``__num_images__`` and
    ``__image_ids__`` (JSON list, the split's order).
``regions_report.json``
    What was read, kept and skipped, with every skipped record's location and reason.

Every image of the split must have both its features and its tags; anything else stops the build
with the file, line and image named. A source file shared by several splits (its path in the
registry has no ``{split}``) legitimately holds other splits' images, which are passed over; in a
per-split file a row for an image outside the split is a bad record under ``on_bad_record``.
"""

from __future__ import annotations

import json
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import lmdb
import numpy as np

from ..errors import ConfigError, DataError
from ..io import atomic_directory, write_json
from .base64_payload import Base64PayloadError, decode_base64_payload
from .importers import parse_int_id
from .lmdb_store import _MIN_MAP_SIZE, SplitStore, _LmdbWriter
from .validation import POLICIES

__all__ = [
    "APPEARANCE_DIM",
    "BOX_DIM",
    "FEATURE_DIM",
    "FORMAT_NAME",
    "RegionStore",
    "box_features",
    "iter_feature_rows",
    "iter_prediction_rows",
    "read_lineidx",
    "serialize_regions",
]

APPEARANCE_DIM = 2048
BOX_DIM = 6
FEATURE_DIM = APPEARANCE_DIM + BOX_DIM

FORMAT_NAME = "vlretrieval.regions"
FORMAT_VERSION = 1
REGIONS_DIR = "regions"
REPORT_FILE = "regions_report.json"

KEY_FORMAT = b"__format__"
KEY_VERSION = b"__version__"
KEY_FEATURE_DIM = b"__feature_dim__"
KEY_NUM_IMAGES = b"__num_images__"
KEY_IMAGE_IDS = b"__image_ids__"

_FEATURE_DTYPE = np.dtype("<f4")


def box_features(rects: np.ndarray | Sequence[Sequence[float]], image_w: float, image_h: float) -> np.ndarray:
    """The 6 box values VinVL appends to each appearance vector, as float32 ``[n, 6]``.

    ``rects`` are pixel boxes ``[x1, y1, x2, y2]``; the result is
    ``[x1/w, y1/h, x2/w, y2/h, (x2-x1)/w, (y2-y1)/h]``.
    """
    boxes = np.asarray(rects, dtype=np.float64).reshape(-1, 4)
    w, h = float(image_w), float(image_h)
    x1, y1, x2, y2 = boxes[:, 0] / w, boxes[:, 1] / h, boxes[:, 2] / w, boxes[:, 3] / h
    return np.stack([x1, y1, x2, y2, x2 - x1, y2 - y1], axis=1).astype(np.float32)


# --------------------------------------------------------------------------------------------
# reading the source files


@dataclass(frozen=True)
class FeatureRow:
    """One line of a features tsv, split into its fields but not yet decoded."""

    file: str
    line: int
    offset: int
    image_id: str
    num_boxes: str
    payload: str
    problem: str | None = None

    @property
    def location(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class PredictionRow:
    """One line of a predictions tsv with its JSON parsed, or the reason it could not be."""

    file: str
    line: int
    image_id: str
    obj: Any = None
    problem: str | None = None

    @property
    def location(self) -> str:
        return f"{self.file}:{self.line}"


def read_lineidx(path: str | os.PathLike) -> list[int]:
    """The offsets of a ``.lineidx`` file; a line that is not a decimal offset is an error."""
    offsets = []
    with open(path, "r", encoding="ascii", errors="replace") as handle:
        for line_no, line in enumerate(handle, start=1):
            text = line.strip()
            if not text.isdigit() or not text.isascii():
                raise DataError(f"{path}:{line_no}", f"expected a byte offset, found {text[:40]!r}")
            offsets.append(int(text))
    return offsets


def _tsv_lines(path: Path) -> Iterator[tuple[int, int, str]]:
    """``(line_no, byte_offset, text)`` for every line; binary reading keeps offsets exact."""
    offset = 0
    with open(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            start = offset
            offset += len(raw)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:{line_no}", f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
            yield line_no, start, text.rstrip("\r\n")


def iter_feature_rows(path: str | os.PathLike, lineidx: str | os.PathLike | None = None) -> Iterator[FeatureRow]:
    """Yield every non-empty line of a features tsv.

    With ``lineidx`` (a path that exists), its offsets must be exactly the offsets of the file's
    lines; the first disagreement is an error naming both files and the line.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), "region features file not found")
    offsets = read_lineidx(lineidx) if lineidx is not None else None
    count = 0
    for line_no, offset, text in _tsv_lines(path):
        if offsets is not None:
            if count >= len(offsets):
                raise DataError(f"{path}:{line_no}", f"line is not listed in {lineidx} ({len(offsets)} offsets)")
            if offsets[count] != offset:
                raise DataError(f"{path}:{line_no}",
                                f"{lineidx} gives offset {offsets[count]} for this line, which starts at byte {offset}")
        count += 1
        if not text.strip():
            continue
        fields = text.split("\t")
        if len(fields) != 3:
            yield FeatureRow(str(path), line_no, offset, fields[0].strip(), "", "",
                             f"expected 3 tab-separated fields (image_id, num_boxes, base64 features), found {len(fields)}")
            continue
        yield FeatureRow(str(path), line_no, offset, fields[0].strip(), fields[1].strip(), fields[2].strip())
    if offsets is not None and len(offsets) != count:
        raise DataError(str(lineidx), f"lists {len(offsets)} lines but {path} has {count}")


def decode_features(row: FeatureRow, feature_dim: int = FEATURE_DIM) -> tuple[np.ndarray | None, str | None]:
    """The row's float32 array ``[num_boxes, feature_dim]``, or ``(None, problem)``."""
    if row.problem:
        return None, row.problem
    num_boxes = parse_int_id(row.num_boxes)
    if num_boxes is None or num_boxes < 0:
        return None, f"num_boxes {row.num_boxes[:40]!r} is not a non-negative integer"
    try:
        data = decode_base64_payload(row.payload)  # an empty payload is the features of no boxes
    except Base64PayloadError as exc:
        return None, f"features are not valid base64 ({exc})"
    if len(data) % _FEATURE_DTYPE.itemsize:
        return None, f"features are {len(data)} bytes, not a whole number of float32 values"
    values = len(data) // _FEATURE_DTYPE.itemsize
    if num_boxes == 0:
        if values:
            return None, f"num_boxes is 0 but the features hold {values} float32 values"
        return np.zeros((0, feature_dim), dtype=np.float32), None
    if values % num_boxes:
        return None, f"num_boxes is {num_boxes} but the features hold {values} float32 values, not a multiple of it"
    dim = values // num_boxes
    if dim != feature_dim:
        if values % feature_dim == 0:
            return None, (f"num_boxes is {num_boxes} but the features hold {values // feature_dim} boxes "
                          f"of {feature_dim} values")
        return None, f"feature dimension is {dim}, expected {feature_dim} ({APPEARANCE_DIM} appearance + {BOX_DIM} box)"
    array = np.frombuffer(data, dtype=_FEATURE_DTYPE).reshape(num_boxes, feature_dim)
    if not np.isfinite(array).all():
        return None, "features contain NaN or infinite values"
    return array.astype(np.float32, copy=False), None


def iter_prediction_rows(path: str | os.PathLike) -> Iterator[PredictionRow]:
    """Yield every non-empty line of a predictions tsv with its JSON parsed."""
    path = Path(path)
    if not path.is_file():
        raise DataError(str(path), "object predictions file not found")
    for line_no, _offset, text in _tsv_lines(path):
        if not text.strip():
            continue
        image_id, sep, payload = text.partition("\t")
        if not sep:
            yield PredictionRow(str(path), line_no, image_id.strip(), None,
                                "expected 2 tab-separated fields (image_id, JSON), found 1")
            continue
        try:
            obj = json.loads(payload)
        except json.JSONDecodeError as exc:
            yield PredictionRow(str(path), line_no, image_id.strip(), None, f"invalid JSON: {exc.msg}, column {exc.colno}")
            continue
        yield PredictionRow(str(path), line_no, image_id.strip(), obj)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def decode_predictions(row: PredictionRow) -> tuple[dict | None, str | None]:
    """The row's tags record (the ``t:`` value of the store), or ``(None, problem)``.

    A bare JSON list of objects is accepted too, as Oscar does; its image size is then unknown (0).
    """
    if row.problem:
        return None, row.problem
    obj = row.obj
    if isinstance(obj, list):
        obj = {"objects": obj, "image_w": 0, "image_h": 0}
    if not isinstance(obj, dict):
        return None, f"expected a JSON object with 'objects', found {type(obj).__name__}"
    objects = obj.get("objects")
    if not isinstance(objects, list):
        return None, "the JSON has no 'objects' list"
    size = {}
    for key in ("image_w", "image_h"):
        value = obj.get(key, 0)
        if not (_is_number(value) and value >= 0):
            return None, f"{key} is {value!r}, not a non-negative number"
        size[key] = int(value)
    tags, boxes, conf = [], [], []
    for index, item in enumerate(objects):
        if not isinstance(item, dict):
            return None, f"object {index} is {type(item).__name__}, not a JSON object"
        cls = item.get("class")
        if not isinstance(cls, str) or not cls.strip():
            return None, f"object {index} has no class name"
        rect = item.get("rect")
        if not (isinstance(rect, list) and len(rect) == 4 and all(_is_number(v) for v in rect)):
            return None, f"object {index} ({cls!r}) has no rect [x1, y1, x2, y2]"
        score = item.get("conf", 1.0)
        if not _is_number(score):
            return None, f"object {index} ({cls!r}) has a conf that is not a number: {score!r}"
        tags.append(cls.strip())
        boxes.append([float(v) for v in rect])
        conf.append(float(score))
    return {"tags": tags, "boxes": boxes, "conf": conf, **size}, None


# --------------------------------------------------------------------------------------------
# serialization


@dataclass
class RegionsReport:
    split: str
    features_file: str
    predictions_file: str
    policy: str
    feature_rows: int = 0
    prediction_rows: int = 0
    other_images: int = 0
    images: int = 0
    boxes: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "features_file": self.features_file,
            "predictions_file": self.predictions_file,
            "policy": self.policy,
            "feature_rows": self.feature_rows,
            "prediction_rows": self.prediction_rows,
            "rows_for_other_splits": self.other_images,
            "images": self.images,
            "boxes": self.boxes,
            "skipped": self.skipped,
        }


def _bad(report: RegionsReport, policy: str, location: str, image_id: str, problem: str) -> None:
    if policy == "error":
        raise DataError(location, problem, f"image_id={image_id}" if image_id else None)
    report.skipped.append({"location": location, "image_id": image_id, "problem": problem})


def _source_path(root: Path, template: str, split: str) -> tuple[Path, bool]:
    """The file of one split and whether it is shared by every split (no ``{split}`` in it)."""
    return root / template.replace("{split}", split), "{split}" not in template


def region_sources(source_dir: Path, entry: Mapping[str, Any], split: str) -> dict[str, Any]:
    """Where the registry entry's ``regions`` block puts one split's files."""
    regions = entry.get("regions")
    if not isinstance(regions, Mapping):
        raise ConfigError("the dataset entry declares no region sources (a 'regions' block)")
    root = Path(source_dir) / str(entry.get("root") or ".")
    features, shared_f = _source_path(root, str(regions["features"]), split)
    predictions, shared_p = _source_path(root, str(regions["predictions"]), split)
    lineidx = features.with_suffix(".lineidx")
    return {
        "features": features,
        "lineidx": lineidx if lineidx.is_file() else None,
        "predictions": predictions,
        "features_shared": shared_f,
        "predictions_shared": shared_p,
    }


def serialize_regions(
    features_path: str | os.PathLike,
    predictions_path: str | os.PathLike,
    image_ids: Sequence[int],
    out_dir: str | os.PathLike,
    *,
    split: str = "",
    lineidx: str | os.PathLike | None = None,
    shared: bool = False,
    predictions_shared: bool | None = None,
    on_bad_record: str = "error",
    feature_dim: int = FEATURE_DIM,
) -> RegionsReport:
    """Validate the features and tags of ``image_ids`` and write them as a region store at ``out_dir``.

    ``shared``: the features file also holds other splits' images, which are passed over (counted
    in the report); ``predictions_shared`` says the same of the predictions file (default: as
    ``shared``), since one source can be per split while the other is shared. Otherwise such rows, like undecodable ones, are bad records: ``on_bad_record="error"``
    stops at the first, ``"skip"`` reports it and goes on. An image of ``image_ids`` left without
    features or tags, or given twice, is always an error. The directory appears only when
    everything succeeded.
    """
    if on_bad_record not in POLICIES:
        raise ValueError(f"unknown bad-record policy {on_bad_record!r}; expected one of {', '.join(POLICIES)}")
    features_path, predictions_path, out_dir = Path(features_path), Path(predictions_path), Path(out_dir)
    wanted = {int(i) for i in image_ids}
    order = [int(i) for i in image_ids]
    report = RegionsReport(split, str(features_path), str(predictions_path), on_bad_record)
    seen_features: dict[int, str] = {}
    seen_tags: dict[int, str] = {}

    if predictions_shared is None:
        predictions_shared = shared

    def accept(row_id: str, location: str, seen: dict[int, str], what: str, shared: bool) -> int | None:
        image_id = parse_int_id(row_id)
        if image_id is None:
            _bad(report, on_bad_record, location, row_id, f"image id {row_id[:40]!r} is not an integer")
            return None
        if image_id not in wanted:
            if shared:
                report.other_images += 1
            else:
                _bad(report, on_bad_record, location, row_id,
                     f"{what} for image {image_id}, which is not in the {split or 'given'} split")
            return None
        if image_id in seen:
            raise DataError(location, f"{what} for image {image_id} given again (first at {seen[image_id]})",
                            f"image_id={image_id}")
        return image_id

    # The sources bound the store's size: base64 is 4/3 of the raw floats, tags are re-encoded JSON.
    estimate = _MIN_MAP_SIZE
    for path in (features_path, predictions_path):
        estimate += path.stat().st_size if path.is_file() else 0
    with atomic_directory(out_dir) as tmp:
        writer = _LmdbWriter(tmp / REGIONS_DIR, estimate)
        try:
            for row in iter_feature_rows(features_path, lineidx):
                report.feature_rows += 1
                image_id = accept(row.image_id, row.location, seen_features, "features", shared)
                if image_id is None:
                    continue
                array, problem = decode_features(row, feature_dim)
                if problem:
                    _bad(report, on_bad_record, row.location, row.image_id, problem)
                    continue
                writer.put(f"f:{image_id}".encode("ascii"), array.astype(_FEATURE_DTYPE).tobytes())
                seen_features[image_id] = row.location
                report.boxes += array.shape[0]
            for row in iter_prediction_rows(predictions_path):
                report.prediction_rows += 1
                image_id = accept(row.image_id, row.location, seen_tags, "tags", predictions_shared)
                if image_id is None:
                    continue
                record, problem = decode_predictions(row)
                if problem:
                    _bad(report, on_bad_record, row.location, row.image_id, problem)
                    continue
                writer.put(f"t:{image_id}".encode("ascii"), json.dumps(record, separators=(",", ":")).encode("utf-8"))
                seen_tags[image_id] = row.location
            for seen, path, what in ((seen_features, features_path, "features"), (seen_tags, predictions_path, "tags")):
                missing = [i for i in order if i not in seen]
                if missing:
                    shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
                    skipped = " (their rows were skipped as bad records, see above)" if report.skipped else ""
                    raise DataError(str(path), f"no {what} for {len(missing)} image(s) of the {split or 'given'} "
                                               f"split: {shown}{skipped}")
            report.images = len(order)
            for key, value in (
                (KEY_FORMAT, FORMAT_NAME.encode("ascii")),
                (KEY_VERSION, str(FORMAT_VERSION).encode("ascii")),
                (KEY_FEATURE_DIM, str(feature_dim).encode("ascii")),
                (KEY_NUM_IMAGES, str(len(order)).encode("ascii")),
                (KEY_IMAGE_IDS, json.dumps(order).encode("ascii")),
            ):
                writer.put(key, value)
        except BaseException:
            writer.abort()
            raise
        writer.close()
        write_json(tmp / REPORT_FILE, report.to_dict())
    return report


def serialize_split_regions(
    source_dir: str | os.PathLike,
    entry: Mapping[str, Any],
    split: str,
    split_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    on_bad_record: str = "error",
) -> RegionsReport:
    """:func:`serialize_regions` for one split of a registry entry, its images read from ``split_dir``."""
    sources = region_sources(Path(source_dir), entry, split)
    with SplitStore(split_dir) as store:
        image_ids = store.image_ids()
    return serialize_regions(
        sources["features"], sources["predictions"], image_ids, out_dir, split=split, lineidx=sources["lineidx"],
        shared=sources["features_shared"], predictions_shared=sources["predictions_shared"],
        on_bad_record=on_bad_record,
    )


# --------------------------------------------------------------------------------------------
# reading a store


@dataclass(frozen=True)
class ImageRegions:
    """Everything stored for one image."""

    image_id: int
    features: np.ndarray  # float32 [num_boxes, feature_dim]
    tags: list[str]
    boxes: np.ndarray  # float32 [num_objects, 4], pixels
    conf: np.ndarray  # float32 [num_objects]
    image_w: int
    image_h: int


class RegionStore:
    """Random access by image id to a region store; environments open per process on first use.

    It pickles as its path, so it can be handed to DataLoader workers.
    """

    _envs: dict[tuple[int, int, int], list[Any]] = {}  # (pid, dev, inode) -> [env, refcount]
    _lock = threading.Lock()

    @classmethod
    def _reset_after_fork(cls) -> None:
        # The parent's environments are unusable here and would block reopening the same files;
        # closing a lock-free read-only one only unmaps the child's copy.
        cls._lock = threading.Lock()
        entries, cls._envs = cls._envs, {}
        for env, _refs in entries.values():
            try:
                env.close()
            except lmdb.Error:
                pass

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._env: lmdb.Environment | None = None
        self._key: tuple[int, int, int] | None = None
        if not (self.path / REGIONS_DIR / "data.mdb").is_file():
            raise DataError(str(self.path), f"not a region store: {REGIONS_DIR}/data.mdb is missing")
        with self._open().begin() as txn:
            if txn.get(KEY_FORMAT) != FORMAT_NAME.encode("ascii"):
                raise DataError(str(self.path / REGIONS_DIR), f"no {FORMAT_NAME} format marker")
            version = txn.get(KEY_VERSION)
            if version != str(FORMAT_VERSION).encode("ascii"):
                raise DataError(str(self.path / REGIONS_DIR),
                                f"unknown region store version {version!r}; this code reads {FORMAT_VERSION}, rebuild it")
            self.feature_dim = int(txn.get(KEY_FEATURE_DIM))
            self._image_ids = [int(i) for i in json.loads(txn.get(KEY_IMAGE_IDS))]
        self._id_set = set(self._image_ids)

    def __getstate__(self) -> dict:
        return {"path": self.path, "feature_dim": self.feature_dim, "_image_ids": self._image_ids,
                "_id_set": self._id_set, "_env": None, "_key": None}

    def _open(self) -> lmdb.Environment:
        if self._env is not None and self._key is not None and self._key[0] == os.getpid():
            return self._env
        st = (self.path / REGIONS_DIR / "data.mdb").stat()
        key = (os.getpid(), st.st_dev, st.st_ino)
        # py-lmdb refuses to open one environment twice in a process, so stores on the same
        # files share it.
        with self._lock:
            entry = self._envs.get(key)
            if entry is None:
                env = lmdb.open(str(self.path / REGIONS_DIR), readonly=True, lock=False, readahead=False,
                                meminit=False, subdir=True, max_readers=2048)
                entry = self._envs[key] = [env, 0]
            entry[1] += 1
        self._env, self._key = entry[0], key
        return self._env

    def close(self) -> None:
        if self._env is None or self._key is None or self._key[0] != os.getpid():
            self._env = None
            return
        with self._lock:
            entry = self._envs.get(self._key)
            if entry is not None:
                entry[1] -= 1
                if entry[1] <= 0:
                    del self._envs[self._key]
                    entry[0].close()
        self._env = None

    def __enter__(self) -> "RegionStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return len(self._image_ids)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._id_set

    def image_ids(self) -> list[int]:
        return list(self._image_ids)

    def _get(self, prefix: str, image_id: int) -> bytes:
        if image_id not in self._id_set:
            raise KeyError(f"image id {image_id} is not in the region store at {self.path}")
        with self._open().begin() as txn:
            value = txn.get(f"{prefix}:{int(image_id)}".encode("ascii"))
        if value is None:
            raise DataError(str(self.path / REGIONS_DIR), f"entry {prefix}:{image_id} is missing; the store is damaged")
        return value

    def features(self, image_id: int) -> np.ndarray:
        """float32 ``[num_boxes, feature_dim]`` (a writable copy)."""
        value = self._get("f", image_id)
        return np.frombuffer(value, dtype=_FEATURE_DTYPE).reshape(-1, self.feature_dim).astype(np.float32)

    def tags(self, image_id: int) -> list[str]:
        return list(json.loads(self._get("t", image_id))["tags"])

    def require_images(self, image_ids: Sequence[int], split_dir: str | os.PathLike) -> None:
        """Every image of the split ``split_dir`` has regions here, or a :class:`DataError` naming the first missing."""
        missing = sorted({int(i) for i in image_ids} - self._id_set)
        if missing:
            raise DataError(str(self.path), f"{len(missing)} image(s) of {split_dir} have no regions, first "
                                            f"{missing[:5]}; rebuild the region store for this split")

    def get(self, image_id: int) -> ImageRegions:
        record = json.loads(self._get("t", image_id))
        return ImageRegions(
            int(image_id), self.features(image_id), list(record["tags"]),
            np.asarray(record["boxes"], dtype=np.float32).reshape(-1, 4),
            np.asarray(record["conf"], dtype=np.float32), int(record["image_w"]), int(record["image_h"]),
        )


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=RegionStore._reset_after_fork)
