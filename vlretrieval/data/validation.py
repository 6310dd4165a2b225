"""Record validation for one source split, with a bad-record policy and a report.

Policies (``POLICIES``):

* ``error`` (default): the first bad record raises :class:`~vlretrieval.errors.DataError`
  naming its file and line (or LMDB key), its id when known, and the problem;
* ``skip``: bad records are left out and each one is listed in the :class:`ValidationReport`
  with its reason. Skips cascade: a text whose image was skipped or does not exist is skipped
  too, and a text naming several images is skipped as a whole when any of them is missing, so
  a kept text always has its complete gold image set. Nothing is dropped without a report entry.

Images are checked as a stream; only ids and locations stay in memory. Two ways to get the
kept image bytes:

* :func:`validate_split_into` hands each kept image to a sink as it is validated (one pass;
  what :func:`vlretrieval.data.lmdb_store.serialize_split` uses to write its LMDB);
* :func:`validate_split` validates first and returns an iterator that reads the source again,
  checking every image against the digest taken when it was validated, so what it yields is
  exactly what was checked.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, NamedTuple, TypeVar

from PIL import Image

from ..errors import DataError
from .base64_payload import decode_base64
from .importers import SourceImage, SourceSplit, SourceText, parse_int_id

POLICIES = ("error", "skip")

# Formats Pillow decodes in-process with its own or well-fuzzed C code. Others (EPS runs
# Ghostscript, some plugins parse exotic containers) have no place in a retrieval dataset.
IMAGE_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF")

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

ProgressFn = Callable[[str, int], None]
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class TextRecord:
    """A validated text: its id, its caption and the ids of every image it describes."""

    text_id: int
    text: str
    image_ids: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"text_id": self.text_id, "text": self.text, "image_ids": list(self.image_ids)}


class ImageRecord(NamedTuple):
    """A validated image: its id and the raw file bytes (decoded from base64)."""

    image_id: int
    data: bytes


@dataclass(frozen=True)
class SkippedRecord:
    kind: str  # "image" or "text"
    file: str
    line: int | None
    key: str | None
    id: int | str | None
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "file": self.file, "line": self.line, "key": self.key,
                "id": self.id, "reason": self.reason}


@dataclass
class ValidationReport:
    """Counts and skipped records of one validated split; ``to_dict()`` is what gets written."""

    source: str
    format: str
    split: str
    policy: str
    min_image_side: int
    images_read: int = 0
    images_kept: int = 0
    images_skipped: int = 0
    images_unreferenced: int = 0
    image_bytes: int = 0
    texts_read: int = 0
    texts_kept: int = 0
    texts_skipped: int = 0
    pairs: int = 0
    skipped: list[SkippedRecord] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "format": self.format,
            "split": self.split,
            "policy": self.policy,
            "min_image_side": self.min_image_side,
            "counts": {
                "images": {
                    "read": self.images_read,
                    "kept": self.images_kept,
                    "skipped": self.images_skipped,
                    # Kept: an image no text names still belongs to the retrieval gallery.
                    "unreferenced": self.images_unreferenced,
                    "bytes": self.image_bytes,
                },
                "texts": {"read": self.texts_read, "kept": self.texts_kept, "skipped": self.texts_skipped},
                "pairs": self.pairs,
            },
            "skipped": [record.to_dict() for record in self.skipped],
        }


@functools.lru_cache(maxsize=1)
def _open_formats() -> tuple[str, ...]:
    # Image.open(formats=...) looks the names up among registered plugins, and Pillow registers
    # most plugins lazily; a build without, e.g., WebP support just accepts fewer formats.
    Image.init()
    return tuple(name for name in IMAGE_FORMATS if name in Image.OPEN)


def check_image_bytes(data: bytes, min_image_side: int = 1) -> str | None:
    """Return why ``data`` is not a usable image, or ``None`` when it is.

    The image is fully decoded, which catches what a header check misses (a truncated JPEG
    scan). Formats with a real ``verify()`` (PNG chunk CRCs and a missing end chunk, which
    decoding tolerates) are verified first; Pillow's JPEG ``verify()`` checks nothing, so JPEGs
    skip it and are instead decoded at reduced scale, which still reads every entropy-coded byte.
    """
    formats = _open_formats()
    try:
        image = Image.open(io.BytesIO(data), formats=formats)
        width, height = image.size
        if min(width, height) < min_image_side:
            image.close()
            return f"image is {width}x{height}, smaller than the minimum side of {min_image_side} pixels"
        if image.format not in ("JPEG", "MPO"):
            image.verify()  # leaves the image unusable, so reopen for the decode
            image.close()
            image = Image.open(io.BytesIO(data), formats=formats)
        else:
            image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
        with image:
            image.load()
    except Image.UnidentifiedImageError:
        return f"bytes are not an image in a supported format ({', '.join(formats)})"
    except Exception as exc:  # Pillow reports damage with many exception types
        return f"image cannot be decoded ({type(exc).__name__}: {exc})"
    return None


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _id_in_range(value: int) -> bool:
    # Ids travel through int64 tensors and feature files downstream.
    return _INT64_MIN <= value <= _INT64_MAX


def _ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[tuple[T, R]]:
    """``(item, fn(item))`` in input order, computing up to ``workers`` items concurrently.

    Pillow releases the GIL while decoding, so threads give real parallelism here; the window
    bounds how many decoded images are in memory at once.
    """
    if workers <= 1:
        for item in items:
            yield item, fn(item)
        return
    window = workers * 4
    pending: collections.deque = collections.deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="validate") as pool:
        try:
            for item in items:
                pending.append((item, pool.submit(fn, item)))
                if len(pending) >= window:
                    done_item, future = pending.popleft()
                    yield done_item, future.result()
            while pending:
                done_item, future = pending.popleft()
                yield done_item, future.result()
        finally:
            for _item, future in pending:
                future.cancel()


def _shown_id(value: Any) -> int | str | None:
    """An id as found, fit for a message and the JSON report (a corrupt field can be huge)."""
    if value is None or type(value) is int:
        return value
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= 64 else text[:61] + "..."


def _where_relative(first_location: str, record: SourceImage | SourceText) -> str:
    """``line 3`` / ``key '3'`` when the earlier record is in the same file, else its full location."""
    for prefix, label in ((f"{record.file}:", "line "), (f"{record.file} [key ", "key ")):
        if first_location.startswith(prefix):
            return label + first_location[len(prefix):].rstrip("]")
    return first_location


class _Judge:
    """Applies the policy to one bad record: raise now, or record it in the report."""

    def __init__(self, policy: str, report: ValidationReport):
        self.policy = policy
        self.report = report

    def reject(self, kind: str, record: SourceImage | SourceText, record_id: int | str | None, reason: str) -> None:
        if self.policy == "error":
            label = None
            if record_id is not None:
                shown = record_id if type(record_id) is int else repr(record_id)
                label = f"{'image_id' if kind == 'image' else 'text_id'}={shown}"
            raise DataError(record.location, reason, label)
        self.report.skipped.append(SkippedRecord(kind, record.file, record.line, record.key, record_id, reason))
        if kind == "image":
            self.report.images_skipped += 1
        else:
            self.report.texts_skipped += 1


@dataclass
class _KeptImage:
    position: int
    image_id: int
    digest: bytes


class _ImageCheck(NamedTuple):
    image_id: int | None
    problem: str | None


def _check_text_fields(obj: Any) -> tuple[str | None, int | None, str | None, list[int] | None]:
    """Structural checks of one text object: ``(problem, text_id, text, image_ids)``."""
    if not isinstance(obj, dict):
        return f"expected a JSON object, found {type(obj).__name__}", None, None, None
    missing = [name for name in ("text_id", "text", "image_ids") if name not in obj]
    text_id = obj.get("text_id")
    if type(text_id) is not int or not _id_in_range(text_id):
        text_id_ok = None
    else:
        text_id_ok = text_id
    if missing:
        return f"missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)}", text_id_ok, None, None
    if text_id_ok is None:
        return f"text_id must be an integer, found {text_id!r}", None, None, None
    text = obj["text"]
    if not isinstance(text, str):
        return f"text must be a string, found {type(text).__name__}", text_id_ok, None, None
    if not text.strip():
        return "text is empty", text_id_ok, None, None
    image_ids = obj["image_ids"]
    if not isinstance(image_ids, list) or not image_ids:
        return f"image_ids must be a non-empty list of integers, found {image_ids!r}", text_id_ok, None, None
    bad = [value for value in image_ids if type(value) is not int or not _id_in_range(value)]
    if bad:
        return f"image_ids must be integers, found {bad[0]!r}", text_id_ok, None, None
    repeated = sorted({value for value in image_ids if image_ids.count(value) > 1})
    if repeated:
        return f"image_ids names image {repeated[0]} more than once", text_id_ok, None, None
    return None, text_id_ok, text, image_ids


ImageSink = Callable[[int, ImageRecord], None]


def validate_split(
    source: SourceSplit,
    *,
    policy: str = "error",
    min_image_side: int = 1,
    workers: int | None = None,
    progress: ProgressFn | None = None,
) -> tuple[Iterator[ImageRecord], list[TextRecord], ValidationReport]:
    """Validate every record of ``source`` and return ``(images, texts, report)``.

    Checks, in this order: images (reader-detected defects, integer id, duplicate id, base64 in
    the standard or URL-safe alphabet, padded or not (:mod:`~vlretrieval.data.base64_payload`),
    decodable image of at least ``min_image_side`` pixels per side), then texts (JSON, required
    fields and their types, non-empty text, duplicate text id, existing images).
    Duplicates keep the first record. ``images`` is a single-use iterator over the kept images
    in source order, read again from the source; ``texts`` and ``report`` are complete when
    this returns.

    ``workers`` threads decode images concurrently (default: up to 4, by CPU count).
    Raises :class:`DataError` for a bad record under ``policy="error"``, and under any policy
    when no image or no text remains.
    """
    kept: list[_KeptImage] = []

    def remember(position: int, image: ImageRecord) -> None:
        kept.append(_KeptImage(position, image.image_id, _digest(image.data)))

    texts, report = validate_split_into(
        source, remember, policy=policy, min_image_side=min_image_side, workers=workers, progress=progress,
    )
    return _iter_kept_images(source, kept), texts, report


def validate_split_into(
    source: SourceSplit,
    image_sink: ImageSink,
    *,
    policy: str = "error",
    min_image_side: int = 1,
    workers: int | None = None,
    progress: ProgressFn | None = None,
) -> tuple[list[TextRecord], ValidationReport]:
    """Like :func:`validate_split`, but hand each kept image to ``image_sink`` as it passes.

    ``image_sink(position, image)`` is called in source order with the image's index in the
    source's image stream. This reads the images once, so a writer can consume them directly;
    the caller must discard whatever the sink built if this raises.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown bad-record policy {policy!r}; expected one of {', '.join(POLICIES)}")
    if type(min_image_side) is not int or min_image_side < 1:
        raise ValueError(f"min_image_side must be a positive integer, got {min_image_side!r}")
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    report = ValidationReport(source.description, source.fmt, source.split, policy, min_image_side)
    judge = _Judge(policy, report)

    kept_ids, skipped_reason = _validate_images(source, judge, report, min_image_side, workers, image_sink, progress)
    texts = _validate_texts(source, judge, report, set(kept_ids), skipped_reason, progress)

    if report.images_kept == 0 or report.texts_kept == 0:
        what = "image" if report.images_kept == 0 else "text"
        raise DataError(
            source.description,
            f"no valid {what} remains (images kept {report.images_kept} of {report.images_read}, "
            f"texts kept {report.texts_kept} of {report.texts_read})"
            + (f"; first skip: {report.skipped[0].reason}" if report.skipped else ""),
        )
    referenced = {image_id for text in texts for image_id in text.image_ids}
    report.images_unreferenced = sum(1 for image_id in kept_ids if image_id not in referenced)
    report.pairs = sum(len(text.image_ids) for text in texts)
    return texts, report


