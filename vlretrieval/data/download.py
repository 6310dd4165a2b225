"""Fetch, verify and unpack the dataset sources listed in ``config/datasets.yaml``.

Every file of a registry entry is fetched into a per-dataset cache, checked against a known
sha256 (given in the entry, read from a ``sha256sum``-style sidecar, or recorded on first
download and trusted from then on) and only then extracted or copied into the dataset
directory. The dataset directory is assembled beside its final place and renamed into it, so a
failed or interrupted run leaves either the previous directory or nothing.

Sources are ``http(s)://`` URLs, ``file://`` URLs or plain paths; relative paths are resolved
against the working directory (the project root when run by the workflow).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import lzma
import os
import posixpath
import re
import shutil
import socket
import ssl
import stat
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Callable, Iterator

from vlretrieval import __version__
from vlretrieval.errors import ChecksumMismatch, ConfigError, DownloadError
from vlretrieval.io import atomic_directory, sha256_file, write_json

try:
    from tqdm import tqdm as _tqdm
except ImportError:  # progress bars are a convenience, never a requirement
    _tqdm = None

__all__ = [
    "CorruptArchive",
    "DownloadTimeout",
    "HTTPStatusError",
    "IncompleteDownload",
    "MANIFEST_NAME",
    "RETRYABLE_STATUS",
    "SourceUnreachable",
    "USER_AGENT",
    "UnsafeArchive",
    "download_dataset",
    "fetch",
    "safe_extract",
    "verify_or_record_checksum",
]

MANIFEST_NAME = "MANIFEST.json"
CHUNK_SIZE = 1 << 20
USER_AGENT = f"vlretrieval/{__version__} (+python-urllib)"
MAX_BACKOFF = 60.0

# Statuses that say "try again later" rather than "this URL is wrong".
RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_ZIP_SUFFIXES = (".zip",)
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tbz", ".tar.xz", ".txz")
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_DRIVE = re.compile(r"^[A-Za-z]:")
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$")
_UNSATISFIED_RANGE = re.compile(r"bytes\s+\*/(\d+)\s*$")
_ENTRY_KEYS = frozenset({"url", "sha256", "sha256_file", "extract", "filename"})


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


class UnsafeArchive(DownloadError):
    """An archive member would be written outside the extraction directory or is a special file."""


class CorruptArchive(DownloadError):
    """An archive cannot be read: truncated, garbage or an unsupported variant."""


# --------------------------------------------------------------------------------------------
# fetching


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


def _normalise_digest(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _HEX64.fullmatch(value.strip()):
        raise ConfigError(f"{what}: {value!r} is not a 64-digit hex sha256")
    return value.strip().lower()


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


# --------------------------------------------------------------------------------------------
# checksums


def _load_record(record_path: Path) -> dict[str, str]:
    if not record_path.exists():
        return {}
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DownloadError(f"checksum record {record_path} is unreadable: {exc}") from exc
    if not isinstance(record, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and _HEX64.fullmatch(v) for k, v in record.items()
    ):
        raise DownloadError(f"checksum record {record_path} must map file names to 64-digit hex sha256 values")
    return {k: v.lower() for k, v in record.items()}


def verify_or_record_checksum(name: str, digest: str, *, expected: str | None, record_path: Path) -> None:
    """Check ``digest`` of file ``name`` against ``expected``, or trust it on first use.

    With ``expected`` given the record is not consulted. Without it, ``record_path`` (a JSON
    object ``{file name: sha256}``) is the expectation: an unknown name is added to it, a known
    one must match. Raises :class:`ChecksumMismatch` naming the file and both digests.
    """
    digest = digest.lower()
    record_path = Path(record_path)
    if expected is not None:
        expected = _normalise_digest(expected, f"expected sha256 of {name}")
        if digest != expected:
            raise ChecksumMismatch(f"{name}: sha256 mismatch: expected {expected}, got {digest}")
        return
    record = _load_record(record_path)
    recorded = record.get(name)
    if recorded is None:
        record[name] = digest
        write_json(record_path, record)
    elif recorded != digest:
        raise ChecksumMismatch(
            f"{name}: sha256 mismatch: expected {recorded} (recorded on first download in {record_path}), "
            f"got {digest}; if the upstream file changed legitimately, delete its entry there and re-run"
        )


def _parse_sidecar(text: str, filename: str, source: str) -> str:
    entries: list[tuple[str | None, str]] = []
    for line_no, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        bsd = re.fullmatch(r"SHA256 \((.+)\) = ([0-9a-fA-F]{64})", line)
        if bsd:
            entries.append((bsd.group(1), bsd.group(2).lower()))
            continue
        fields = line.split(None, 1)
        if not _HEX64.fullmatch(fields[0]):
            raise DownloadError(
                f"checksum file {source}, line {line_no}: expected '<sha256>  <file name>', got {line!r}"
            )
        name = fields[1].strip().lstrip("*") if len(fields) > 1 else None
        entries.append((name, fields[0].lower()))
    if not entries:
        raise DownloadError(f"checksum file {source} contains no sha256")
    named = {d for n, d in entries if n is not None and PurePosixPath(n.replace("\\", "/")).name == filename}
    if len(named) == 1:
        return named.pop()
    if len(named) > 1:
        raise DownloadError(f"checksum file {source} lists conflicting digests for {filename}")
    # A single-entry sidecar describes the one file it ships with, whatever it calls it.
    if len(entries) == 1:
        return entries[0][1]
    raise DownloadError(f"checksum file {source} has no entry for {filename}")


def _sidecar_digest(
    spec: str, filename: str, *, cache_root: Path, timeout: float, retries: int, backoff: float
) -> str:
    if _is_remote(spec):
        sidecar_name = PurePosixPath(urllib.parse.unquote(urllib.parse.urlsplit(spec).path)).name or "sha256"
        path = cache_root / "_checksums" / sidecar_name
        # Cached like the data it describes: a re-run with a complete cache stays offline.
        if not path.is_file():
            fetch(spec, path, timeout=timeout, retries=retries, progress=False, backoff=backoff)
    else:
        path = _local_source(spec)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise DownloadError(f"checksum file {spec} does not exist") from None
    except OSError as exc:
        raise DownloadError(f"checksum file {spec} is unreadable: {exc}") from exc
    try:
        return _parse_sidecar(text, filename, spec)
    except DownloadError:
        if _is_remote(spec):
            _discard(path)  # probably an error page served with 200; fetch it afresh next time
        raise


# --------------------------------------------------------------------------------------------
# extraction


def _archive_kind(archive: Path) -> str:
    name = archive.name.lower()
    if name.endswith(_ZIP_SUFFIXES):
        return "zip"
    if name.endswith(_TAR_SUFFIXES):
        return "tar"
    if zipfile.is_zipfile(archive):
        return "zip"
    if tarfile.is_tarfile(archive):
        return "tar"
    raise CorruptArchive(f"{archive}: not a zip or tar archive")


def _member_path(archive: Path, raw_name: str) -> PurePosixPath | None:
    """The member's path relative to the extraction root; None for the root itself."""
    name = raw_name.replace("\\", "/")
    if "\x00" in name:
        raise UnsafeArchive(f"{archive}: member {raw_name!r} has a NUL byte in its name")
    if name.startswith("/") or _DRIVE.match(name):
        raise UnsafeArchive(f"{archive}: member {raw_name!r} has an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchive(f"{archive}: member {raw_name!r} has a '..' path component")
    return PurePosixPath(*parts) if parts else None


def _is_within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


class _Extractor:
    """Writes members into a staging directory, refusing anything that would leave it."""

    def __init__(self, archive: Path, staging: Path):
        self.archive = archive
        self.staging = staging
        self.root = os.path.realpath(staging)
        self.written: list[PurePosixPath] = []

    def _unsafe(self, raw_name: str, problem: str) -> UnsafeArchive:
        return UnsafeArchive(f"{self.archive}: member {raw_name!r} {problem}")

    def _prepare(self, raw_name: str, rel: PurePosixPath) -> Path:
        """Create the parent directories of ``rel`` and make room for a non-directory there."""
        parent = self.staging.joinpath(*rel.parent.parts)
        parent.mkdir(parents=True, exist_ok=True)
        # Catches a parent reached through an earlier symlink member that points elsewhere.
        if not _is_within(os.path.realpath(parent), self.root):
            raise self._unsafe(raw_name, "would be written outside the extraction directory through a symlink")
        target = parent / rel.name
        if os.path.lexists(target):
            if target.is_symlink() or target.is_dir():
                # Replacing a link or directory could redirect members already extracted under it.
                raise self._unsafe(raw_name, "replaces an earlier directory or link of the same name")
            target.unlink()
        return target

    def directory(self, raw_name: str, rel: PurePosixPath | None) -> None:
        if rel is None:
            return
        target = self.staging.joinpath(*rel.parts)
        if os.path.lexists(target) and not target.is_dir():
            raise self._unsafe(raw_name, "is a directory but an earlier member of that name is not")
        target.mkdir(parents=True, exist_ok=True)
        if not _is_within(os.path.realpath(target), self.root):
            raise self._unsafe(raw_name, "would be created outside the extraction directory through a symlink")

    def regular(
        self, raw_name: str, rel: PurePosixPath | None, source: BinaryIO, mode: int, mtime: float | None
    ) -> None:
        if rel is None:
            raise self._unsafe(raw_name, "is a file named like the archive root")
        target = self._prepare(raw_name, rel)
        with open(target, "xb") as out:
            shutil.copyfileobj(source, out, CHUNK_SIZE)
        # Permissions from foreign archives are not trusted beyond "is it executable".
        os.chmod(target, 0o755 if mode & 0o111 else 0o644)
        if mtime is not None:
            with contextlib.suppress(OSError, OverflowError, ValueError):
                os.utime(target, (mtime, mtime))
        self.written.append(rel)

    def symlink(self, raw_name: str, rel: PurePosixPath | None, link_target: str) -> None:
        if rel is None:
            raise self._unsafe(raw_name, "is a link named like the archive root")
        normalized = link_target.replace("\\", "/")
        if not normalized or normalized.startswith("/") or _DRIVE.match(normalized) or "\x00" in normalized:
            raise self._unsafe(raw_name, f"is a symlink to absolute or invalid target {link_target!r}")
        lexical = posixpath.normpath(posixpath.join(rel.parent.as_posix(), normalized))
        if lexical == ".." or lexical.startswith("../"):
            raise self._unsafe(raw_name, f"is a symlink pointing outside the extraction directory ({link_target!r})")
        target = self._prepare(raw_name, rel)
        resolved = os.path.realpath(os.path.join(os.path.realpath(target.parent), normalized))
        if not _is_within(resolved, self.root):
            raise self._unsafe(raw_name, f"is a symlink pointing outside the extraction directory ({link_target!r})")
        os.symlink(normalized, target)
        self.written.append(rel)

    def hardlink(self, raw_name: str, rel: PurePosixPath | None, link_target: str) -> None:
        if rel is None:
            raise self._unsafe(raw_name, "is a link named like the archive root")
        normalized = link_target.replace("\\", "/")
        if not normalized or normalized.startswith("/") or _DRIVE.match(normalized) or "\x00" in normalized:
            raise self._unsafe(raw_name, f"is a hard link to absolute or invalid target {link_target!r}")
        # Hard link targets are archive paths, relative to the archive root.
        lexical = posixpath.normpath(normalized)
        if lexical in (".", "..") or lexical.startswith("../"):
            raise self._unsafe(raw_name, f"is a hard link pointing outside the extraction directory ({link_target!r})")
        source = self.staging.joinpath(*PurePosixPath(lexical).parts)
        if not _is_within(os.path.realpath(source), self.root):
            raise self._unsafe(raw_name, f"is a hard link pointing outside the extraction directory ({link_target!r})")
        if not source.is_file():
            raise self._unsafe(raw_name, f"is a hard link to {link_target!r}, which is not an earlier regular file")
        target = self._prepare(raw_name, rel)
        os.link(source, target)
        self.written.append(rel)


def _extract_zip(archive: Path, extractor: _Extractor) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        # The central directory is read up front, so reject bad names before writing anything.
        plan = []
        for info in infos:
            rel = _member_path(archive, info.filename)
            mode = info.external_attr >> 16
            kind = stat.S_IFMT(mode)
            if info.flag_bits & 0x1:
                raise CorruptArchive(f"{archive}: member {info.filename!r} is encrypted")
            if info.is_dir() or kind == stat.S_IFDIR:
                plan.append(("dir", info, rel, mode))
            elif kind == stat.S_IFLNK:
                plan.append(("symlink", info, rel, mode))
            elif kind in (0, stat.S_IFREG):
                plan.append(("file", info, rel, mode))
            else:
                raise UnsafeArchive(f"{archive}: member {info.filename!r} is a device file, fifo or socket")
        for kind, info, rel, mode in plan:
            if kind == "dir":
                extractor.directory(info.filename, rel)
            elif kind == "symlink":
                link_target = zf.read(info).decode("utf-8", errors="surrogateescape")
                extractor.symlink(info.filename, rel, link_target)
            else:
                mtime = None
                with contextlib.suppress(ValueError, OverflowError):
                    mtime = time.mktime(info.date_time + (0, 0, -1))
                with zf.open(info) as source:
                    extractor.regular(info.filename, rel, source, mode, mtime)


def _extract_tar(archive: Path, extractor: _Extractor) -> None:
    # Iterating (rather than getmembers + extract) reads a compressed tar only once.
    with tarfile.open(archive, "r:*") as tf:
        for member in tf:
            rel = _member_path(archive, member.name)
            if member.isdir():
                extractor.directory(member.name, rel)
            elif member.issym():
                extractor.symlink(member.name, rel, member.linkname)
            elif member.islnk():
                extractor.hardlink(member.name, rel, member.linkname)
            elif member.isreg():
                source = tf.extractfile(member)
                if source is None:
                    raise CorruptArchive(f"{archive}: member {member.name!r} has no readable data")
                with source:
                    extractor.regular(member.name, rel, source, member.mode, member.mtime)
            else:
                raise UnsafeArchive(f"{archive}: member {member.name!r} is a device file, fifo or other special file")


def _collisions(source: Path, target: Path) -> Iterator[Path]:
    for entry in os.scandir(source):
        existing = target / entry.name
        if not os.path.lexists(existing):
            continue
        if entry.is_dir(follow_symlinks=False) and existing.is_dir() and not existing.is_symlink():
            yield from _collisions(Path(entry.path), existing)
        else:
            yield existing


def _merge(source: Path, target: Path) -> None:
    for entry in list(os.scandir(source)):
        existing = target / entry.name
        if entry.is_dir(follow_symlinks=False) and existing.is_dir() and not existing.is_symlink():
            _merge(Path(entry.path), existing)
        else:
            os.replace(entry.path, existing)


_CORRUPT_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError)


