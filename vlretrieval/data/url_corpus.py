"""Image-text corpora given as a CSV of ``text,url,filename`` rows (CLIP-Chinese's 1.4M pairs).

The CSV names every image by URL, so building the dataset means fetching hundreds of thousands
of small files from many hosts, throwing away what is not a usable image, and converting the
rest to the raw layout of :mod:`vlretrieval.data.raw`, which the serializer reads like any
other raw dataset. Three steps, all in :func:`build_url_corpus`:

1. The CSV is read and checked row by row. A row needs a non-empty text, an http(s) URL and a
   plain file name; a file name used again with another URL, or a row repeated verbatim, is a
   defect too. Under the ``error`` policy the first defect stops the build with the file and
   line; under ``skip`` the row is dropped and reported.
2. Every distinct image is obtained by a bounded pool of threads: taken from the image cache
   when it is there and still decodes, otherwise fetched with :func:`vlretrieval.data.download.fetch`
   (timeout per network wait, retries with exponential backoff on connection errors, timeouts
   and 408/425/429/500/502/503/504, never on 404 and the like; redirects followed; our User-Agent; bytes go
   to a ``.part`` file renamed only when complete). Then it is judged: GIFs, non-images (HTML
   error pages), corrupt and truncated files and images below the minimum side are dropped.
3. Kept rows become ``{split}_imgs.tsv`` and ``{split}_texts.jsonl``. The CSV has no splits;
   the kept images are ranked by a salted sha256 of their file name and the held-out splits
   take their configured number of images from the front of that ranking
   (:func:`assign_splits`). All texts of one file name share its image id.

Ids are positions in the CSV, so they do not move when another row's download fails: a text's
id is its data row's 0-based index and an image's id the 0-based index of its file name among
the distinct names, in order of first appearance.

The image cache (``cache_dir``) outlives the output, so a rerun resumes:

* ``images/<filename>``: bytes that passed the filter, under the CSV's own file names (a
  directory filled by the original ``download_image.py`` can be used as it is);
* ``rejected/<digest>.json``: what was wrong with a URL whose answer can only be wrong again
  (a 404, an HTML page, a GIF, ...), with the URL, so a rerun does not ask again. A marker
  whose verdict depends on a setting (minimum side, GIFs, size cap) is ignored once the
  setting no longer rejects it. Transient failures (timeouts, 408/425/429/500/502/503/504) leave
  no marker and are retried by the next run; delete ``rejected/`` to retry everything;
* ``partial/``: transfers in progress; a killed run's partial file is resumed with a Range
  request.

A cached image is decoded again on every run; one that no longer decodes (a damaged disk, a
hand-edited cache) is deleted and fetched again, while one that a stricter setting now rejects
(a larger minimum side) stays in the cache, reported as dropped, without a request.
"""

from __future__ import annotations

import array
import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import time
import urllib.parse
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, TypeVar

from PIL import Image

from ..errors import ConfigError, DataError, DownloadError
from ..io import atomic_directory, sha256_file, write_json
from . import raw
from .download import RETRYABLE_STATUS, HTTPStatusError, fetch
from .importers import _FileSnapshot, _plain_file_name, _utf8_error, clean_caption
from .validation import POLICIES, _open_formats, check_image_bytes

__all__ = [
    "CSV_COLUMNS",
    "DROP_CATEGORIES",
    "REPORT_NAME",
    "DROPPED_NAME",
    "CsvRow",
    "ImageDownloader",
    "Outcome",
    "UrlCorpusSettings",
    "assign_splits",
    "build_url_corpus",
    "judge_image",
    "read_csv_rows",
]

log = logging.getLogger(__name__)

CSV_COLUMNS = ("text", "url", "filename")
REPORT_NAME = "url_corpus_report.json"
DROPPED_NAME = "url_corpus_dropped.jsonl"

# Why a row can be dropped. Row defects come from the CSV itself; the rest from its image.
ROW_CATEGORIES = ("bad_row", "duplicate_row", "filename_conflict")
IMAGE_CATEGORIES = ("download_failed", "gif", "not_image", "corrupt", "truncated", "too_small", "too_large")
DROP_CATEGORIES = ROW_CATEGORIES + IMAGE_CATEGORIES
# Verdicts that depend on a setting rather than on the bytes being damaged.
_SETTING_CATEGORIES = frozenset({"gif", "too_small", "too_large"})