def _validate_images(
    source: SourceSplit,
    judge: _Judge,
    report: ValidationReport,
    min_image_side: int,
    workers: int,
    image_sink: ImageSink,
    progress: ProgressFn | None,
) -> tuple[list[int], dict[int, str]]:
    kept_ids: list[int] = []
    claimed: dict[int, str] = {}  # image id -> location of the first record that used it
    skipped_reason: dict[int, str] = {}

    def cheap_checks(record: SourceImage) -> _ImageCheck | bytes:
        # Runs on the reading thread: it decides duplicates, which depend on record order.
        image_id = parse_int_id(record.image_id)
        if record.problem is not None:
            return _ImageCheck(image_id, record.problem)
        if image_id is None or not _id_in_range(image_id):
            return _ImageCheck(None, f"image id {_shown_id(record.image_id)!r} is not an integer")
        if image_id in claimed:
            first = _where_relative(claimed[image_id], record)
            return _ImageCheck(image_id, f"duplicate image id {image_id} (first at {first})")
        data, problem = decode_base64(record.payload)
        if problem is not None:
            return _ImageCheck(image_id, problem)
        return data

    def staged() -> Iterator[tuple[SourceImage, _ImageCheck | bytes]]:
        for record in source.iter_images():
            outcome = cheap_checks(record)
            image_id = outcome.image_id if isinstance(outcome, _ImageCheck) else parse_int_id(record.image_id)
            if image_id is not None and image_id not in claimed:
                claimed[image_id] = record.location
            yield record, outcome

    def expensive_checks(item: tuple[SourceImage, _ImageCheck | bytes]) -> _ImageCheck:
        record, outcome = item
        if isinstance(outcome, _ImageCheck):
            return outcome
        return _ImageCheck(parse_int_id(record.image_id), check_image_bytes(outcome, min_image_side))

    for position, ((record, outcome), check) in enumerate(_ordered_map(expensive_checks, staged(), workers)):
        report.images_read += 1
        if check.problem is not None:
            record_id = check.image_id if check.image_id is not None else _shown_id(record.image_id or None)
            judge.reject("image", record, record_id, check.problem)
            # Only the record that first claimed an id speaks for it; a rejected later duplicate
            # leaves the first record's verdict in place.
            if check.image_id is not None and claimed.get(check.image_id) == record.location:
                skipped_reason.setdefault(check.image_id, check.problem)
        else:
            image_sink(position, ImageRecord(check.image_id, outcome))
            kept_ids.append(check.image_id)
            report.images_kept += 1
            report.image_bytes += len(outcome)
        if progress is not None:
            progress("validate images", report.images_read)
    return kept_ids, skipped_reason


