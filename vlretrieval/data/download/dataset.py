"""A registry entry fetched, verified and unpacked into a dataset directory with its ``MANIFEST.json``."""

from __future__ import annotations

import os
import shutil
import urllib.parse
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from vlretrieval.errors import ChecksumMismatch, ConfigError, DownloadError
from vlretrieval.io import atomic_directory, sha256_file, write_json

from .checksums import _load_record, _normalise_digest, _parse_sidecar, verify_or_record_checksum
from .extract import _TAR_SUFFIXES, _ZIP_SUFFIXES, CorruptArchive, safe_extract
from .fetch import CHUNK_SIZE, _discard, _is_remote, _local_source, fetch

MANIFEST_NAME = "MANIFEST.json"
_ENTRY_KEYS = frozenset({"url", "sha256", "sha256_file", "extract", "filename"})


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
