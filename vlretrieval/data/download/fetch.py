"""Fetching one file from an ``http(s)://`` URL, a ``file://`` URL or a plain path.

Bytes go to a ``.part`` file beside the destination, which a later attempt or run resumes with a
Range request, and are renamed into place only once complete (and, when a digest is expected,
verified). Transient network failures are retried with exponential backoff.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import socket
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from vlretrieval import __version__
from vlretrieval.errors import ChecksumMismatch, DownloadError
from vlretrieval.io import sha256_file, write_json

from .checksums import _normalise_digest

try:
    from tqdm import tqdm as _tqdm
except ImportError:  # progress bars are a convenience, never a requirement
    _tqdm = None

CHUNK_SIZE = 1 << 20
USER_AGENT = f"vlretrieval/{__version__} (+python-urllib)"
MAX_BACKOFF = 60.0

# Statuses that say "try again later" rather than "this URL is wrong".
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$")
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)\s*$")


class SourceUnreachable(DownloadError):
    """The host could not be reached (DNS failure, connection refused or reset)."""


class DownloadTimeout(DownloadError):
    """The server stopped answering for longer than the timeout."""


class HTTPStatusError(DownloadError):
    """The server answered with an error status."""

    def __init__(self, message: str, *, url: str, status: int):
        super().__init__(message)
        self.url = url
        self.status = status


class IncompleteDownload(DownloadError):
    """The transfer ended before all bytes arrived; the partial file is kept for resuming."""



class _Retryable(Exception):
    """One failed attempt that may succeed if repeated; ``final`` is what the caller sees once attempts run out."""

    def __init__(self, error_class: type[DownloadError], message: str, **fields: Any):
        super().__init__(message)
        self.error_class = error_class
        self.message = message
        self.fields = fields

    def final(self, attempts: int) -> DownloadError:
        plural = "" if attempts == 1 else "s"
        return self.error_class(f"{self.message} (gave up after {attempts} attempt{plural})", **self.fields)


def _is_remote(url: str) -> bool:
    return urllib.parse.urlsplit(url).scheme.lower() in ("http", "https")


def _local_source(url: str) -> Path:
    """Map a ``file://`` URL or plain path to a path; other schemes are not supported."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise DownloadError(f"{url}: file:// URLs on another host are not supported")
        return Path(urllib.request.url2pathname(parts.path))
    # A one-letter "scheme" is a Windows drive letter, i.e. still a path.
    if scheme and len(scheme) > 1 and "://" in url:
        raise DownloadError(f"{url}: unsupported URL scheme {parts.scheme!r} (use http, https, file or a path)")
    return Path(url)


def _part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def _meta_path(part: Path) -> Path:
    # Remembers which URL and which server version the partial bytes came from, so a resume
    # never glues bytes of two different files together.
    return part.with_name(part.name + ".json")


def _discard(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)



@contextlib.contextmanager
def _progress_bar(enabled: bool, total: int | None, initial: int, label: str) -> Iterator[Callable[[int], Any]]:
    if not enabled or _tqdm is None:
        yield lambda n: None
        return
    bar = _tqdm(
        total=total,
        initial=initial,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=label,
        file=sys.stderr,
        mininterval=1.0,
        leave=False,
    )
    try:
        yield bar.update
    finally:
        bar.close()


def _read_meta(path: Path) -> dict[str, Any] | None:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _write_meta(path: Path, url: str, headers: Any) -> None:
    etag = headers.get("ETag")
    # If-Range needs a strong validator; a weak ETag would make the server resend everything.
    if etag and etag.startswith("W/"):
        etag = None
    write_json(path, {"url": url, "etag": etag, "last_modified": headers.get("Last-Modified")})


def _copy_stream(source: BinaryIO, out: BinaryIO, update: Callable[[int], Any]) -> int:
    copied = 0
    while True:
        chunk = source.read(CHUNK_SIZE)
        if not chunk:
            return copied
        out.write(chunk)
        copied += len(chunk)
        update(len(chunk))