def _validate_texts(
    source: SourceSplit,
    judge: _Judge,
    report: ValidationReport,
    valid_images: set[int],
    skipped_images: dict[int, str],
    progress: ProgressFn | None,
) -> list[TextRecord]:
    texts: list[TextRecord] = []
    claimed: dict[int, str] = {}
    for record in source.iter_texts():
        report.texts_read += 1
        if progress is not None:
            progress("validate texts", report.texts_read)
        # The id as found, for messages, even when it is not a valid id.
        raw_id = _shown_id(record.obj.get("text_id")) if isinstance(record.obj, dict) else None
        if record.problem is not None:
            judge.reject("text", record, raw_id, record.problem)
            continue
        problem, text_id, text, image_ids = _check_text_fields(record.obj)
        if text_id is not None:
            if text_id in claimed and problem is None:
                problem = f"duplicate text id {text_id} (first at {_where_relative(claimed[text_id], record)})"
            claimed.setdefault(text_id, record.location)
        if problem is None:
            problem = _missing_images_problem(image_ids, valid_images, skipped_images, source.images_file)
        if problem is not None:
            judge.reject("text", record, text_id if text_id is not None else raw_id, problem)
            continue
        texts.append(TextRecord(text_id, text, tuple(image_ids)))
        report.texts_kept += 1
    return texts