def _is_filesystem_error(exc: BaseException) -> bool:
    # Decompressors report corrupt data as OSError without an errno; real I/O errors carry one.
    return isinstance(exc, OSError) and exc.errno is not None


def safe_extract(archive: Path, target_dir: Path) -> list[Path]:
    """Extract a zip or tar(.gz/.bz2/.xz) archive into ``target_dir``; return the extracted files.

    Members are refused (:class:`UnsafeArchive`) when their path is absolute or has a ``..``
    component, when a symlink or hard link would point outside ``target_dir``, or when they are
    device files, fifos or sockets. Unreadable archives raise :class:`CorruptArchive`. Members
    are written to a staging directory beside ``target_dir`` and moved in only when all of them
    succeeded, so a failure leaves ``target_dir`` untouched. An existing ``target_dir`` is
    merged into, but no existing entry is overwritten. Returned are the paths of regular files
    and links (not directories), in archive order.
    """
    archive = Path(archive)
    target_dir = Path(target_dir)
    target_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target_dir.name}.", suffix=".extract", dir=target_dir.parent))
    try:
        try:
            kind = _archive_kind(archive)
            extractor = _Extractor(archive, staging)
            if kind == "zip":
                _extract_zip(archive, extractor)
            else:
                _extract_tar(archive, extractor)
        except DownloadError:
            raise
        except _CORRUPT_ERRORS as exc:
            raise CorruptArchive(f"{archive}: corrupt or truncated archive ({exc})") from exc
        except NotImplementedError as exc:
            raise CorruptArchive(f"{archive}: unsupported archive feature ({exc})") from exc
        except OSError as exc:
            if _is_filesystem_error(exc):
                raise DownloadError(f"cannot extract {archive}: {exc}") from exc
            raise CorruptArchive(f"{archive}: corrupt or truncated archive ({exc})") from exc

        written = [target_dir.joinpath(*rel.parts) for rel in extractor.written]
        if not target_dir.exists():
            # mkdtemp makes the staging directory private; an extracted dataset should not be.
            os.chmod(staging, 0o755)
            os.replace(staging, target_dir)
            return written
        clashes = list(_collisions(staging, target_dir))
        if clashes:
            shown = ", ".join(str(p) for p in clashes[:5])
            raise DownloadError(f"{archive}: extracting into {target_dir} would overwrite {shown}")
        try:
            _merge(staging, target_dir)
        except OSError as exc:
            raise DownloadError(f"cannot move the contents of {archive} into {target_dir}: {exc}") from exc
        return written
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# datasets


