"""Judging image bytes and obtaining images into the cache, several at a time.

The cache layout (``images/``, ``rejected/``, ``partial/``) is described in :mod:`vlretrieval.data.url_corpus`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import urllib.parse
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, TypeVar

from PIL import Image

from ...errors import DownloadError
from ...io import write_json
from ..download import RETRYABLE_STATUS, HTTPStatusError, fetch
from ..validation import _digest, _open_formats, check_image_bytes

log = logging.getLogger(__name__)

# Why an image can be dropped.
IMAGE_CATEGORIES = ("download_failed", "gif", "not_image", "corrupt", "truncated", "too_small", "too_large")
# Verdicts that depend on a setting rather than on the bytes being damaged.
_SETTING_CATEGORIES = frozenset({"gif", "too_small", "too_large"})
# RFC 3986 reserved characters and '%' stay as they are; spaces and non-ASCII get escaped,
# which http.client needs and crawled URLs often lack.
_URL_SAFE = "%/:=&?~#+!$,;'@()*[]"

T = TypeVar("T")
R = TypeVar("R")


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
                return Outcome(filename, url, None, "cache", _digest(data))
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
            return Outcome(filename, url, None, "download", _digest(data))
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