def _missing_images_problem(
    image_ids: list[int], valid: set[int], skipped: dict[int, str], images_file: str
) -> str | None:
    missing = [image_id for image_id in image_ids if image_id not in valid]
    if not missing:
        return None
    parts = []
    for image_id in missing:
        if image_id in skipped:
            parts.append(f"its image {image_id} was skipped ({skipped[image_id]})")
        else:
            parts.append(f"image id {image_id} does not exist in {images_file}")
    problem = "; ".join(parts)
    if len(image_ids) > 1:
        problem += (
            f"; the text names images {image_ids} and is skipped as a whole so that no kept text"
            " has an incomplete gold image set"
        )
    return problem


def _iter_kept_images(source: SourceSplit, kept: list[_KeptImage]) -> Iterator[ImageRecord]:
    wanted = iter(kept)
    target = next(wanted, None)
    for position, record in enumerate(source.iter_images()):
        if target is None:
            break
        if position != target.position:
            continue
        data, _problem = decode_base64(record.payload)
        if data is None or parse_int_id(record.image_id) != target.image_id or _digest(data) != target.digest:
            raise DataError(record.location, "the record changed since it was validated; run the import again",
                            f"image_id={target.image_id}")
        yield ImageRecord(target.image_id, data)
        target = next(wanted, None)
    if target is not None:
        raise DataError(source.description, "the source ended early on the second read; it changed during the import")