@dataclass(frozen=True)
class _FileSpec:
    url: str
    filename: str
    sha256: str | None
    sha256_file: str | None
    extract: bool


def _default_filename(url: str) -> str:
    if _is_remote(url) or urllib.parse.urlsplit(url).scheme.lower() == "file":
        return PurePosixPath(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name
    return Path(url).name


def _is_archive_name(filename: str) -> bool:
    return filename.lower().endswith(_ZIP_SUFFIXES + _TAR_SUFFIXES)


def _file_specs(name: str, entry: Any) -> list[_FileSpec]:
    if not isinstance(entry, dict):
        raise ConfigError(f"dataset {name!r}: registry entry must be a mapping")
    files = entry.get("files")
    if not isinstance(files, list) or not files:
        raise ConfigError(f"dataset {name!r}: 'files' must be a non-empty list of {{url: ...}} mappings")
    specs: list[_FileSpec] = []
    seen: set[str] = set()
    for index, item in enumerate(files):
        where = f"dataset {name!r}, files[{index}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{where}: expected a mapping with a 'url', got {item!r}")
        # An unknown key is most likely a misspelt checksum field, which would silently skip verification.
        unknown = sorted(set(item) - _ENTRY_KEYS)
        if unknown:
            allowed = ", ".join(sorted(_ENTRY_KEYS))
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {allowed}")
        url = item.get("url")
        if not isinstance(url, str) or not url.strip():
            raise ConfigError(f"{where}: 'url' must be a non-empty string")
        url = url.strip()
        filename = item.get("filename") or _default_filename(url)
        if (
            not isinstance(filename, str)
            or filename in ("", ".", "..")
            or "/" in filename
            or "\\" in filename
            or filename == MANIFEST_NAME
        ):
            raise ConfigError(f"{where}: cannot use {filename!r} as a file name; set 'filename' to a plain name")
        if filename in seen:
            raise ConfigError(f"{where}: file name {filename!r} is used twice; set 'filename' to tell them apart")
        seen.add(filename)
        sha256 = item.get("sha256")
        if sha256 is not None:
            sha256 = _normalise_digest(sha256, f"{where}: 'sha256'")
        sidecar = item.get("sha256_file")
        if sidecar is not None and (not isinstance(sidecar, str) or not sidecar.strip()):
            raise ConfigError(f"{where}: 'sha256_file' must be a path or URL")
        extract = item.get("extract")
        if extract is None:
            extract = _is_archive_name(filename)
        elif not isinstance(extract, bool):
            raise ConfigError(f"{where}: 'extract' must be true or false, got {extract!r}")
        specs.append(_FileSpec(url, filename, sha256, sidecar.strip() if sidecar else None, extract))
    return specs