def _copy_local(source: Path, part: Path, *, progress: bool, label: str) -> None:
    if not source.exists():
        raise DownloadError(f"{source}: local source file does not exist")
    if not source.is_file():
        raise DownloadError(f"{source}: local source is not a regular file")
    _discard(_meta_path(part))
    try:
        total = source.stat().st_size
        with open(source, "rb") as src, open(part, "wb") as out:
            with _progress_bar(progress, total, 0, label) as update:
                _copy_stream(src, out, update)
            out.flush()
            os.fsync(out.fileno())
    except OSError as exc:
        raise DownloadError(f"cannot copy {source} to {part}: {exc}") from exc


def _classify_connect_error(url: str, reason: Any, timeout: float) -> Exception:
    if isinstance(reason, TimeoutError):
        return _Retryable(DownloadTimeout, f"{url}: no answer within the {timeout:g} s timeout")
    if isinstance(reason, ssl.SSLCertVerificationError):
        # A certificate problem does not fix itself by retrying.
        return DownloadError(f"{url}: TLS certificate verification failed ({reason.verify_message or reason})")
    if isinstance(reason, socket.gaierror):
        return _Retryable(SourceUnreachable, f"{url} is unreachable: host name could not be resolved ({reason})")
    if isinstance(reason, ConnectionRefusedError):
        return _Retryable(SourceUnreachable, f"{url} is unreachable: connection refused")
    return _Retryable(SourceUnreachable, f"{url} is unreachable: {reason}")


def _http_attempt(url: str, part: Path, *, timeout: float, progress: bool, label: str) -> None:
    """Make one request, appending to ``part``; raise ``_Retryable`` for transient failures."""
    meta_path = _meta_path(part)
    offset = _size(part)
    meta = _read_meta(meta_path) if offset else None
    if offset and (meta is None or meta.get("url") != url):
        _discard(part, meta_path)
        offset, meta = 0, None

    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset and meta is not None:
        headers["Range"] = f"bytes={offset}-"
        validator = meta.get("etag") or meta.get("last_modified")
        if validator:
            headers["If-Range"] = validator
    request = urllib.request.Request(url, headers=headers)

    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        with contextlib.closing(exc):
            content_range = exc.headers.get("Content-Range") if exc.headers else None
        if exc.code == 416 and offset:
            match = _UNSATISFIED_RANGE.match(content_range or "")
            if match and int(match.group(1)) == offset:
                return  # the partial file already holds every byte; the checksum has the last word
            # The partial file is longer than the remote one, so it belongs to another version.
            _discard(part, meta_path)
            return _http_attempt(url, part, timeout=timeout, progress=progress, label=label)
        message = f"{url}: server answered HTTP {exc.code} {exc.reason}"
        if exc.code in RETRYABLE_STATUS:
            raise _Retryable(HTTPStatusError, message, url=url, status=exc.code) from None
        raise HTTPStatusError(message, url=url, status=exc.code) from None
    except urllib.error.URLError as exc:
        error = _classify_connect_error(url, exc.reason, timeout)
        raise error from None
    except TimeoutError:
        raise _Retryable(DownloadTimeout, f"{url}: no answer within the {timeout:g} s timeout") from None
    except (http.client.HTTPException, OSError) as exc:
        raise _Retryable(SourceUnreachable, f"{url} is unreachable: connection failed ({exc!r})") from None

    with response:
        status = response.status
        total: int | None = None
        if status == 206:
            match = _CONTENT_RANGE.match(response.headers.get("Content-Range") or "")
            start = int(match.group(1)) if match else -1
            if start != offset:
                _discard(part, meta_path)
                raise _Retryable(
                    IncompleteDownload,
                    f"{url}: server answered the range request at byte {offset} with "
                    f"Content-Range {response.headers.get('Content-Range')!r}",
                )
            if match.group(3) != "*":
                total = int(match.group(3))
            mode = "ab"
        elif 200 <= status < 300:
            # Either a fresh download or a server that ignores Range (or saw a changed file
            # through If-Range): both mean the body starts at byte zero.
            offset, mode = 0, "wb"
        else:
            raise DownloadError(f"{url}: unexpected HTTP status {status}")

        length_header = response.headers.get("Content-Length")
        length = int(length_header) if length_header and length_header.isdigit() else None
        if total is None and length is not None:
            total = offset + length
        _write_meta(meta_path, url, response.headers)

        received = 0
        try:
            out = open(part, mode)
        except OSError as exc:
            raise DownloadError(f"cannot write {part}: {exc}") from exc
        with out, _progress_bar(progress, total, offset, label) as update:
            while True:
                try:
                    chunk = response.read(CHUNK_SIZE)
                except TimeoutError:
                    raise _Retryable(
                        DownloadTimeout,
                        f"{url}: transfer stalled for more than {timeout:g} s after {offset + received} bytes",
                    ) from None
                except (http.client.HTTPException, OSError) as exc:
                    raise _Retryable(
                        IncompleteDownload, f"{url}: connection dropped after {offset + received} bytes ({exc!r})"
                    ) from None
                if not chunk:
                    break
                try:
                    out.write(chunk)
                except OSError as exc:
                    raise DownloadError(f"cannot write {part}: {exc}") from exc
                received += len(chunk)
                update(len(chunk))
            try:
                out.flush()
                os.fsync(out.fileno())
            except OSError as exc:
                raise DownloadError(f"cannot write {part}: {exc}") from exc

    # http.client quietly returns a short body when the peer closes early, so count ourselves.
    if length is not None and received < length:
        expected_total = total if total is not None else offset + length
        raise _Retryable(
            IncompleteDownload,
            f"{url}: connection dropped after {offset + received} of {expected_total} bytes",
        )
    # A server may also answer with fewer bytes than the file has (a short 206), which the next
    # attempt resumes from.
    if total is not None and offset + received < total:
        raise _Retryable(IncompleteDownload, f"{url}: server sent only {offset + received} of {total} bytes")