# Splits with an explicit size take their images first, in this order, from the hash ranking.
_SPLIT_ORDER = ("test", "valid", "train")
# A filesystem limit; names beyond it could never be written to the cache.
_MAX_NAME_BYTES = 255
# RFC 3986 reserved characters and '%' stay as they are; spaces and non-ASCII get escaped,
# which http.client needs and crawled URLs often lack.
_URL_SAFE = "%/:=&?~#+!$,;'@()*[]"
_PROGRESS_EVERY = 30.0

T = TypeVar("T")
R = TypeVar("R")


# --------------------------------------------------------------------------------------------
# settings


@dataclass(frozen=True)
class UrlCorpusSettings:
    """The ``url_corpus`` block of a registry entry (``config/schemas/datasets.schema.yaml``)."""

    csv: str
    split_sizes: Mapping[str, int]
    split_salt: str = ""
    min_image_side: int = 32
    drop_gif: bool = True
    max_image_mb: float = 32.0
    threads: int = 16
    timeout: float = 10.0
    retries: int = 2
    backoff: float = 1.0

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any]) -> "UrlCorpusSettings":
        block = entry.get("url_corpus")
        if not isinstance(block, Mapping):
            raise ConfigError("format url_csv needs a url_corpus mapping in the dataset entry")
        unknown = sorted(set(block) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"url_corpus: unknown key(s) {', '.join(unknown)}")
        if not isinstance(block.get("csv"), str) or not block["csv"].strip():
            raise ConfigError("url_corpus.csv must name the CSV file inside the download directory")
        values = {key: block[key] for key in cls.__dataclass_fields__ if key in block and block[key] is not None}
        settings = cls(**{**values, "split_sizes": dict(block.get("split_sizes") or {})})
        settings.check()
        return settings

    def check(self) -> None:
        for split, size in self.split_sizes.items():
            if split not in raw.SPLITS:
                raise ConfigError(f"url_corpus.split_sizes: unknown split {split!r}; splits are {', '.join(raw.SPLITS)}")
            if type(size) is not int or size < 1:
                raise ConfigError(f"url_corpus.split_sizes.{split} must be a positive integer, got {size!r}")
        positive_ints = {"min_image_side": self.min_image_side, "threads": self.threads, "retries": self.retries}
        for key, value in positive_ints.items():
            if type(value) is not int or value < 1:
                raise ConfigError(f"url_corpus.{key} must be a positive integer, got {value!r}")
        for key in ("timeout", "max_image_mb"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigError(f"url_corpus.{key} must be a positive number, got {value!r}")
        if isinstance(self.backoff, bool) or not isinstance(self.backoff, (int, float)) or self.backoff < 0:
            raise ConfigError(f"url_corpus.backoff must be a non-negative number, got {self.backoff!r}")
        if not isinstance(self.drop_gif, bool):
            raise ConfigError(f"url_corpus.drop_gif must be true or false, got {self.drop_gif!r}")

    @property
    def max_image_bytes(self) -> int:
        return int(self.max_image_mb * 1024 * 1024)


# --------------------------------------------------------------------------------------------
# the CSV


@dataclass(frozen=True)
class CsvRow:
    """One data row of the CSV; ``problem`` is set when the row itself is unusable."""

    index: int  # 0-based among data rows, which makes it the text id
    line: int  # 1-based line where the row starts (a quoted text may span lines)
    text: str | None
    url: str | None
    filename: str | None
    problem: str | None = None


def _header_columns(path: Path, header: list[str]) -> dict[str, int]:
    names = [name.strip().lower() for name in header]
    duplicated = sorted({name for name in names if name and names.count(name) > 1})
    if duplicated:
        raise DataError(f"{path}:1", f"header names the column(s) {', '.join(duplicated)} more than once")
    missing = [name for name in CSV_COLUMNS if name not in names]
    if missing:
        shown = ",".join(header)[:200]
        raise DataError(
            f"{path}:1",
            f"header must name the columns {','.join(CSV_COLUMNS)} (missing {', '.join(missing)}); found {shown!r}",
        )
    return {name: names.index(name) for name in CSV_COLUMNS}


def _row_problem(text: str, url: str, filename: str) -> str | None:
    if not text:
        return "text is empty"
    if not url:
        return "url is empty"
    parts = urllib.parse.urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        return f"url {url[:200]!r} is not an http(s) URL"
    if not filename:
        return "filename is empty"
    if not _plain_file_name(filename) or filename.startswith("."):
        return f"filename {filename[:200]!r} is not a plain file name (no path separators, no leading dot)"
    if len(filename.encode("utf-8")) > _MAX_NAME_BYTES:
        return f"filename is longer than {_MAX_NAME_BYTES} bytes"
    return None


def read_csv_rows(path: str | os.PathLike) -> Iterator[CsvRow]:
    """Yield the data rows of a ``text,url,filename`` CSV, each with its line and any defect.

    The header must name the three columns (any order, case and surrounding blanks ignored;
    other columns are ignored). Blank lines are skipped. Texts are cleaned like every other
    caption (:func:`~vlretrieval.data.importers.clean_caption`). Defects a row can have alone
    (wrong number of fields, empty text, a non-http(s) URL, a file name with a path in it) are
    set as ``problem``; a file that cannot be read as CSV at all raises :class:`DataError`.
    """
    path = Path(path)
    try:
        handle = open(path, "r", encoding="utf-8-sig", newline="")
    except FileNotFoundError:
        raise DataError(str(path), "CSV file not found (format url_csv expects it)") from None
    except OSError as exc:
        raise DataError(str(path), f"cannot read the CSV ({exc.strerror or exc})") from None
    with handle:
        # strict: a stray quote that would swallow the following lines into one text is an error.
        reader = csv.reader(handle, strict=True)
        try:
            try:
                header = next(reader)
            except StopIteration:
                raise DataError(str(path), f"the CSV is empty; expected the header {','.join(CSV_COLUMNS)}") from None
            columns = _header_columns(path, header)
            width = len(header)
            index = 0
            while True:
                line = reader.line_num + 1
                try:
                    fields = next(reader)
                except StopIteration:
                    return
                except csv.Error as exc:
                    raise DataError(f"{path}:{reader.line_num}", f"not readable as CSV ({exc})") from None
                if not fields or (len(fields) == 1 and not fields[0].strip()):
                    continue
                if len(fields) != width:
                    yield CsvRow(index, line, None, None, None,
                                 f"expected {width} fields like the header, found {len(fields)}")
                else:
                    text = clean_caption(fields[columns["text"]])
                    url = fields[columns["url"]].strip()
                    filename = fields[columns["filename"]].strip()
                    yield CsvRow(index, line, text, url, filename, _row_problem(text, url, filename))
                index += 1
        except UnicodeDecodeError as exc:
            raise _utf8_error(path, exc) from None


# --------------------------------------------------------------------------------------------
# judging image bytes


@dataclass(frozen=True)
class Rejection:
    category: str
    reason: str
    # What a setting-dependent verdict was measured on, so a changed setting can revisit it.
    size: tuple[int, int] | None = None
    nbytes: int | None = None


def _looks_like_html(data: bytes) -> bool:
    head = data[:512].lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in head


def judge_image(data: bytes, *, min_side: int, drop_gif: bool = True, max_bytes: int | None = None) -> Rejection | None:
    """``None`` when ``data`` is a usable image, else why it is dropped.

    Checks, in order: size cap, identifiable image (an HTML error page is named as such), GIF,
    minimum side, then a full decode through :func:`~vlretrieval.data.validation.check_image_bytes`
    (the serializer's own check), which catches truncated and corrupt files.
    """
    if max_bytes is not None and len(data) > max_bytes:
        return Rejection("too_large", f"file has {len(data)} bytes, more than the cap of {max_bytes}", nbytes=len(data))
    if not data:
        return Rejection("not_image", "the server sent an empty body")
    try:
        # The serializer's list of formats: others (EPS runs Ghostscript) are not opened at all.
        with Image.open(io.BytesIO(data), formats=_open_formats()) as image:
            fmt, size = image.format, image.size
    except Image.UnidentifiedImageError:
        if _looks_like_html(data):
            return Rejection("not_image", "the server sent an HTML page, not an image")
        return Rejection("not_image", f"bytes are not an image (starting {data[:16]!r})")
    except Exception as exc:  # Pillow reports damaged headers with many exception types
        return Rejection("corrupt", f"image header cannot be read ({type(exc).__name__}: {exc})")
    if fmt == "GIF" and drop_gif:
        return Rejection("gif", "GIF images are dropped")
    width, height = size
    if min(width, height) < min_side:
        return Rejection("too_small", f"image is {width}x{height}, smaller than the minimum side of {min_side} pixels",
                         size=(width, height))
    problem = check_image_bytes(data, 1)
    if problem is None:
        return None
    category = "truncated" if "truncated" in problem.lower() else "corrupt"
    if problem.startswith("bytes are not an image"):
        category = "not_image"  # e.g. EPS or another format the serializer refuses to open
    return Rejection(category, problem)


# --------------------------------------------------------------------------------------------
# downloading


@dataclass(frozen=True)
class Outcome:
    """What happened to one image. ``rejection`` is ``None`` when it is kept."""

    filename: str
    url: str
    rejection: Rejection | None
    # cache (a valid cached file), rejected_cache (a remembered rejection), download
    source: str
    digest: bytes | None = None  # blake2b of the kept bytes, to notice a cache file changing under us

    @property
    def kept(self) -> bool:
        return self.rejection is None


def _request_url(url: str) -> str:
    return urllib.parse.quote(url, safe=_URL_SAFE)


def _name_key(filename: str) -> str:
    # Markers and partial files are named by digest: a name plus a suffix could exceed the
    # filesystem's limit, and two CSV names must never share a temporary.
    return hashlib.sha256(filename.encode("utf-8")).hexdigest()[:32]


def _blake(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def _is_local_write_error(exc: DownloadError) -> bool:
    # fetch wraps failures to write its own files as a plain DownloadError caused by the OSError;
    # network failures are subclasses raised without a cause. A full disk must stop the run
    # instead of turning every remaining image into a "failed download".
    return type(exc) is DownloadError and isinstance(exc.__cause__, OSError)


class ImageDownloader:
    """Obtains images into ``cache_dir`` (layout in the module docstring), several at a time.

    ``threads`` bounds the concurrent requests; ``timeout``, ``retries`` (attempts per image) and
    ``backoff`` (seconds before the first retry, doubling after each) go to
    :func:`~vlretrieval.data.download.fetch`.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike,
        *,
        min_side: int = 32,
        drop_gif: bool = True,
        max_bytes: int | None = 32 << 20,
        threads: int = 16,
        timeout: float = 10.0,
        retries: int = 2,
        backoff: float = 1.0,
    ):
        self.cache_dir = Path(cache_dir)
        self.images_dir = self.cache_dir / "images"
        self.rejected_dir = self.cache_dir / "rejected"
        self.partial_dir = self.cache_dir / "partial"
        for directory in (self.images_dir, self.rejected_dir, self.partial_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self.min_side = min_side
        self.drop_gif = drop_gif
        self.max_bytes = max_bytes
        self.threads = max(1, int(threads))
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff

    # -- one image

    def _judge(self, data: bytes) -> Rejection | None:
        return judge_image(data, min_side=self.min_side, drop_gif=self.drop_gif, max_bytes=self.max_bytes)

    def _read_capped(self, path: Path) -> bytes | Rejection:
        size = path.stat().st_size
        if self.max_bytes is not None and size > self.max_bytes:
            return Rejection("too_large", f"file has {size} bytes, more than the cap of {self.max_bytes}", nbytes=size)
        return path.read_bytes()

    def _marker_path(self, filename: str) -> Path:
        return self.rejected_dir / f"{_name_key(filename)}.json"

    def _remembered(self, filename: str, url: str) -> Rejection | None:
        """A rejection recorded by an earlier run that still holds for this URL and these settings."""
        path = self._marker_path(filename)
        try:
            marker = json.loads(path.read_text(encoding="utf-8"))
            if marker.get("filename") != filename or marker.get("url") != url:
                return None
            rejection = Rejection(marker["category"], marker["reason"],
                                  tuple(marker["size"]) if marker.get("size") else None, marker.get("nbytes"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError):
            return None  # an unreadable marker only costs a request
        if rejection.category == "gif" and not self.drop_gif:
            return None
        if rejection.category == "too_small" and (rejection.size is None or min(rejection.size) >= self.min_side):
            return None
        if rejection.category == "too_large" and (
            self.max_bytes is None or rejection.nbytes is None or rejection.nbytes <= self.max_bytes
        ):
            return None
        return rejection

    def _remember(self, filename: str, url: str, rejection: Rejection) -> None:
        write_json(self._marker_path(filename), {
            "filename": filename, "url": url, "category": rejection.category, "reason": rejection.reason,
            "size": list(rejection.size) if rejection.size else None, "nbytes": rejection.nbytes,
        })

    def obtain(self, filename: str, url: str) -> Outcome:
        """Judge the cached copy of ``filename`` or fetch it from ``url``; never raises for a bad URL."""
        cached = self.images_dir / filename
        if cached.is_file():
            data = self._read_capped(cached)
            rejection = data if isinstance(data, Rejection) else self._judge(data)
            if rejection is None:
                return Outcome(filename, url, None, "cache", _blake(data))
            if rejection.category in _SETTING_CATEGORIES:
                # A stricter setting than when it was fetched; kept for a run with the old one.
                return Outcome(filename, url, rejection, "cache")
            # Only bytes that decoded are renamed into images/, so this file was damaged since.
            log.info("cached %s no longer decodes (%s); fetching it again", cached, rejection.reason)
            cached.unlink(missing_ok=True)
        remembered = self._remembered(filename, url)
        if remembered is not None:
            return Outcome(filename, url, remembered, "rejected_cache")

        staged = self.partial_dir / _name_key(filename)
        try:
            fetch(_request_url(url), staged, timeout=self.timeout, retries=self.retries, backoff=self.backoff,
                  progress=False)
        except HTTPStatusError as exc:
            rejection = Rejection("download_failed", str(exc))
            if exc.status not in RETRYABLE_STATUS:
                self._remember(filename, url, rejection)
            return Outcome(filename, url, rejection, "download")
        except DownloadError as exc:
            if _is_local_write_error(exc):
                raise
            return Outcome(filename, url, Rejection("download_failed", str(exc)), "download")
        except ValueError as exc:  # http.client refuses some malformed URLs before any request
            rejection = Rejection("download_failed", f"{url}: invalid URL ({exc})")
            self._remember(filename, url, rejection)
            return Outcome(filename, url, rejection, "download")

        try:
            data = self._read_capped(staged)
            rejection = data if isinstance(data, Rejection) else self._judge(data)
            if rejection is not None:
                self._remember(filename, url, rejection)
                return Outcome(filename, url, rejection, "download")
            os.replace(staged, cached)
            # A rejection remembered under other settings no longer describes this file.
            self._marker_path(filename).unlink(missing_ok=True)
            return Outcome(filename, url, None, "download", _blake(data))
        finally:
            staged.unlink(missing_ok=True)

    # -- many images

    def run(self, tasks: Iterable[tuple[str, str]]) -> Iterator[Outcome]:
        """Obtain every ``(filename, url)``; yields outcomes in completion order."""
        yield from _bounded_map(lambda task: self.obtain(*task), tasks, self.threads)


def _bounded_map(fn: Callable[[T], R], items: Iterable[T], threads: int) -> Iterator[R]:
    """``fn`` over ``items`` on ``threads`` threads, yielding results as they finish.

    At most a few tasks per thread are queued, so a million items never sit in memory as futures.
    The first exception stops the pool and propagates.
    """
    window = threads * 4
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="url-corpus")
    pending: set[Future] = set()
    try:
        for item in items:
            pending.add(pool.submit(fn, item))
            if len(pending) >= window:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield future.result()
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------------------------
# splits


def _rank_key(salt: str, filename: str) -> bytes:
    return hashlib.sha256(f"{salt}\0{filename}".encode("utf-8")).digest()


def assign_splits(
    filenames: Iterable[str | None], splits: Iterable[str], sizes: Mapping[str, int], salt: str = ""
) -> list[str | None]:
    """The split of each file name (``None``: not used).

    Names are ranked by ``sha256(salt + NUL + name)``; the splits with a size take that many
    names from the front of the ranking, in the order test, valid, train; the one split of
    ``splits`` without a size, if any, takes the rest. ``None`` entries (images that did not
    pass the filter) stay ``None`` and take no place. The result depends only on the set of
    names and the salt, not on their order, so a held-out split keeps its exact size and its
    images across runs; when an image appears or disappears between runs (a download that
    failed once), only the names at the boundaries of the ranking change split.
    """
    splits = list(splits)
    for split in sizes:
        if split not in splits:
            raise ConfigError(f"url_corpus.split_sizes names {split!r}, which is not one of the splits {splits}")
    rest = [split for split in splits if split not in sizes]
    if len(rest) > 1:
        raise ConfigError(
            f"url_corpus.split_sizes must give a size to all but one of the splits {splits}; "
            f"{', '.join(rest)} have none, and only one split can take the remaining images"
        )
    names = list(filenames)
    order = sorted((i for i, name in enumerate(names) if name is not None), key=lambda i: _rank_key(salt, names[i]))
    result: list[str | None] = [None] * len(names)
    start = 0
    for split in (s for s in _SPLIT_ORDER if s in sizes):
        for i in order[start:start + sizes[split]]:
            result[i] = split
        start += sizes[split]
    if rest:
        for i in order[start:]:
            result[i] = rest[0]
    return result


# --------------------------------------------------------------------------------------------
# the whole build


@dataclass
class _Plan:
    """Pass one over the CSV: distinct images and, per row, its image or why it is unusable."""

    names: list[str]
    urls: list[str]
    image_of: dict[str, int]
    row_image: array.array  # per data row: image id, or -1 when the row itself is dropped
    row_drops: dict[int, tuple[int, str | None, str | None, str, str]]  # index -> line, filename, url, category, reason
    rows: int


def _bad_row(csv_path: Path, row: CsvRow, category: str, reason: str, policy: str) -> tuple:
    if policy == "error":
        record = f"filename={row.filename!r}" if row.filename else None
        raise DataError(
            f"{csv_path}:{row.line}",
            f"{reason} (set data.on_bad_record: skip to drop such rows and list them in {DROPPED_NAME})",
            record,
        )
    return (row.line, row.filename, row.url, category, reason)


def _plan(csv_path: Path, policy: str) -> _Plan:
    names: list[str] = []
    urls: list[str] = []
    image_of: dict[str, int] = {}
    first_line: list[int] = []
    seen_rows: dict[bytes, int] = {}
    row_image = array.array("q")
    row_drops: dict[int, tuple] = {}
    rows = 0
    for row in read_csv_rows(csv_path):
        rows += 1
        image_id = -1
        if row.problem is not None:
            row_drops[row.index] = _bad_row(csv_path, row, "bad_row", row.problem, policy)
        else:
            known = image_of.get(row.filename)
            row_key = _blake(f"{row.text}\0{row.filename}".encode("utf-8"))
            if known is not None and urls[known] != row.url:
                reason = (f"filename {row.filename!r} was given another url on line {first_line[known]} "
                          f"({urls[known][:200]}); one file cannot hold two images")
                row_drops[row.index] = _bad_row(csv_path, row, "filename_conflict", reason, policy)
            elif row_key in seen_rows:
                reason = f"repeats line {seen_rows[row_key]} (same text and filename)"
                row_drops[row.index] = _bad_row(csv_path, row, "duplicate_row", reason, policy)
            else:
                seen_rows[row_key] = row.line
                if known is None:
                    known = image_of[row.filename] = len(names)
                    names.append(row.filename)
                    urls.append(row.url)
                    first_line.append(row.line)
                image_id = known
        row_image.append(image_id)
    if rows == 0:
        raise DataError(str(csv_path), "the CSV has a header but no data rows")
    return _Plan(names, urls, image_of, row_image, row_drops, rows)


class _ProgressLog:
    def __init__(self, total: int):
        self.total = total
        self.done = 0
        self.kept = 0
        self.started = self.last = time.monotonic()

    def update(self, outcome: Outcome) -> None:
        self.done += 1
        self.kept += outcome.kept
        now = time.monotonic()
        if now - self.last >= _PROGRESS_EVERY or self.done == self.total:
            self.last = now
            rate = self.done / max(now - self.started, 1e-9)
            log.info("images %d/%d done, %d kept, %.1f images/s", self.done, self.total, self.kept, rate)


def build_url_corpus(
    entry: Mapping[str, Any],
    source_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike,
    policy: str = "error",
) -> dict[str, Any]:
    """Build the raw layout of a ``url_csv`` dataset at ``out_dir``; return the report.

    ``entry`` is the registry entry (``splits``, ``root`` and the ``url_corpus`` block);
    the CSV is ``source_dir / root / url_corpus.csv``. ``policy`` (``error`` or ``skip``)
    applies to defective CSV rows; images that cannot be fetched or fail the filter are always
    dropped and reported. ``out_dir`` receives, atomically as a whole, ``{split}_imgs.tsv`` and
    ``{split}_texts.jsonl`` for every split in ``splits``, :data:`REPORT_NAME` (settings,
    counts per category and split) and :data:`DROPPED_NAME` (one line per dropped CSV row:
    line, filename, url, category, reason, in CSV order).
    """
    if policy not in POLICIES:
        raise ConfigError(f"unknown bad-record policy {policy!r}; expected one of {', '.join(POLICIES)}")
    if entry.get("format", "url_csv") != "url_csv":
        raise ConfigError(f"dataset format is {entry.get('format')!r}, not url_csv")
    settings = UrlCorpusSettings.from_entry(entry)
    splits = list(entry.get("splits") or [])
    if not splits or any(split not in raw.SPLITS for split in splits):
        raise ConfigError(f"splits must be a non-empty list of {', '.join(raw.SPLITS)}, got {splits!r}")
    # Fails on a bad split configuration before the first request, not after the last.
    assign_splits([], splits, settings.split_sizes, settings.split_salt)
    csv_path = Path(source_dir) / str(entry.get("root") or ".") / settings.csv
    if not csv_path.is_file():
        raise DataError(str(csv_path), "CSV file not found (url_corpus.csv names it, relative to the download's root)")
    snapshot = _FileSnapshot(csv_path)

    started = time.monotonic()
    plan = _plan(csv_path, policy)
    log.info("%s: %d data rows, %d distinct images, %d rows dropped as defective",
             csv_path, plan.rows, len(plan.names), len(plan.row_drops))

    downloader = ImageDownloader(
        cache_dir, min_side=settings.min_image_side, drop_gif=settings.drop_gif, max_bytes=settings.max_image_bytes,
        threads=settings.threads, timeout=settings.timeout, retries=settings.retries, backoff=settings.backoff,
    )
    outcomes: list[Outcome | None] = [None] * len(plan.names)
    progress = _ProgressLog(len(plan.names))
    sources: Counter = Counter()
    for outcome in downloader.run(zip(plan.names, plan.urls)):
        outcomes[plan.image_of[outcome.filename]] = outcome
        sources[outcome.source] += 1
        progress.update(outcome)
    download_seconds = time.monotonic() - started

    kept_names = [name if outcomes[i].kept else None for i, name in enumerate(plan.names)]
    split_of = assign_splits(kept_names, splits, settings.split_sizes, settings.split_salt)
    images_per_split = Counter(split for split in split_of if split is not None)
    empty = [split for split in splits if images_per_split[split] == 0]
    if empty:
        raise DataError(
            str(csv_path),
            f"no image is left for the split(s) {', '.join(empty)} "
            f"({sum(o.kept for o in outcomes)} of {len(outcomes)} images passed the filter; see the log)",
        )
    for split, size in settings.split_sizes.items():
        if images_per_split[split] < size:
            log.warning("split %s has %d images, fewer than the %d asked for: only %d images passed the filter",
                        split, images_per_split[split], size, len(kept_names) - kept_names.count(None))

    snapshot.check()
    out_dir = Path(out_dir)
    row_categories: Counter = Counter()
    image_categories = Counter(o.rejection.category for o in outcomes if not o.kept)
    texts_per_split: Counter = Counter()
    with atomic_directory(out_dir) as tmp, contextlib.ExitStack() as stack:
        texts_out = {split: stack.enter_context(open(raw.texts_jsonl_path(tmp, split), "w", encoding="utf-8"))
                     for split in splits}
        dropped_out = stack.enter_context(open(tmp / DROPPED_NAME, "w", encoding="utf-8"))

        def drop(line: int, filename: str | None, url: str | None, category: str, reason: str) -> None:
            row_categories[category] += 1
            dropped_out.write(json.dumps({"line": line, "filename": filename, "url": url, "category": category,
                                          "reason": reason}, ensure_ascii=False) + "\n")

        for row in read_csv_rows(csv_path):
            image_id = plan.row_image[row.index]
            if image_id < 0:
                drop(*plan.row_drops[row.index])
                continue
            outcome = outcomes[image_id]
            if not outcome.kept:
                drop(row.line, row.filename, row.url, outcome.rejection.category, outcome.rejection.reason)
                continue
            split = split_of[image_id]
            if split is None:
                continue  # a kept image outside every split: counted, not an error
            raw.write_text_line(texts_out[split], row.index, row.text, [image_id])
            texts_per_split[split] += 1

        image_bytes = 0
        for split in splits:
            with open(raw.images_tsv_path(tmp, split), "w", encoding="utf-8") as handle:
                for image_id, name in enumerate(plan.names):
                    if split_of[image_id] != split:
                        continue
                    path = downloader.images_dir / name
                    try:
                        data = path.read_bytes()
                    except FileNotFoundError:
                        data = b""
                    if _blake(data) != outcomes[image_id].digest:
                        raise DataError(str(path), "the cached image changed or vanished while the dataset was built; "
                                        "run the job again")
                    raw.write_image_line(handle, image_id, data)
                    image_bytes += len(data)
                # Durable before the directory is renamed into place, like the texts below.
                handle.flush()
                os.fsync(handle.fileno())
        for handle in (*texts_out.values(), dropped_out):
            handle.flush()
            os.fsync(handle.fileno())
        snapshot.check()

        report = {
            "csv": str(csv_path),
            "csv_sha256": sha256_file(csv_path),
            "cache_dir": str(downloader.cache_dir),
            "policy": policy,
            "settings": {
                "split_sizes": dict(settings.split_sizes), "split_salt": settings.split_salt,
                "min_image_side": settings.min_image_side, "drop_gif": settings.drop_gif,
                "max_image_mb": settings.max_image_mb, "threads": settings.threads, "timeout": settings.timeout,
                "retries": settings.retries, "backoff": settings.backoff,
            },
            "rows": {
                "read": plan.rows,
                "kept": sum(texts_per_split.values()),
                "dropped": sum(row_categories.values()),
                "unassigned": plan.rows - sum(texts_per_split.values()) - sum(row_categories.values()),
                "dropped_by_category": {c: row_categories[c] for c in DROP_CATEGORIES if row_categories[c]},
            },
            "images": {
                "distinct": len(plan.names),
                "kept": sum(o.kept for o in outcomes),
                "dropped": sum(image_categories.values()),
                "unassigned": sum(1 for i, name in enumerate(kept_names) if name is not None and split_of[i] is None),
                "dropped_by_category": {c: image_categories[c] for c in IMAGE_CATEGORIES if image_categories[c]},
                "bytes": image_bytes,
                "from_cache": sources["cache"],
                "from_rejected_cache": sources["rejected_cache"],
                "fetched": sources["download"],
                "seconds": round(download_seconds, 3),
            },
            "splits": {
                split: {"requested": settings.split_sizes.get(split), "images": images_per_split[split],
                        "texts": texts_per_split[split]}
                for split in splits
            },
        }
        write_json(tmp / REPORT_NAME, report)
    log.info("wrote %s: %s; rows dropped by reason: %s (each listed in %s)", out_dir,
             ", ".join(f"{s} {v['images']} images / {v['texts']} texts" for s, v in report["splits"].items()),
             report["rows"]["dropped_by_category"] or "none", DROPPED_NAME)
    return report
