"""Safe extraction of zip and tar archives: no member may land outside the target directory."""

from __future__ import annotations

import contextlib
import lzma
import os
import posixpath
import re
import shutil
import stat
import tarfile
import tempfile
import time
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterator

from vlretrieval.errors import DownloadError

from .fetch import CHUNK_SIZE

_ZIP_SUFFIXES = (".zip",)
_TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tbz", ".tar.xz", ".txz")
_DRIVE = re.compile(r"^[A-Za-z]:")


class UnsafeArchive(DownloadError):
    """An archive member would be written outside the extraction directory or is a special file."""


class CorruptArchive(DownloadError):
    """An archive cannot be read: truncated, garbage or an unsupported variant."""


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