def _download_http(
    url: str, part: Path, *, timeout: float, retries: int, backoff: float, progress: bool, label: str
) -> None:
    attempts = 0
    failures = 0
    high_water = _size(part)
    while True:
        attempts += 1
        try:
            _http_attempt(url, part, timeout=timeout, progress=progress, label=label)
            return
        except _Retryable as exc:
            size = _size(part)
            # An attempt that moved the download forward is not held against the budget, so a
            # flaky link still finishes a large file; only stalled attempts count.
            if size > high_water:
                high_water = size
                continue
            failures += 1
            if failures >= retries:
                error = exc.final(attempts)
                if isinstance(error, IncompleteDownload) and part.exists():
                    error = IncompleteDownload(f"{error}; the partial file {part} is kept and the next run resumes it")
                raise error from None
            time.sleep(min(MAX_BACKOFF, backoff * 2 ** (failures - 1)))


def fetch(
    url: str,
    dest: Path,
    *,
    expected_sha256: str | None = None,
    timeout: float = 60.0,
    retries: int = 3,
    progress: bool = True,
    backoff: float = 1.0,
) -> str:
    """Fetch ``url`` (http(s)://, file:// or a path) into ``dest`` and return its sha256.

    Bytes go to ``<dest>.part`` first; an existing partial file is resumed with a Range request.
    ``dest`` appears, by rename, only once every byte is there and, when ``expected_sha256`` is
    given, matches it. If ``dest`` already exists with the expected digest nothing is fetched.
    On a checksum mismatch the partial file and ``dest`` are deleted so the next run starts
    clean. ``timeout`` bounds each network wait, not the whole transfer; ``retries`` is the
    number of attempts that may fail without progress, spaced by ``backoff * 2**k`` seconds.
    """
    dest = Path(dest)
    expected = _normalise_digest(expected_sha256, f"expected sha256 of {dest.name}") if expected_sha256 else None
    if expected is not None and dest.is_file() and sha256_file(dest) == expected:
        return expected

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = _part_path(dest)
    if _is_remote(url):
        _download_http(
            url, part, timeout=timeout, retries=max(1, int(retries)), backoff=max(0.0, backoff),
            progress=progress, label=dest.name,
        )
    else:
        _copy_local(_local_source(url), part, progress=progress, label=dest.name)

    digest = sha256_file(part)
    if expected is not None and digest != expected:
        _discard(part, _meta_path(part), dest)
        raise ChecksumMismatch(
            f"{dest.name} (from {url}): sha256 mismatch: expected {expected}, got {digest}; "
            f"the download was deleted"
        )
    os.replace(part, dest)
    _discard(_meta_path(part))
    _fsync_dir(dest.parent)
    return digest