def _copy_file(source: Path, target: Path) -> None:
    with open(source, "rb") as src, open(target, "xb") as out:
        shutil.copyfileobj(src, out, CHUNK_SIZE)


@dataclass
class _Fetched:
    spec: _FileSpec
    path: Path
    digest: str
    explicit: str | None
    origin: str


def download_dataset(
    name: str,
    entry: dict,
    dest_dir: Path,
    *,
    cache_dir: Path,
    checksum_dir: Path,
    timeout: float = 60.0,
    retries: int = 3,
    backoff: float = 1.0,
    progress: bool = True,
) -> Path:
    """Fetch, verify and unpack every file of registry ``entry`` into ``dest_dir``.

    Files are cached as ``cache_dir/<name>/<filename>`` (a cached file with the expected digest
    is not fetched again), checked against ``sha256``, the ``sha256_file`` sidecar, or the
    trust-on-first-use record ``checksum_dir/<name>.json``, then extracted (archives) or copied
    into a fresh directory that replaces ``dest_dir`` as a whole. ``dest_dir/MANIFEST.json``
    lists each file with its source, sha256, size and extracted contents. Any failure leaves
    ``dest_dir`` as it was. Returns ``dest_dir``.
    """
    if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name:
        raise ConfigError(f"dataset name {name!r} cannot name a cache directory or checksum record")
    dest_dir = Path(dest_dir)
    cache_root = Path(cache_dir) / name
    record_path = Path(checksum_dir) / f"{name}.json"
    specs = _file_specs(name, entry)
    record = _load_record(record_path)

    fetched: list[_Fetched] = []
    for spec in specs:
        if spec.sha256 is not None:
            explicit, origin = spec.sha256, "the registry entry's sha256"
        elif spec.sha256_file is not None:
            explicit = _sidecar_digest(
                spec.sha256_file, spec.filename, cache_root=cache_root,
                timeout=timeout, retries=retries, backoff=backoff,
            )
            origin = f"the checksum file {spec.sha256_file}"
        else:
            explicit, origin = None, f"the checksum recorded on first download in {record_path}"
        expected = explicit if explicit is not None else record.get(spec.filename)
        cached = cache_root / spec.filename
        try:
            if expected is None and cached.is_file():
                # Only a completed fetch renames into the cache, so its bytes are whole; the
                # record that should describe them was lost and is rewritten below.
                digest = sha256_file(cached)
            else:
                digest = fetch(
                    spec.url, cached, expected_sha256=expected, timeout=timeout, retries=retries,
                    progress=progress, backoff=backoff,
                )
        except ChecksumMismatch as exc:
            hint = ""
            if explicit is None:
                hint = "; if the upstream file changed legitimately, delete its entry there and re-run"
            raise ChecksumMismatch(f"dataset {name!r}: {exc}; the expected digest comes from {origin}{hint}") from None
        fetched.append(_Fetched(spec, cached, digest, explicit, origin))

    with atomic_directory(dest_dir) as staging:
        files_manifest = []
        for item in fetched:
            if item.spec.extract:
                try:
                    paths = safe_extract(item.path, staging)
                except CorruptArchive as exc:
                    if item.explicit is None and record.get(item.spec.filename) is None:
                        # Nothing vouched for these bytes, so fetch them afresh next time.
                        _discard(item.path)
                        raise CorruptArchive(f"dataset {name!r}: {exc}; the cached copy was deleted") from exc
                    raise CorruptArchive(
                        f"dataset {name!r}: {exc}; its sha256 matches {item.origin}, so the source itself is bad"
                    ) from exc
                contents = [p.relative_to(staging).as_posix() for p in paths]
            else:
                target = staging / item.spec.filename
                if os.path.lexists(target):
                    raise DownloadError(f"dataset {name!r}: {item.spec.filename} clashes with an extracted member")
                _copy_file(item.path, target)
                contents = [item.spec.filename]
            files_manifest.append(
                {
                    "filename": item.spec.filename,
                    "source": item.spec.url,
                    "sha256": item.digest,
                    "size": item.path.stat().st_size,
                    "extracted": item.spec.extract,
                    "contents": contents,
                }
            )
        if os.path.lexists(staging / MANIFEST_NAME):
            raise DownloadError(f"dataset {name!r}: an extracted member is named {MANIFEST_NAME}")
        write_json(staging / MANIFEST_NAME, {"dataset": name, "files": files_manifest})
        # Recorded only once the files proved usable, so a first download that turns out to be
        # garbage is never trusted on later runs.
        for item in fetched:
            verify_or_record_checksum(item.spec.filename, item.digest, expected=item.explicit, record_path=record_path)
    return dest_dir
